"""Bad flags and arguments of every command line of the package (main, evaluate, preflight, the
model summary, analysis) as true subprocesses: one line `Error: what is wrong: what to do` on
stderr, exit status 2, nothing written. Also: a bug while the preflight compiles keeps its own
error (it is not reported as bad input).
"""

import json
import re
import subprocess
import sys

import jax
import pytest

from configs import tiny
from helpers import REPO
import reliability_utils as ru
from stompp_jax import errors
from stompp_jax import preflight


def _run(module: str, *argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *argv], cwd=REPO, env=ru.cli_env(1),
                        capture_output=True, text=True, timeout=120)


def _assert_one_error_line(done: subprocess.CompletedProcess, pattern: str) -> None:
  """Exit status 2, nothing on stdout, and stderr exactly one `Error: ` line matching
  `pattern`."""
  assert done.returncode == errors.EXIT_BAD_INPUT, done.stderr
  assert not done.stdout, done.stdout
  lines = done.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('Error: '), done.stderr
  assert re.search(pattern, lines[0]), lines[0]


# (module, the flags of a request that is fine but for the extra argument; {tmp}: a directory).
ABSL_COMMANDS = [
    ('stompp_jax.main', ['--config=configs/tiny.py', '--workdir={tmp}/run']),
    ('stompp_jax.evaluate', ['--workdir={tmp}/run']),
    ('stompp_jax.preflight', ['--config=configs/tiny.py', '--topology=v5e-4',
                              '--json={tmp}/out.json']),
    ('stompp_jax.models.summary', ['--config=configs/tiny.py']),
]


@pytest.mark.parametrize('module, argv', ABSL_COMMANDS, ids=[m for m, _ in ABSL_COMMANDS])
def test_an_extra_argument_is_one_line(tmp_path, module, argv):
  done = _run(module, *(a.format(tmp=tmp_path) for a in argv), 'extra')
  _assert_one_error_line(done, rf"^Error: Unexpected arguments 'extra': python -m {module}"
                               r' takes flags only')
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('module, argv, pattern', [
    ('stompp_jax.evaluate', ['--workdir=run', '--split=val'],
     r'flag --split=val: value should be one of <test\|train>: python -m stompp_jax\.evaluate'
     r' --helpshort lists the flags'),
    ('stompp_jax.preflight', ['--config=configs/tiny.py', '--topology=v5e-4', '--bogus=1'],
     r"Unknown command line flag 'bogus': python -m stompp_jax\.preflight --helpshort"),
    # A config file that is not there (the name in two parts: no text names a missing file).
    ('stompp_jax.models.summary', ['--config=configs/absent_' + 'config.py'],
     r"--config=configs/absent_config\.py: no config file 'configs/absent_config\.py'"),
], ids=['evaluate bad value', 'preflight unknown flag', 'summary missing config'])
def test_a_bad_flag_is_one_line(module, argv, pattern):
  _assert_one_error_line(_run(module, *argv), pattern)


def test_the_config_given_with_a_space_is_named(tmp_path):
  """`--config FILE:ARG` names FILE:ARG, as `--config=FILE:ARG` does, and the argument refused."""
  done = _run('stompp_jax.main', '--config', 'configs/tiny.py:bogus', f'--workdir={tmp_path}/run')
  _assert_one_error_line(done, r"^Error: --config=configs/tiny\.py:bogus: Bad config argument"
                               r" 'bogus'")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('case', ['missing', 'no metrics', 'no run directory'])
def test_analysis_of_a_directory_that_is_not_a_run_is_one_line(tmp_path, case):
  good = tmp_path / 'good'
  good.mkdir()
  (good / 'config.json').write_text(json.dumps({'model': {'name': 'resnet20'}}))
  (good / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 1.0,'
                                      ' "accuracy": 0.5}\n')
  empty = tmp_path / 'empty'
  empty.mkdir()
  out = tmp_path / 'plots'
  runs, pattern = {
      'missing': ([good, tmp_path / 'missing'], r'missing does not exist: give the --workdir'),
      'no metrics': ([good, empty], r'empty holds no metrics'),
      'no run directory': ([], r'the following arguments are required: RUN_DIR: python -m'
                               r' stompp_jax\.analysis RUN_DIR'),
  }[case]
  _assert_one_error_line(_run('stompp_jax.analysis', *map(str, runs), f'--out={out}'), pattern)
  assert not out.exists()


def test_a_bug_while_the_preflight_compiles_keeps_its_error(monkeypatch):
  """A ValueError of a bug is not turned into bad input (exit 2, no traceback); a config that
  `experiment.build` refuses still is (here: more devices than the slice has)."""
  monkeypatch.setattr(preflight, 'tpu_devices', lambda slice_: jax.devices()[:slice_.chips])
  config = tiny.get_config('fp')
  config.mesh.num_devices = 8
  with pytest.raises(errors.SetupError, match='mesh.num_devices=8 but only 4 devices'):
    preflight.preflight(config, 'v5e-4', ['fp'], log=lambda line: None)

  def bug(*args):
    raise ValueError('a bug of this package')

  monkeypatch.setattr(preflight, 'compile_steps', bug)
  with pytest.raises(ValueError, match='a bug of this package') as raised:
    preflight.preflight(tiny.get_config('fp'), 'v5e-4', ['fp'], log=lambda line: None)
  assert type(raised.value) is ValueError


@pytest.mark.parametrize('module', ['stompp_jax.analysis', 'stompp_jax.export'])
@pytest.mark.parametrize('where', ['a file', 'under a file'])
def test_an_out_that_cannot_be_a_directory_is_one_line(tmp_path, tiny_run, module, where):
  a_file = tmp_path / 'a_file'
  a_file.write_text('kept\n')
  out = a_file if where == 'a file' else a_file / 'plots'
  run_dir = [str(tiny_run)] if module == 'stompp_jax.analysis' else [f'--workdir={tiny_run}']
  done = _run(module, *run_dir, f'--out={out}')
  _assert_one_error_line(done, rf'^Error: --out={re.escape(str(out))} (is a file, not a directory'
                               r'|is under \S+, which is a file): give a directory path')
  assert a_file.read_text() == 'kept\n' and sorted(p.name for p in tmp_path.iterdir()) == ['a_file']


@pytest.mark.parametrize('module, argv, flag', [
    ('stompp_jax.main', ['--workdir={tmp}/run'], 'config'),
    ('stompp_jax.export', ['--workdir={tmp}/run'], 'out'),
])
def test_a_missing_required_flag_is_one_line(tmp_path, module, argv, flag):
  done = _run(module, *(a.format(tmp=tmp_path) for a in argv))
  _assert_one_error_line(done, rf'^Error: --{flag} is required: python -m {module} --helpshort'
                               ' lists the flags\\.$')
  assert not list(tmp_path.iterdir())
