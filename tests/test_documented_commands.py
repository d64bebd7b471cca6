"""Every `python -m ...` command that README.md, docs/*.md, launch/README.md, CONTRIBUTING.md,
the configs' docstrings and the notebooks' text cells show works as shown, or says right beside it what it needs first.

COVERAGE lists each command with how it is checked:
- `run_by('FILE.py::NAME')`: a test runs it at a tiny budget; that test must exist, and its file
  must name the command's module.
- PARSE: no test runs it (it needs an accelerator, a dataset or hours).
- USAGE: a usage line; it must hold a placeholder (DIR, RUN, <file>, [...], ...).
- STDLIB: a module of Python's standard library (`python -m venv`).

Whatever its entry, every command of `stompp_jax.main` (and `stompp_jax.export --config=...`)
is also parsed here as the module parses it (absl flags, ml_collections' config_flags: the
config file, its argument, the `--config.*` overrides, the lock) and validated by the checks a
run makes before it trains: `experiment.check_config` (every field, and whether the data source
can read `data.dir`), the workdir check, and, on a fresh machine (no $STOMPP_DATA_DIR, an empty
home directory, the command's own environment assignments), the data it needs
(`sources.requirement`): a command whose data must be prepared first needs a link to
docs/data.md or docs/reproducing.md in the text just before it or on its own line (or to be
shown in docs/data.md itself).
`test_known_bad_commands_fail` proves that the two commands the docs once showed wrongly fail.
"""

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from stompp_jax import experiment
from stompp_jax import workdir as workdir_lib
from stompp_jax.data import sources

from helpers import REPO  # pylint: disable=g-bad-import-order

# A command: optional VAR=value assignments, `python -m module`, its arguments up to the end of
# the line, a backtick, a table cell or a shell separator.
_COMMAND = re.compile(r'(?:\b[A-Z][A-Z0-9_]*=\S+ +)*python -m [\w.]+[^`\n|;]*')
# Inline code (single backticks) that a paragraph wraps over up to four lines.
_INLINE_CODE_OVER_LINES = re.compile(r'(?<!`)`[^`\n]+(?:\n[^`\n]+){1,3}`(?!`)')
_PREPARATION_LINK = re.compile(r'(?:docs/)?(?:data|reproducing)\.md')
_DATA_PAGE = 'docs/data.md'  # The page that says how to prepare every dataset.
_CONTEXT_CHARS = 300  # How far before a command the text may say what it needs.
_PLACEHOLDER = re.compile(r'\b[A-Z][A-Z_]{2,}\b|<[\w-]+>|\[|\.\.\.')

USAGE = 'usage'
PARSE = 'parse'
STDLIB = 'stdlib'  # A module of Python's standard library (venv), not ours.
SWEEP_TEST = 'test_documented_scripts.py::test_a_documented_sweep_command_runs_as_shown'
_VALIDATED_MODULES = ('stompp_jax.main', 'stompp_jax.export')


def run_by(test_id: str) -> str:
  """A command that the test `tests/FILE.py::NAME` runs at a tiny budget."""
  return test_id


COVERAGE = {
    # README.md
    'python -m stompp_jax.main --config=configs/quickstart.py --workdir=/tmp/stompp_quickstart':
        run_by('test_cli_output.py::test_quickstart_runs_offline_on_the_builtin_digits'),
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,model=resnet50,method=ste'
    ' --workdir=runs/c100_r50_ste': PARSE,
    'python -m stompp_jax.main --config=configs/cifar10_r18.py'
    ' --workdir=runs/c10_r18_stompp': PARSE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,order=reverse'
    ' --workdir=runs/c100_r18_reverse': PARSE,
    'python -m stompp_jax.main --config=configs/imagenet_r50.py --workdir=gs://BUCKET/runs/r50'
    ' --config.data.dir=/mnt/stompp_data/tensorflow_datasets': PARSE,
    'python -m stompp_jax.main --config=configs/imagenet_r50.py:smoke --workdir=/tmp/r50':
        run_by('test_train.py::test_cli_trains_imagenet_r50_on_synthetic_data'),
    'python -m stompp_jax.export --workdir=RUN --out=DIR':
        run_by('test_export.py::test_cli_export_of_trained_bnn_equals_fully_binary_eval'),
    'python -m stompp_jax.models.summary --config=configs/imagenet_r50.py':
        run_by('test_documented_commands.py::test_the_docs_summary_command_prints_resnet50'),
    # configs/*.py docstrings
    'python -m stompp_jax.main --workdir=runs/c100_r50_bnn_stompp'
    ' --config=configs/cifar.py:dataset=cifar100,model=resnet50,mode=bnn,method=stompp': PARSE,
    'python -m stompp_jax.main --config=configs/default.py --workdir=/tmp/run': PARSE,
    'python -m stompp_jax.main --config=configs/tiny.py --workdir=DIR': USAGE,
    'python -m stompp_jax.main --workdir=gs://BUCKET/runs/in_r50_bnn_stompp'
    ' --config=configs/imagenet.py:model=resnet50,mode=bnn,method=stompp'
    ' --config.data.dir=/mnt/stompp_data/tensorflow_datasets': PARSE,
    # docs/
    'STOMPP_DATA_DIR=/path/to/cifar10_jpeg python -m stompp_jax.main --config=configs/default.py'
    ' --workdir=/tmp/run --config.data.source=npz': PARSE,
    'python -m benchmarks.input_pipeline --data_dir=DIR': USAGE,
    'python -m stompp_jax.export --config=configs/imagenet.py:model=resnet18 --out=DIR': PARSE,
    'python -m stompp_jax.export --config=configs/imagenet.py:model=resnet18 --out=/tmp/r18': PARSE,
    'python -m stompp_jax.export --workdir=RUN --out=DIR --recalibrate_bn_batches=20':
        run_by('test_export.py::test_export_can_fold_recalibrated_batch_norm_statistics'),
    'python -m stompp_jax.evaluate --workdir=RUN --recalibrate_bn_batches=20':
        run_by('test_evaluate.py::test_recalibrated_line_uses_the_re_estimated_statistics'),
    'python -m examples.own_model --workdir=/tmp/own_model':
        run_by('test_own_model.py::test_the_example_trains_its_own_model'),
    'python -m stompp_jax.main --config=configs/quickstart.py --workdir=/tmp/qsmeasure/run':
        run_by('test_cli_output.py::test_quickstart_runs_offline_on_the_builtin_digits'),
    'python -m stompp_jax.main --config=... --workdir=DIR': USAGE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar10,model=resnet50,'
    'method=stompp --workdir=runs/c10_r50_stompp': PARSE,
    'python -m stompp_jax.main --config=configs/imagenet.py:model=resnet50,method=stompp_ste'
    ' --workdir=gs://BUCKET/runs/in_r50_stompp_ste'
    ' --config.data.dir=/mnt/stompp_data/tensorflow_datasets': PARSE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,model=resnet18,method=ste'
    ' --workdir=runs/c100_r18_ste': PARSE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,model=resnet50,'
    'order=global --workdir=runs/c100_r50_global': PARSE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,method=stompp'
    ' --workdir=runs/c100_r18_lr005 --config.optim.learning_rate=0.05': PARSE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,shape=linear,refresh=10'
    ' --workdir=runs/c100_r18_linear_r10 --config.binary.span_end=1.0': PARSE,
    'python -m launch.sweep r50_bnn_cifar --print':
        run_by('test_launch.py::test_sweep_prints_every_row_of_a_table_with_three_seeds'),
    'STOMPP_DATA_DIR=/path/to/cifar10_jpeg python -m stompp_jax.main'
    ' --config=configs/quickstart.py --workdir=W1':
        run_by('test_cli_output.py::test_quickstart_runs_offline_on_the_builtin_digits'),
    'python -m stompp_jax.main --config=configs/<file>.py[:args] --workdir=DIR'
    ' [--config.a.b=v ...]': USAGE,
    'python -m stompp_jax.analysis RUN_DIR... --out=PLOT_DIR': USAGE,
    # docs/preflight.md, launch/README.md
    'python -m stompp_jax.preflight --config=CONFIG --topology=TYPE [--methods=fp,ste,stompp,'
    'stompp_ste] [--per_chip_batch=N] [--find_max_batch] [--json=PATH] [--config.FIELD=VALUE'
    ' ...]': USAGE,
    'python -m stompp_jax.preflight --config=configs/imagenet_r50.py --topology=v4-32':
        run_by('test_preflight.py::test_the_documented_commands_parse_and_pass_the_checks_before_compiling'),
    'python -m stompp_jax.preflight --config=configs/imagenet_r50.py --topology=v5e-256'
    ' --methods=fp,stompp --find_max_batch':
        run_by('test_preflight.py::test_the_documented_commands_parse_and_pass_the_checks_before_compiling'),
    'python -m stompp_jax.evaluate --workdir=RUN [--split=test': USAGE,
    'python -m stompp_jax.main --config=CONFIG --workdir=DIR': USAGE,
    'python -m stompp_jax.main --config=configs/default.py --config.model.name=MODEL'
    ' --config.model.mode=bnn --config.binary.method=METHOD --config.data.source=npz'
    ' --config.data.dir=DIR16 --config.train.batch_size=128 --config.train.num_steps=60'
    ' --config.mesh.num_devices=1': USAGE,
    # launch/README.md
    'python -m launch.sweep --help': run_by(SWEEP_TEST),
    'python -m launch.sweep r50_bnn_cifar --list': run_by(SWEEP_TEST),
    'python -m launch.sweep r50_bnn_cifar --run': run_by(SWEEP_TEST),
    'python -m launch.sweep r50_bnn_cifar --print --workdir-root=/shared/runs'
    ' --launcher="sbatch launch/gpu_slurm.sbatch"': run_by(SWEEP_TEST),
    'python -m launch.sweep --config=configs/cifar.py:model=resnet18,mode=bnn --arg'
    ' dataset=cifar10,cifar100 --grid binary.method=ste,stompp --grid seed=0,1,2 --print':
        run_by(SWEEP_TEST),
    'python -m stompp_jax.main ...': USAGE,
    'python -m stompp_jax.main ARGS': USAGE,
    'python -m venv .venv && source .venv/bin/activate': STDLIB,
    # README.md, CONTRIBUTING.md: the tests
    'python -m pytest tests': run_by(
        'test_docs.py::test_the_readme_sets_up_a_fresh_machine_in_two_commands_and_ci_runs_the_second'),
    'python -m pytest tests/test_data_sources.py -q -x': run_by(
        'test_documented_scripts.py::test_the_documented_single_file_test_command_collects'),
    'python -m ...': USAGE,
    # notebooks/
    'python -m stompp_jax.main ... --workdir=DIR': USAGE,
    'python -m stompp_jax.analysis RUN_DIR ... --out=PLOT_DIR': USAGE,
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar10,model=resnet20,'
    'method=stompp --workdir=runs/r20_stompp': PARSE,
}


def _notebook_text(path: str) -> str:
  with open(path, encoding='utf-8') as f:
    cells = json.load(f)['cells']
  return '\n\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')


def _documents() -> list[tuple[str, str]]:
  """(path, text that shows commands): README.md, docs/*.md, launch/README.md, CONTRIBUTING.md,
  the configs' module docstrings, the notebooks' markdown cells."""
  documents = []
  for path in ['README.md', *sorted(glob.glob('docs/*.md', root_dir=REPO)), 'launch/README.md',
               'CONTRIBUTING.md']:
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      documents.append((path, f.read()))
  for path in sorted(glob.glob('configs/*.py', root_dir=REPO)):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      documents.append((path, ast.get_docstring(ast.parse(f.read())) or ''))
  for path in sorted(glob.glob('notebooks/*.ipynb', root_dir=REPO)):
    documents.append((path, _notebook_text(os.path.join(REPO, path))))
  return documents


def _clean(command: str) -> str:
  return ' '.join(command.split(' #')[0].split())


def joined_documents() -> list[tuple[str, str]]:
  """`_documents()` with a command's lines joined where they end in a backslash and where a
  paragraph wraps its inline code (also read by test_documented_scripts.py)."""
  joined = []
  for path, text in _documents():
    text = re.sub(r'\s*\\\n\s*', ' ', text)
    joined.append((path, _INLINE_CODE_OVER_LINES.sub(lambda m: ' '.join(m.group(0).split()),
                                                     text)))
  return joined


def documented_commands() -> dict[str, tuple[str, str]]:
  """{command: (where it is shown, the text around it)}: the commands of `joined_documents`;
  the text is what precedes one and the rest of its line."""
  found = {}
  for path, text in joined_documents():
    for match in _COMMAND.finditer(text):
      line_end = text.find('\n', match.end())
      context = text[max(0, match.start() - _CONTEXT_CHARS):line_end if line_end >= 0 else None]
      found.setdefault(_clean(match.group(0)), (path, context))
  return found


def _split(command: str) -> tuple[dict[str, str], str, list[str]]:
  """(environment assignments, module, arguments) of a command."""
  words = shlex.split(command)
  start = words.index('python')
  env = dict(w.split('=', 1) for w in words[:start])
  return env, words[start + 2], words[start + 3:]


def parse_command(args: list[str]) -> flags.FlagValues:
  """The flags parsed as stompp_jax.main (and the export) parse them: --config (file, argument,
  overrides) loaded and locked, --workdir / --out as strings."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, lock_config=True,
                                  sys_argv=['prog', *args])
  for name in ('workdir', 'out', 'recalibrate_bn_batches'):
    flags.DEFINE_string(name, None, name, flag_values=values)
  values(['prog', *args])
  return values


def validate(command: str, context: str, where: str = '') -> None:
  """Raises what a run of `command` would refuse before training, on a fresh machine, or an
  AssertionError when it needs data prepared and neither `context` says where that is shown
  nor the command is shown on that page (`where`, docs/data.md). Call with the working
  directory at the repository root and a fresh environment."""
  env, module, args = _split(command)
  os.environ.update(env)
  values = parse_command(args)
  assert values.config is not None, f'{command}: no --config'
  experiment.check_config(values.config)
  if module == 'stompp_jax.export':
    assert values.out, f'{command}: no --out'
    return
  assert values.workdir, f'{command}: no --workdir'
  workdir_lib.check_workdir(values.workdir)
  needed = sources.requirement(values.config.data)
  assert not needed or where == _DATA_PAGE or _PREPARATION_LINK.search(context), (
      f'{command} needs {needed} first, and nothing beside it says so: link docs/data.md or'
      ' docs/reproducing.md just before it')


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
  """The repository as working directory, an empty home, no $STOMPP_DATA_DIR; restores the
  environment afterwards (validate() applies a command's own assignments)."""
  monkeypatch.chdir(REPO)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  for name in ('STOMPP_DATA_DIR', 'XDG_CACHE_HOME'):
    monkeypatch.delenv(name, raising=False)
  saved = dict(os.environ)
  yield
  os.environ.clear()
  os.environ.update(saved)


def test_every_documented_command_is_covered():
  documented = documented_commands()
  missing = {c: where for c, (where, _) in documented.items() if c not in COVERAGE}
  assert not missing, f'commands no test runs or parses (add them to COVERAGE): {missing}'
  stale = sorted(set(COVERAGE) - set(documented))
  assert not stale, f'COVERAGE lists commands the docs no longer show: {stale}'


def _validated(command: str) -> bool:
  _, module, args = _split(command)
  return (COVERAGE[command] != USAGE and module in _VALIDATED_MODULES
          and (module == 'stompp_jax.main' or any(a.startswith('--config=') for a in args)))


@pytest.mark.parametrize('command', sorted(c for c in COVERAGE if c in documented_commands()
                                           and _validated(c)))
def test_documented_command_parses_and_passes_the_checks_before_training(command, fresh_machine):
  where, context = documented_commands()[command]
  validate(command, context, where)


@pytest.mark.parametrize('command', sorted(c for c, how in COVERAGE.items()
                                           if how not in (USAGE, PARSE, STDLIB)))
def test_the_test_that_runs_a_command_exists_and_names_its_module(command):
  file_name, test_name = COVERAGE[command].split('::')
  with open(os.path.join(REPO, 'tests', file_name), encoding='utf-8') as f:
    text = f.read()
  assert re.search(rf'^def {test_name}\(', text, re.M), COVERAGE[command]
  assert _split(command)[1] in text, f'{file_name} does not name {_split(command)[1]}'


@pytest.mark.parametrize('command', sorted(c for c, how in COVERAGE.items() if how == PARSE))
def test_a_parsed_command_is_validated_here(command):
  assert _validated(command), f'{command}: no test runs it and nothing here validates it'


@pytest.mark.parametrize('command', sorted(c for c, how in COVERAGE.items() if how == STDLIB))
def test_a_standard_library_command_names_a_standard_library_module(command):
  assert _split(command)[1] in sys.stdlib_module_names, command


@pytest.mark.parametrize('command', sorted(c for c, how in COVERAGE.items() if how == USAGE))
def test_a_usage_line_has_a_placeholder(command):
  assert _PLACEHOLDER.search(command.split('python -m', 1)[1]), (
      f'{command} is concrete: run it in a test or parse it (PARSE)')


# Commands the docs once showed that failed as shown, with the text beside them then.
KNOWN_BAD = {
    # configs/imagenet.py's command: the tfds source cannot read a gs:// bucket.
    'python -m stompp_jax.main --workdir=gs://BUCKET/runs/in_r50_bnn_stompp'
    ' --config=configs/imagenet.py:model=resnet50,mode=bnn,method=stompp'
    ' --config.data.dir=gs://BUCKET/tensorflow_datasets':
        ('ImageNet (ILSVRC2012) experiments of the papers (docs/method.md), one family with'
         ' arguments.', 'mount-data'),
    # The README's first reproduction example, when configs/cifar.py read only tfds (the
    # override restores that): CIFAR-100 prepared with TensorFlow, and nothing said so.
    'python -m stompp_jax.main --config=configs/cifar.py:dataset=cifar100,model=resnet50,'
    'method=ste --workdir=runs/c100_r50_ste --config.data.source=tfds':
        ('# ResNet-50 BNN, CIFAR-100, STE baseline vs StoMPP vs StoMPP+STE (docs/method.md:'
         ' 26.7 / 40.2 / 46.5)', 'prepared by tfds'),
}


@pytest.mark.parametrize('command', sorted(KNOWN_BAD))
def test_known_bad_commands_fail(command, fresh_machine):
  context, message = KNOWN_BAD[command]
  with pytest.raises((ValueError, AssertionError), match=message):
    validate(command, context)


def test_the_docs_summary_command_prints_resnet50():
  command = 'python -m stompp_jax.models.summary --config=configs/imagenet_r50.py'
  assert command in COVERAGE
  result = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('resnet50, mode bnn, input 224x224x3, 1000 classes'), (
      result.stdout[:2000])
  assert 'stage4_block2/conv3' in result.stdout, result.stdout[-2000:]
  # ResNet-50's parameters as torchvision counts them (torchvision.models.resnet50).
  assert re.search(r'^trainable params +25,557,032$', result.stdout, re.MULTILINE), (
      result.stdout[-2000:])


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
