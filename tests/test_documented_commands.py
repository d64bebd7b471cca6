"""Every `python -m stompp_jax...` command that README.md, docs/*.md and the configs' docstrings
show is covered: run by a test at a tiny budget, or parsed here (the config file, its
argument and the overrides load, and the config passes validation) where it needs hardware or
prepared data. A command added to the docs without an entry in COVERAGE fails
`test_every_documented_command_is_covered`; an entry whose command left the docs fails it too.
"""

import ast
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from stompp_jax import experiment

from helpers import REPO  # pylint: disable=g-bad-import-order

_COMMAND = re.compile(r'python -m stompp_jax[\w.]*[^`\n|;]*')

# Placeholders in a usage line, not a command to run.
USAGE = 'usage'
# Loaded and validated by `test_documented_command_parses`.
PARSE = 'parse'


def run_by(test_id: str) -> str:
  """A command that the test `tests/FILE.py::NAME` runs at a tiny budget."""
  return test_id


COVERAGE = {
    # README.md
    'python -m stompp_jax.main --config=configs/quickstart.py --workdir=/tmp/stompp_quickstart':
        run_by('test_cli_output.py::test_quickstart_runs_offline_on_the_builtin_digits'),
    'python -m stompp_jax.main --config=configs/<file>.py[:args] --workdir=DIR [--config.a.b=v ...]':
        USAGE,
    'python -m stompp_jax.main --config=PATH/configs/<file>.py':
        run_by('test_package.py::test_wheel_installs_and_runs_from_another_directory'),
    'python -m stompp_jax.main --helpfull':
        run_by('test_notebooks.py::test_install_cell_installs_the_package_from_a_git_repository'),
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,model=resnet50,method=ste'
    ' --workdir=runs/c100_r50_ste': PARSE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,order=reverse,shape=linear'
    ' --workdir=runs/rev': PARSE,
    'python -m stompp_jax.main --config=configs/cifar.py --workdir=runs/r10'
    ' --config.binary.refresh_every=10 --config.binary.span_end=1.0'
    ' --config.optim.learning_rate=0.05': PARSE,
    'python -m stompp_jax.main --config=configs/imagenet_r50.py:smoke --workdir=/tmp/r50':
        run_by('test_train.py::test_cli_trains_imagenet_r50_on_synthetic_data'),
    'python -m stompp_jax.models.summary --config=configs/imagenet_r50.py':
        run_by('test_documented_commands.py::test_the_readme_summary_command_prints_resnet50'),
    'python -m stompp_jax.analysis RUN_DIR...': USAGE,
    'python -m stompp_jax.main --config=configs/quickstart.py --workdir=W1':
        run_by('test_cli_output.py::test_quickstart_runs_offline_on_the_builtin_digits'),
    'python -m stompp_jax.main --config=configs/quickstart.py:ste --workdir=W2': PARSE,
    'python -m stompp_jax.main --config=configs/quickstart.py --workdir=W3':
        run_by('test_cli_output.py::test_quickstart_runs_offline_on_the_builtin_digits'),
    'python -m stompp_jax.export --workdir=RUN --out=DIR':
        run_by('test_export.py::test_cli_export_of_trained_bnn_equals_fully_binary_eval'),
    'python -m stompp_jax.evaluate --workdir=RUN [--split=test': USAGE,
    'python -m stompp_jax.evaluate --workdir=RUN --recalibrate_bn_batches=20':
        run_by('test_evaluate.py::test_recalibrated_line_uses_the_re_estimated_statistics'),
    'python -m stompp_jax.export': USAGE,
    # docs/
    'python -m stompp_jax.export --workdir=RUN --out=DIR --recalibrate_bn_batches=20':
        run_by('test_export.py::test_export_can_fold_recalibrated_batch_norm_statistics'),
    'python -m stompp_jax.main --config=configs/default.py --workdir=/tmp/run'
    ' --config.data.source=npz': PARSE,
    'python -m stompp_jax.export --config=configs/imagenet.py:model=resnet18 --out=DIR': PARSE,
    'python -m stompp_jax.export --config=configs/imagenet.py:model=resnet18 --out=/tmp/r18': PARSE,
    'python -m stompp_jax.main --config=... --workdir=DIR': USAGE,
    'python -m stompp_jax.main': USAGE,
    'python -m stompp_jax.analysis runs/study300/resnet20_bnn_* --out=plots':
        run_by('test_analysis.py::test_main_writes_pngs'),
    # configs/*.py docstrings
    'python -m stompp_jax.main --workdir=runs/c100_r50_bnn_stompp'
    ' --config=configs/cifar.py:dataset=cifar100,model=resnet50,mode=bnn,method=stompp': PARSE,
    'python -m stompp_jax.main --config=configs/cifar10_r18.py --workdir=runs/c10_r18_stompp': PARSE,
    'python -m stompp_jax.main --config=configs/default.py --workdir=/tmp/run': PARSE,
    'python -m stompp_jax.main --workdir=gs://BUCKET/runs/in_r50_bnn_stompp'
    ' --config=configs/imagenet.py:model=resnet50,mode=bnn,method=stompp'
    ' --config.data.dir=gs://BUCKET/tensorflow_datasets': PARSE,
    'python -m stompp_jax.main --config=configs/imagenet_r50.py --workdir=gs://BUCKET/runs/r50'
    ' --config.data.dir=gs://BUCKET/tensorflow_datasets': PARSE,
}


def _documents() -> list[tuple[str, str]]:
  """(path, text that shows commands): README.md, docs/*.md, the configs' module docstrings."""
  documents = []
  for path in ['README.md', *sorted(glob.glob('docs/*.md', root_dir=REPO))]:
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      documents.append((path, f.read()))
  for path in sorted(glob.glob('configs/*.py', root_dir=REPO)):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      documents.append((path, ast.get_docstring(ast.parse(f.read())) or ''))
  return documents


def documented_commands() -> dict[str, str]:
  """{command: where it is shown}, a command's lines joined where they end in a backslash."""
  found = {}
  for path, text in _documents():
    text = re.sub(r'\s*\\\n\s*', ' ', text)
    for match in _COMMAND.finditer(text):
      command = ' '.join(match.group(0).split())
      found.setdefault(command, path)
  return found


def test_every_documented_command_is_covered():
  documented = documented_commands()
  missing = {c: where for c, where in documented.items() if c not in COVERAGE}
  assert not missing, f'commands no test runs or parses (add them to COVERAGE): {missing}'
  stale = sorted(set(COVERAGE) - set(documented))
  assert not stale, f'COVERAGE lists commands the docs no longer show: {stale}'


@pytest.mark.parametrize('command', sorted(c for c, how in COVERAGE.items()
                                           if how not in (USAGE, PARSE)))
def test_the_test_that_runs_a_command_exists(command):
  file_name, test_name = COVERAGE[command].split('::')
  with open(os.path.join(REPO, 'tests', file_name), encoding='utf-8') as f:
    assert re.search(rf'^def {test_name}\(', f.read(), re.M), COVERAGE[command]


def parse_command(command: str) -> flags.FlagValues:
  """The command's flags parsed as its module would: --config (file, argument, overrides)
  loaded and locked; the other flags of the command kept as strings."""
  argv = shlex.split(command)[3:]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True,
                                  sys_argv=['prog', *argv])
  for name in ('workdir', 'out'):
    flags.DEFINE_string(name, None, name, flag_values=values)
  values(['prog', *argv])
  return values


@pytest.mark.parametrize('command', sorted(c for c, how in COVERAGE.items() if how == PARSE))
def test_documented_command_parses(command, monkeypatch):
  monkeypatch.chdir(REPO)
  values = parse_command(command)
  assert values.config is not None
  experiment.check_config(values.config)
  assert values.workdir or values.out


def test_the_readme_summary_command_prints_resnet50():
  command = 'python -m stompp_jax.models.summary --config=configs/imagenet_r50.py'
  assert command in COVERAGE
  result = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'stage4_block2/conv3' in result.stdout, result.stdout[-2000:]


def test_every_referenced_document_exists():
  """Markdown links of the docs, and every `docs/*.md` or upper-case markdown file name that a
  file of the repository names, point at a file of the repository."""
  link_pattern = re.compile(r'\]\(([^)#\s]+)\)')
  name_pattern = re.compile(r'(?<![\w/.-])((?:docs/)?[\w-]+\.md)\b')
  broken = []
  paths = [*glob.glob('**/*.md', root_dir=REPO, recursive=True),
           *glob.glob('**/*.py', root_dir=REPO, recursive=True),
           *glob.glob('**/*.ipynb', root_dir=REPO, recursive=True), 'requirements.txt']
  for path in paths:
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      text = f.read()
    links = link_pattern.findall(text) if path.endswith('.md') else []
    found = [(link, '') for link in links] + [('', name) for name in name_pattern.findall(text)]
    for link, name in found:
      if link and '://' not in link:
        target = os.path.join(REPO, os.path.dirname(path), link)
      elif name and (name.startswith('docs/') or name[0].isupper()):
        here = os.path.join(REPO, os.path.dirname(path), name)
        target = here if os.path.exists(here) else os.path.join(REPO, name)
      else:
        continue
      if not os.path.exists(target):
        broken.append(f'{path}: {link or name}')
  assert not broken, broken
