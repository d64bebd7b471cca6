"""Command line: python -m stompp_jax.main --config=configs/<file>.py[:args] --workdir=DIR.

Running the same command again resumes from the newest checkpoint in DIR.

Exit status: 0 finished (DIR/done.json written); 75 preempted by SIGTERM after saving a
checkpoint (EX_TEMPFAIL: run the same command again to resume); 2 bad input found before DIR
was written (config, data, devices, another run in DIR); 1 any other error. Errors the user can
fix print one line, `Error: what is wrong: what to do`; --verbosity=1 also logs the traceback.

Output: INFO lines of stompp_jax (data, site table, compiling, progress, evals) on stderr, and
one closing line on stdout (accuracy, wall time, the run directory, the TensorBoard command).
Any --verbosity shows every library's lines at that level.

On a CPU-only machine with glibc, the CLI makes malloc keep freed memory for reuse (`keep_freed_memory`):
XLA's CPU runtime allocates each step's temporaries afresh, and glibc serves any block over 32 MB
with a new mmap, so every step page-faulted its whole temporary buffer in again (system time;
benchmarks/cpu_throughput.py, docs/results.md). Any malloc setting of the user's own
(GLIBC_TUNABLES, MALLOC_*_ variables, LD_PRELOAD of another allocator) leaves it untouched.
"""

import ctypes
import importlib.metadata
import importlib.util
import logging as python_logging
import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from stompp_jax import checkpoints
from stompp_jax import errors
from stompp_jax import train
from stompp_jax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics).', required=True)
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, optionally :args.', lock_config=True)


_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), '')


def _hide_checkpoint_library_logs(record) -> bool:
  """orbax logs every save step by step at INFO, gcsfs every file it opens; keep their warnings
  and errors only."""
  return (record.levelno >= python_logging.WARNING
          or not any(name in record.pathname for name in ('/orbax/', '/gcsfs/')))


def _only_our_info(record) -> bool:
  """The default output: warnings and errors of every library, INFO lines of stompp_jax only
  (not JAX's backend probing, `Unable to initialize backend 'tpu'`, nor orbax's saves)."""
  return record.levelno >= python_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def closing_line(config, workdir: str, result: dict, seconds: float) -> str:
  """The last line of a run: accuracy, data, wall time, where the run is, how to look at it."""
  accuracy = result.get('eval_fully_binary_accuracy', result.get('eval_accuracy'))
  what = 'fully binary accuracy' if 'eval_fully_binary_accuracy' in result else 'accuracy'
  score = f'{what} {100 * accuracy:.2f}%' if accuracy is not None else 'no eval yet'
  status = 'Preempted' if result.get('preempted') else 'Done'
  tensorboard = os.path.join(workdir, workdir_lib.TENSORBOARD)
  return (f'{status}: {score} on {config.data.name} ({config.data.source}) at step '
          f'{result.get("step")}, {train.format_duration(seconds)} wall time. The run is in '
          f'{workdir}; curves: tensorboard --logdir={tensorboard}')


def _fail(message: str, status: int) -> None:
  logging.debug('The error in full:', exc_info=True)
  print(f'Error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.exit(status)


def run(config, workdir: str) -> int:
  """Trains like `train.train_and_evaluate` and returns the exit status; user errors print one
  line (other exceptions propagate with their traceback)."""
  start = time.perf_counter()
  try:
    result = train.train_and_evaluate(config, workdir)
  except errors.USER_ERRORS as e:
    _fail(str(e), errors.exit_status(e))
  except OSError as e:
    if not checkpoints.is_disk_full(e):
      raise
    _fail(f'Disk full ({e}): free space in or move --workdir={workdir} and run the same command'
          ' again; it resumes from the newest checkpoint.', errors.EXIT_ERROR)
  print(closing_line(config, workdir, result, time.perf_counter() - start), flush=True)
  return errors.EXIT_PREEMPTED if result.get('preempted') else errors.EXIT_OK


def _config_error(text: str, argv: list[str]) -> str:
  """One line for an error of --config's file: missing, or its get_config(arg) refused arg."""
  given = next((a.partition('=')[2] for a in argv[1:] if a.startswith('--config=')), '')
  path = given.partition(':')[0]
  if not os.path.isfile(path):
    return (f'--config={given}: no config file {path!r}: give a file of configs/ (e.g.'
            ' --config=configs/default.py or --config=configs/cifar.py:model=resnet20).')
  raised = re.findall(r'^\w*(?:Error|Exception): (.+)$', text, re.M)
  cause = raised[-1] if raised else text.strip().splitlines()[-1]
  return f'--config={given}: {cause}'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors (exit 2): a missing config file, an argument its
  get_config refuses, an unknown flag, and an override of a config field that does not exist
  (ml_collections raises AttributeError or KeyError from inside the parser)."""
  try:
    remaining = flags.FLAGS(argv)
    flags.FLAGS.config.keys()  # ml_collections reports a missing config file when it is read.
    return remaining
  except OSError as e:
    _fail(_config_error(str(e), argv), errors.EXIT_BAD_INPUT)
  except (AttributeError, KeyError) as e:
    text = str(e).replace('\\n', '\n').replace("\\'", "'")
    names = re.findall(r"'(\w+)'", text)
    if not names:
      raise
    field = names[0]
    overrides = [a.split('=')[0].lstrip('-') for a in argv[1:] if a.startswith('--config.')]
    given = next((o for o in overrides if field in o.split('.')[1:]), f'config.…{field}')
    hint = re.search(r'Did you mean "(\w+)"', text)
    suggestion = f' (did you mean {hint.group(1)!r}?)' if hint else ''
    _fail(f'--{given}: the config has no field {field!r}{suggestion}: configs/default.py'
          ' lists every field.', errors.EXIT_BAD_INPUT)
  except flags.Error as e:
    text = str(e)
    if 'config file' in text or 'Attempted' in text:
      _fail(_config_error(text, argv), errors.EXIT_BAD_INPUT)
    _fail(f'{text.strip().splitlines()[0]}: python -m stompp_jax.main --helpshort lists'
          ' the flags.', errors.EXIT_BAD_INPUT)


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache for the CLI: JAX_COMPILATION_CACHE_DIR when set, else
  $XDG_CACHE_HOME/stompp_jax/jax_cache (~/.cache/...). A resumed or repeated run loads its
  compiled programs instead of compiling them again (minutes for ResNet-50 on a pod)."""
  if not jax.config.jax_compilation_cache_dir:
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache, 'stompp_jax', 'jax_cache'))


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (glibc malloc.h).
_USER_MALLOC_SETTINGS = ('GLIBC_TUNABLES', 'LD_PRELOAD', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_',
                         'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_', 'MALLOC_TRIM_THRESHOLD_')


def cpu_only() -> bool:
  """Whether JAX can only run on the CPU here: JAX_PLATFORMS=cpu, or no accelerator plugin
  (jax_plugins package or entry points, libtpu) is installed. Decided without starting a backend."""
  if os.environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return True
  return (not importlib.metadata.entry_points(group='jax_plugins')
          and all(importlib.util.find_spec(name) is None for name in ('jax_plugins', 'libtpu')))


def keep_freed_memory() -> bool:
  """glibc malloc with one arena, no mmap and no trimming, so freed blocks are reused; True if set.

  Skipped when the user's environment sets any of _USER_MALLOC_SETTINGS, or malloc is not
  glibc's. The process's RSS then stays at its high-water mark instead of shrinking between
  steps.
  """
  if any(name in os.environ for name in _USER_MALLOC_SETTINGS):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  # One arena: a thread arena serves a block larger than its 64 MB heap with mmap whatever
  # M_MMAP_MAX says (seen: Eigen's conv packing buffers, 72 MB each, 12 per ResNet-20 step).
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if flags.FLAGS['verbosity'].present:
    logging.get_absl_handler().addFilter(_hide_checkpoint_library_logs)
  else:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_only_our_info)
  if cpu_only():
    keep_freed_memory()  # Before JAX starts its threads: they then share the one arena.
  enable_compilation_cache()
  sys.exit(run(flags.FLAGS.config, _WORKDIR.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=_parse_flags)
