"""Bad input through the real command lines: one line `Error: what is wrong: what to do`, exit
status 2, nothing written, and no compile before it.

Most cases run `stompp_jax.main`'s flag parser and entry in this process (fast: no JAX start
per case); the config-file, workdir and export cases also run as true subprocesses.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from helpers import REPO
import reliability_utils as ru
from stompp_jax import compiler
from stompp_jax import errors
from stompp_jax import flag_errors
from stompp_jax import main as cli

BASE = [f'--config.{k}={v}' for k, v in ru.TINY_FLAGS.items()]
_LOG_LINE = re.compile(r'^[IWEF]\d{4} ')  # absl log lines (INFO about backends, say).

# (override flags, the one line's pattern): every positive-integer and range field.
FIELD_CASES = [
    (['--config.train.batch_size=0'], r'train\.batch_size=0 is not a positive integer: set'),
    (['--config.train.log_every=0'], r'train\.log_every=0 is not a positive integer'),
    (['--config.train.checkpoint_every=0'], r'train\.checkpoint_every=0 is not a positive'),
    (['--config.train.eval_batch_size=0'], r'train\.eval_batch_size=0 is not a positive'),
    (['--config.train.keep_checkpoints=0'], r'train\.keep_checkpoints=0 is not a positive'),
    (['--config.train.num_steps=-1'], r'train\.num_steps=-1 is not an integer >= 0'),
    (['--config.train.eval_every=-5'], r'train\.eval_every=-5 is not an integer >= 0'),
    (['--config.train.eval_steps=-1'], r'train\.eval_steps=-1 is not an integer >= 0'),
    (['--config.train.num_steps=0', '--config.train.num_epochs=-1.0'],
     r'train\.num_epochs=-1\.0 is not a finite number >= 0: set train\.num_epochs to a finite'
     r' number >= 0 \(it sets the length unless train\.num_steps > 0\)\.$'),
    (['--config.train.num_steps=0', '--config.train.num_epochs=inf'],
     r'train\.num_epochs=inf is not a finite number >= 0'),
    (['--config.binary.refresh_every=-1'], r'binary\.refresh_every=-1 is not an integer >= 0'),
    (['--config.mesh.num_devices=-1'], r'mesh\.num_devices=-1 is not an integer >= 0'),
    (['--config.data.image_size=-1'], r'data\.image_size=-1 is not an integer >= 0'),
    (['--config.data.num_workers=-1'], r'data\.num_workers=-1 is not an integer >= 0'),
    (['--config.data.prefetch=-1'], r'data\.prefetch=-1 is not an integer >= 0'),
    (['--config.data.synthetic_train_size=0'], r'data\.synthetic_train_size=0 is not a positive'),
    (['--config.data.synthetic_eval_size=0'], r'data\.synthetic_eval_size=0 is not a positive'),
    (['--config.data.synthetic_num_classes=-2'], r'data\.synthetic_num_classes=-2 is not an'),
    (['--config.optim.warmup_epochs=-1.0'], r'optim\.warmup_epochs=-1\.0 is not a finite number'
                                            r' >= 0: set .* \(0 = off\)\.$'),
    (['--config.optim.grad_clip_norm=-1.0'], r'optim\.grad_clip_norm=-1\.0 is not a finite'),
    (['--config.optim.weight_decay=inf'], r'optim\.weight_decay=inf is not a finite number >= 0'),
    (['--config.optim.learning_rate=nan'], r'optim\.learning_rate=nan is not a finite number > 0'),
    (['--config.optim.learning_rate=-0.1'], r'optim\.learning_rate=-0\.1 is not a finite number'),
    (['--config.optim.momentum=1.5'], r'optim\.momentum=1\.5 is not a number in \[0, 1\): set'),
    (['--config.optim.name=adam', '--config.optim.b2=1.0'], r'optim\.b2=1\.0 is not a number in'),
    (['--config.model.name=mobilenet_v2', '--config.model.width_multiplier=0.0'],
     r'model\.width_multiplier=0\.0 is not a finite number > 0: .* \(1\.0 = the standard width\)'),
    (['--config.model.dtype=float16'], r"Unknown model\.dtype 'float16': use one of float32"),
    (['--config.model.stem=big'], r"Unknown model\.stem 'big': use one of auto, cifar"),
    (['--config.train.on_nonfinite=ignore'], r"Unknown train\.on_nonfinite 'ignore'"),
    (['--config.binary.order=random'], r"Unknown binary\.order 'random': use one of layerwise"),
    (['--config.binary.masks_by=when'], r"Unknown binary\.masks_by 'when': use one of auto, cond"),
    (['--config.binary.residuals=floats'], r"Unknown binary\.residuals 'floats': use one of auto"),
    (['--config.binary.committed_backward=never'],
     r"Unknown binary\.committed_backward 'never': use one of auto, skip, full"),
    (['--config.binary.window_overlap=1.5'], r'binary\.window_overlap=1\.5 is not in \[0, 1\)'),
    (['--config.data.source=npz', '--config.data.dir=/nonexistent/stompp'],
     r'/nonexistent/stompp/train\.npz not found: data\.source=npz needs'),
    (['--config.train.batch_size=abc'], r"config\.train\.batch_size=abc: invalid literal .*"
                                        r"--helpshort lists the flags"),
    (['--bogus=1'], r"Unknown command line flag 'bogus'"),
    (['--config.train.batchsize=8'], r"^Error: --config\.train\.batchsize: the config has no field"
                                     r" 'batchsize' \(did you mean 'batch_size'\?\):"
                                     r" configs/default\.py lists every field\.$"),
    (['--config.model.name=resnet9'], r"^Error: Unknown model\.name 'resnet9': use one of resnet18"),
]


def _one_error_line(output: str) -> str:
  """The output's only line that is not an absl log line; it must be an `Error: ` line."""
  lines = [line for line in output.strip().splitlines() if not _LOG_LINE.match(line)]
  assert len(lines) == 1 and lines[0].startswith('Error: '), output
  assert 'Traceback' not in output, output
  return lines[0]


def _in_process(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
  """`python -m stompp_jax.main ARGV` in this process: (exit status, stderr).

  ml_collections defines the `--config.*` override flags from sys.argv when --config is
  parsed; those of the previous case are removed first.
  """
  argv = ['stompp_jax.main', *argv]
  monkeypatch.setattr(sys, 'argv', argv)
  for name in [name for name in flags.FLAGS if name.startswith('config.')]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exit_info:
    cli.main(flag_errors.parse_flags(argv))
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize('overrides, pattern', FIELD_CASES,
                         ids=[' '.join(o).replace('--config.', '') for o, _ in FIELD_CASES])
def test_bad_field_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, overrides,
                                                  pattern):
  workdir = tmp_path / 'run'
  status, output = _in_process([f'--config={ru.TINY_CONFIG}', f'--workdir={workdir}', *BASE,
                                *overrides], capsys, monkeypatch)
  assert status == errors.EXIT_BAD_INPUT, output
  assert re.search(pattern, _one_error_line(output)), output
  assert not workdir.exists()


def _subprocess(module: str, *argv: str) -> tuple[int, str]:
  result = subprocess.run([sys.executable, '-m', module, *argv], cwd=REPO, env=ru.cli_env(1),
                          capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout + result.stderr


def _a_file(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('not a directory\n')
  return path


@pytest.mark.parametrize('case', ['missing config file', 'misspelled family argument',
                                  'workdir is a file', 'workdir under a file'])
def test_cli_bad_path_or_argument_is_one_line_and_writes_nothing(tmp_path, case):
  workdir, file = tmp_path / 'run', _a_file(tmp_path)
  argv, pattern = {
      'missing config file': (['--config=configs/z.py', f'--workdir={workdir}'],
                              r"--config=configs/z\.py: no config file 'configs/z\.py':"
                              r" give a file of configs/"),
      'misspelled family argument': (
          ['--config=configs/cifar.py:datset=cifar100', f'--workdir={workdir}'],
          r"Bad config argument 'datset=cifar100': use key=value with keys dataset, model"),
      'workdir is a file': ([f'--config={ru.TINY_CONFIG}', f'--workdir={file}', *BASE],
                            r'is a file, not a directory: give a directory path'),
      'workdir under a file': ([f'--config={ru.TINY_CONFIG}', f'--workdir={file}/run', *BASE],
                               r'which is a file: give a directory path'),
  }[case]
  status, output = _subprocess('stompp_jax.main', *argv)
  assert status == errors.EXIT_BAD_INPUT, output
  assert re.search(pattern, _one_error_line(output)), output
  assert not workdir.exists() and file.read_text() == 'not a directory\n'
  assert sorted(os.listdir(tmp_path)) == ['a_file']


@pytest.mark.parametrize('case', ['missing workdir', 'workdir is a file', 'no checkpoint'])
def test_export_of_a_bad_workdir_is_one_line_and_writes_nothing(tmp_path, case):
  out, file, empty = tmp_path / 'out', _a_file(tmp_path), tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text('{}\n')
  workdir, pattern = {
      'missing workdir': (tmp_path / 'missing', r'is not a directory: give the run directory'),
      'workdir is a file': (file, r'is not a directory: give the run directory'),
      'no checkpoint': (empty, r'has no checkpoints/ directory: train a run there first'),
  }[case]
  status, output = _subprocess('stompp_jax.export', f'--workdir={workdir}', f'--out={out}')
  assert status == errors.EXIT_BAD_INPUT, output
  assert re.search(pattern, _one_error_line(output)), output
  assert not out.exists()


@pytest.mark.parametrize('module', ['stompp_jax.models.summary', 'stompp_jax.export'])
def test_a_bad_model_field_of_the_summary_or_the_config_export_is_one_line(tmp_path, module):
  out = tmp_path / 'out'
  argv = ['--config=configs/default.py', '--config.model.name=resnet19']
  status, output = _subprocess(module, *argv, *([f'--out={out}'] if 'export' in module else []))
  assert status == errors.EXIT_BAD_INPUT, output
  assert re.search(r"Unknown model\.name 'resnet19': use one of resnet18",
                   _one_error_line(output)), output
  assert not out.exists()


def test_a_bad_compiler_setting_is_one_line_and_writes_nothing(tmp_path):
  """STOMPP_JAX_CPU_COMPILER_OPTIONS is read before the run writes anything (compiler.py)."""
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'stompp_jax.main', f'--config={ru.TINY_CONFIG}',
       f'--workdir={workdir}', *BASE], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**ru.cli_env(1), compiler.SETTING: 'fast'})
  assert result.returncode == errors.EXIT_BAD_INPUT, result.stderr
  assert _one_error_line(result.stdout + result.stderr) == (
      "Error: STOMPP_JAX_CPU_COMPILER_OPTIONS='fast' is not one of project, xla: unset it for the"
      " project's CPU options, or set it to xla for XLA's defaults.")
  assert not workdir.exists()


@pytest.mark.parametrize('split', ['train', 'test'])
def test_npz_labels_outside_the_classes_are_refused_before_anything_is_written(tmp_path, split):
  """Either split's labels are read (not its images) before training: the eval split's were
  read only at the first eval, after the run had trained and written its workdir."""
  rng = np.random.default_rng(0)
  for name, size in (('train', 64), ('test', 16)):
    labels = np.full(size, 12) if name == split else rng.integers(0, 10, size)
    np.savez(tmp_path / f'{name}.npz', image=rng.integers(0, 255, (size, 16, 16, 3), np.uint8),
             label=labels)
  workdir = tmp_path / 'run'
  status, output = _subprocess(
      'stompp_jax.main', f'--config={ru.TINY_CONFIG}', f'--workdir={workdir}', *BASE,
      '--config.data.source=npz', f'--config.data.dir={tmp_path}', '--config.data.name=cifar10')
  assert status == errors.EXIT_BAD_INPUT, output
  assert _one_error_line(output) == (
      f'Error: {tmp_path}/{split}.npz: labels span [12, 12], outside [0, 10): check data.name and'
      ' data.cifar100_labels')
  assert not workdir.exists()
