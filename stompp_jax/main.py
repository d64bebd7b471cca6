"""Command line: python -m stompp_jax.main --config=configs/<file>.py[:args] --workdir=DIR.

Running the same command again resumes from the newest checkpoint in DIR.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stompp_jax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics).', required=True)
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, optionally :args.', lock_config=True)


def _hide_checkpoint_library_logs(record) -> bool:
  """orbax logs every save step by step at INFO; keep its warnings and errors only."""
  return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_hide_checkpoint_library_logs)
  train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
