"""Command line: python -m stompp_jax.main --config=configs/<file>.py[:args] --workdir=DIR.

Running the same command again resumes from the newest checkpoint in DIR.

Exit status: 0 finished (DIR/done.json written); 75 preempted by SIGTERM after saving a
checkpoint (EX_TEMPFAIL: run the same command again to resume); 2 bad input found before DIR
was written (config, data, devices, another run in DIR); 1 any other error. Errors the user can
fix print one line, `Error: what is wrong: what to do`; --verbosity=1 also logs the traceback.

Output: INFO lines of stompp_jax (data, site table, compiling, progress, evals) on stderr, and
one closing line on stdout (accuracy, wall time, the run directory, the TensorBoard command).
Any --verbosity shows every library's lines at that level.

On a CPU-only machine with glibc, the CLI makes malloc keep freed memory for reuse
(stompp_jax/allocator.py); flag errors print one line (stompp_jax/flag_errors.py).
"""

import logging as python_logging
import os
import sys
import time

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from stompp_jax import allocator
from stompp_jax import checkpoints
from stompp_jax import errors
from stompp_jax import flag_errors
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


def run(config, workdir: str) -> int:
  """Trains like `train.train_and_evaluate` and returns the exit status; user errors print one
  line (other exceptions propagate with their traceback)."""
  start = time.perf_counter()
  try:
    result = train.train_and_evaluate(config, workdir)
  except errors.USER_ERRORS as e:
    errors.fail(str(e), errors.exit_status(e))
  except OSError as e:
    if not checkpoints.is_disk_full(e):
      raise
    errors.fail(f'Disk full ({e}): free space in or move --workdir={workdir} and run the'
                     ' same command again; it resumes from the newest checkpoint.',
                     errors.EXIT_ERROR)
  print(closing_line(config, workdir, result, time.perf_counter() - start), flush=True)
  return errors.EXIT_PREEMPTED if result.get('preempted') else errors.EXIT_OK


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache for the CLI: JAX_COMPILATION_CACHE_DIR when set, else
  $XDG_CACHE_HOME/stompp_jax/jax_cache (~/.cache/...). A resumed or repeated run loads its
  compiled programs instead of compiling them again (minutes for ResNet-50 on a pod)."""
  if not jax.config.jax_compilation_cache_dir:
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    jax.config.update('jax_compilation_cache_dir', os.path.join(cache, 'stompp_jax', 'jax_cache'))


def main(argv):
  del argv  # Only the program's name: flag_errors.parse_flags refuses any other argument.
  if flags.FLAGS['verbosity'].present:
    logging.get_absl_handler().addFilter(_hide_checkpoint_library_logs)
  else:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_only_our_info)
  if allocator.cpu_only():
    allocator.keep_freed_memory()  # Before JAX starts its threads: they then share the one arena.
  enable_compilation_cache()
  sys.exit(run(flags.FLAGS.config, _WORKDIR.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  flag_errors.run(main, 'python -m stompp_jax.main')
