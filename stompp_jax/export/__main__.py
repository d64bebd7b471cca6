"""Command line of the export (docs/export.md):

    python -m stompp_jax.export --workdir=RUN --out=DIR            # newest checkpoint of a run
    python -m stompp_jax.export --workdir=RUN --out=DIR --recalibrate_bn_batches=20
                                              # ... with re-estimated BatchNorm statistics
    python -m stompp_jax.export --config=configs/imagenet.py:model=resnet18 --out=DIR
                                                                   # initialized model (sizes)

writes DIR/manifest.json and DIR/tensors.npz and prints the size report; for a run also
DIR/model.jax_export (portable.py: the fully binary inference as a jax.export artefact, for any
model, also where the bit-packed export does not support the model). Exit status: 0
written; 2 bad input (no such run, no checkpoint, a model the export does not support), with
one line `Error: what is wrong: what to do`; 1 any other error.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from stompp_jax import errors
from stompp_jax.export import files
from stompp_jax.export import portable
from stompp_jax.export import sources


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  workdir, config, out = flags.FLAGS.workdir, flags.FLAGS.config, flags.FLAGS.out
  if (workdir is None) == (config is None):
    errors.fail('give exactly one of --workdir and --config: --workdir=RUN exports a trained run,'
          ' --config=FILE the initialized model of a config.', errors.EXIT_BAD_INPUT)
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO.
  try:
    if workdir is not None:
      try:  # First: its checks of the workdir are the ones users see.
        manifest = sources.export_workdir(workdir, out, flags.FLAGS.recalibrate_bn_batches)
      except NotImplementedError as e:
        print(f'bit-packed export not written: {e}')
        manifest = None
      portable_path = portable.export_run(workdir, out)
    else:
      portable_path = None
      manifest = sources.export_config(config, out,
                                       config_flags.get_config_filename(flags.FLAGS['config']))
  except NotImplementedError as e:
    errors.fail(f'Not exported: {e}', errors.EXIT_BAD_INPUT)
  except errors.USER_ERRORS as e:
    errors.fail(str(e), errors.exit_status(e))
  if manifest is not None:
    print(files.size_report(manifest))
    print(f'wrote {os.path.join(out, files.MANIFEST)} and {os.path.join(out, files.TENSORS)}')
  if portable_path is not None:
    print(f'wrote {portable_path} ({os.path.getsize(portable_path):,} bytes; jax.export, input'
          ' uint8 pixels: docs/export.md)')


if __name__ == '__main__':  # Flags defined here only: stompp_jax.main defines --workdir too.
  flags.DEFINE_string('workdir', None, 'Run directory: export its newest checkpoint.')
  flags.DEFINE_string('out', None, 'Directory for manifest.json and tensors.npz.', required=True)
  flags.DEFINE_integer(
      'recalibrate_bn_batches', 0, 'With --workdir: fold BatchNorm statistics re-estimated on the'
      ' fully binary network over this many training batches (0 = the running statistics:'
      ' docs/export.md says when to re-estimate).')
  config_flags.DEFINE_config_file(
      'config', None, 'Instead of --workdir: export the initialized model of this config.')
  app.run(main)
