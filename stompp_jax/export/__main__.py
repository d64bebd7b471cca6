"""Command line of the export (docs/export.md):

    python -m stompp_jax.export --workdir=RUN --out=DIR            # newest checkpoint of a run
    python -m stompp_jax.export --workdir=RUN --out=DIR --recalibrate_bn_batches=20
                                              # ... with re-estimated BatchNorm statistics
    python -m stompp_jax.export --workdir=RUN --out=DIR --allow_unfinished
                                              # ... of a run without done.json
    python -m stompp_jax.export --config=configs/imagenet.py:model=resnet18 --out=DIR
                                                                   # initialized model (sizes)

writes DIR/manifest.json and DIR/tensors.npz and prints the size report; for a run also
DIR/model.jax_export (portable.py: the fully binary inference as a jax.export artefact, for any
model, also where the bit-packed export does not support the model); each file is written
whole, and only once every check of the run has passed. Exit status: 0 written; 2 bad input
(a bad flag or argument, no such run, no checkpoint, an unfinished run without
--allow_unfinished, a model the export does not support), with one line `Error: what is wrong:
what to do` and nothing written; 1 any other error.
"""

import os
from typing import Optional

from absl import flags
from absl import logging
from ml_collections import config_flags

from stompp_jax import errors
from stompp_jax import flag_errors
from stompp_jax import storage
from stompp_jax.export import files
from stompp_jax.export import portable
from stompp_jax.export import program
from stompp_jax.export import sources


def export_run(workdir: str, out: str, recalibrate_bn_batches: int,
               allow_unfinished: bool) -> tuple[Optional[dict], str]:
  """Writes the bit-packed export (when the model is supported) and the portable one of a run,
  from one restore and one re-estimation of the statistics, once both have passed every check;
  returns (the manifest or None, the portable file)."""
  run = sources.read_run(workdir, recalibrate_bn_batches, allow_unfinished=allow_unfinished)
  try:
    manifest, tensors = sources.fold_run(run)
  except program.UnsupportedModelError as e:
    print(f'bit-packed export not written: {e}')
    manifest = tensors = None
  exported = portable.exported_model(run.net.model, run.variables, run.binarization,
                                     run.config.data, run.image_shape)
  if manifest is not None:
    files.write(out, manifest, tensors)
  return manifest, portable.write(out, exported)


def main(argv):
  del argv  # Flags only (flag_errors.run refuses other arguments).
  workdir, config, out = flags.FLAGS.workdir, flags.FLAGS.config, flags.FLAGS.out
  if (workdir is None) == (config is None):
    errors.fail('give exactly one of --workdir and --config: --workdir=RUN exports a trained run,'
          ' --config=FILE the initialized model of a config.', errors.EXIT_BAD_INPUT)
  run_only = [f'--{name}' for name in ('recalibrate_bn_batches', 'allow_unfinished')
              if flags.FLAGS[name].present]
  if config is not None and run_only:
    errors.fail(f'{" and ".join(run_only)} with --config: they apply to the export of a run;'
                ' use --workdir=RUN, or drop them for the initialized model.',
                errors.EXIT_BAD_INPUT)
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO.
  try:
    storage.check_output_directory(out, '--out')
    if workdir is not None:
      manifest, portable_path = export_run(workdir, out, flags.FLAGS.recalibrate_bn_batches,
                                           flags.FLAGS.allow_unfinished)
    else:
      portable_path = None
      manifest = sources.export_config(config, out,
                                       config_flags.get_config_filename(flags.FLAGS['config']))
  except program.UnsupportedModelError as e:
    errors.fail(f'Not exported: {e}', errors.EXIT_BAD_INPUT)
  except errors.USER_ERRORS as e:
    errors.fail(str(e), errors.exit_status(e))
  if manifest is not None:
    print(files.size_report(manifest))
    print(f'wrote {os.path.join(out, files.MANIFEST)} and {os.path.join(out, files.TENSORS)}')
  if portable_path is not None:
    size = storage.path(portable_path).stat().length
    print(f'wrote {portable_path} ({size:,} bytes; jax.export, input uint8 pixels:'
          ' docs/export.md)')


if __name__ == '__main__':  # Flags defined here only: stompp_jax.main defines --workdir too.
  flags.DEFINE_string('workdir', None, 'Run directory: export its newest checkpoint.')
  flags.DEFINE_string('out', None, 'Directory for manifest.json and tensors.npz (and, with'
                      ' --workdir, model.jax_export).', required=True)
  flags.DEFINE_integer(
      'recalibrate_bn_batches', 0, 'With --workdir: fold BatchNorm statistics re-estimated on the'
      ' fully binary network over this many training batches (0 = the running statistics:'
      ' docs/export.md says when to re-estimate).')
  flags.DEFINE_bool(
      'allow_unfinished', False, 'With --workdir: export the newest checkpoint of a run that has'
      ' not finished (no done.json: preempted or still training).')
  config_flags.DEFINE_config_file(
      'config', None, 'Instead of --workdir: export the initialized model of this config.')
  flag_errors.run(main, 'python -m stompp_jax.export')
