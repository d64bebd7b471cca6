"""What is exported: a run's newest checkpoint, an initialized model, or given variables.

    manifest = sources.export_workdir('RUN', 'DIR')          # RUN/config.json builds the model
    manifest, tensors = sources.fold_workdir('RUN')          # the same, nothing written
    manifest, tensors = sources.fold_run(sources.read_run('RUN', 20))  # re-estimated statistics
    manifest = sources.export_config(config, 'DIR')          # sizes of an untrained model
    manifest = sources.export_variables('DIR', config=..., variables=..., ...)
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from stompp_jax import checkpoints
from stompp_jax import errors
from stompp_jax import experiment
from stompp_jax import recalibrate
from stompp_jax import storage
from stompp_jax import workdir as workdir_lib
from stompp_jax.binary import context as bctx
from stompp_jax.choices import check_at_least
from stompp_jax.data import pipeline
from stompp_jax.export import files
from stompp_jax.export import program
from stompp_jax.export.fold import Tensor
from stompp_jax.models import summary as summary_lib


def exportable_build(config: Any, *, num_classes: int,
                     image_shape: tuple[int, int, int]) -> experiment.ModelBuild:
  """The model of `config` and its one trace, once the export has accepted the model.

  Raises:
    program.UnsupportedModelError: the model is not a ResNet of models/resnet.py
      (`check_exportable`).
  """
  net = experiment.build_model(config, num_classes=num_classes, image_shape=image_shape)
  program.check_exportable(net.model, config.model.name)
  return net


def fold_variables(*, config: Any, variables: dict, num_classes: int,
                   image_shape: tuple[int, int, int], source: dict[str, Any],
                   checkpoint_state_bytes: Optional[int] = None,
                   net: Optional[experiment.ModelBuild] = None) -> tuple[dict, dict[str, Tensor]]:
  """(manifest, tensors) of the export of `variables` of the model `config` describes; nothing
  is written (`files.write` writes them).

  Args:
    config: the run's ConfigDict (its `model` section builds the model).
    variables: {'params', 'batch_stats'} (float32 latent weights and statistics).
    num_classes, image_shape: as the model was built for training.
    source: where the variables come from (workdir and step, or config).
    checkpoint_state_bytes: the size on disk of the train state they were restored from.
    net: `exportable_build` of the same config and shapes, when the caller has it already.

  Raises:
    program.UnsupportedModelError: a model or a layer the export does not support.
  """
  model_config = config.model
  if net is None:
    net = exportable_build(config, num_classes=num_classes, image_shape=image_shape)
  summary = net.summary(model_config)
  ops, tensors = program.build_program(model_config, variables, trace=net.trace, summary=summary)
  manifest = files.make_manifest(
      model=dict(name=model_config.name, mode=model_config.mode, stem=model_config.stem,
                 num_classes=num_classes, image_shape=list(image_shape),
                 binary_include=list(model_config.binary_include),
                 binary_exclude=list(model_config.binary_exclude)),
      source=source, ops=ops, tensors=tensors,
      float32_model_bytes=4 * summary_lib.count_values(variables),
      summary_memory_bytes=summary.memory_bytes, summary_compression=summary.compression,
      checkpoint_state_bytes=checkpoint_state_bytes)
  return manifest, tensors


def export_variables(out_dir: str, **fold_args: Any) -> dict:
  """Writes `fold_variables(**fold_args)` into `out_dir` (manifest.json and tensors.npz, created
  or overwritten: `files.write`); returns the manifest."""
  manifest, tensors = fold_variables(**fold_args)
  files.write(out_dir, manifest, tensors)
  return manifest


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """The newest checkpoint of a run, as both exports take it (`read_run`).

  Attributes:
    config: its config.json.
    net: the zoo model of its config and its one trace.
    binarization: its static binarization settings and site table.
    variables: {'params', 'batch_stats'} as numpy arrays; the statistics re-estimated when
      `source['recalibrated_bn_batches']` says so.
    num_classes, image_shape: its data's, as the model was built for training.
    source: {'workdir', 'step'[, 'recalibrated_bn_batches']} for the manifest.
    checkpoint_state_bytes: the size on disk of the train state the variables come from.
  """

  config: ml_collections.ConfigDict
  net: experiment.ModelBuild
  binarization: bctx.BinarizationConfig
  variables: dict
  num_classes: int
  image_shape: tuple[int, int, int]
  source: dict[str, Any]
  checkpoint_state_bytes: int


def read_run(workdir: str, recalibrate_bn_batches: int = 0, *,
             allow_unfinished: bool = False) -> SavedRun:
  """The newest checkpoint of the run in `workdir` (its config.json builds the model).

  `recalibrate_bn_batches` > 0 replaces the running BatchNorm statistics by statistics
  re-estimated on the fully binary network over that many of the run's training batches
  (stompp_jax/recalibrate.py); 0 (the default: docs/export.md says why) keeps them.
  `allow_unfinished` accepts a run without done.json (preempted or still training).

  Raises:
    errors.SetupError: `workdir` is not a run directory with a config and a checkpoint, the
      run is unfinished and not `allow_unfinished`, or `recalibrate_bn_batches` < 0.
  """
  check_at_least('--recalibrate_bn_batches', recalibrate_bn_batches, 0)
  if not storage.path(workdir).is_dir():
    raise errors.SetupError(f'--workdir={workdir} is not a directory: give the run directory'
                            ' of a trained run (the --workdir of its training command).')
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise errors.SetupError(f'{workdir} has no {workdir_lib.CONFIG}: give the run directory of'
                            ' a trained run (the --workdir of its training command).')
  config = ml_collections.ConfigDict(config)
  step, variables, state_bytes = checkpoints.read_variables(workdir)
  if workdir_lib.read_done(workdir) is None and not allow_unfinished:
    raise errors.SetupError(f'{workdir} is unfinished (no {workdir_lib.DONE}; newest checkpoint'
                            f' at step {step}): rerun its training command to finish it, or'
                            f' pass --allow_unfinished to export step {step}.')
  num_classes, image_shape = pipeline.input_shape(config.data)
  net = experiment.build_model(config, num_classes=num_classes, image_shape=image_shape)
  _, binarization = experiment.saved_run_binarization(
      config, net.sites, pipeline.dataset_info(config.data).train_size)
  source = dict(workdir=str(storage.path(workdir)), step=int(step))
  if recalibrate_bn_batches:
    variables = recalibrate.recalibrate_variables(config, net.model, binarization, variables,
                                                  recalibrate_bn_batches)
    source['recalibrated_bn_batches'] = recalibrate_bn_batches
  return SavedRun(config=config, net=net, binarization=binarization, variables=variables,
                  num_classes=num_classes, image_shape=image_shape, source=source,
                  checkpoint_state_bytes=state_bytes)


def fold_run(run: SavedRun) -> tuple[dict, dict[str, Tensor]]:
  """(manifest, tensors) of the bit-packed export of `run`; nothing is written.

  Raises:
    program.UnsupportedModelError: a model or a layer the export does not support.
  """
  program.check_exportable(run.net.model, run.config.model.name)
  return fold_variables(config=run.config, variables=run.variables,
                        num_classes=run.num_classes, image_shape=run.image_shape,
                        source=run.source, checkpoint_state_bytes=run.checkpoint_state_bytes,
                        net=run.net)


def fold_workdir(workdir: str, recalibrate_bn_batches: int = 0, *,
                 allow_unfinished: bool = False) -> tuple[dict, dict[str, Tensor]]:
  """`fold_run(read_run(...))`: the bit-packed export of the run in `workdir`, not written.

  Raises:
    errors.SetupError: as `read_run`.
    program.UnsupportedModelError: a model or a layer the export does not support.
  """
  return fold_run(read_run(workdir, recalibrate_bn_batches, allow_unfinished=allow_unfinished))


def export_workdir(workdir: str, out_dir: str, recalibrate_bn_batches: int = 0, *,
                   allow_unfinished: bool = False) -> dict:
  """Writes `fold_workdir(workdir, ...)` into `out_dir` (`files.write`); returns the manifest."""
  manifest, tensors = fold_workdir(workdir, recalibrate_bn_batches,
                                   allow_unfinished=allow_unfinished)
  files.write(out_dir, manifest, tensors)
  return manifest


def export_config(config: ml_collections.ConfigDict, out_dir: str,
                  config_name: Optional[str] = None) -> dict:
  """Exports the initialized (untrained) model of `config`: sizes do not depend on training.

  Raises:
    errors.SetupError: a bad config field (nothing is written).
    program.UnsupportedModelError: a model the export does not support (before compiling its
      init).
  """
  experiment.check_config(config)
  num_classes, image_shape = pipeline.input_shape(config.data)
  net = exportable_build(config, num_classes=num_classes, image_shape=image_shape)
  init = jax.jit(net.model.init, static_argnames='train')
  variables = jax.device_get(init(jax.random.PRNGKey(config.seed), jnp.zeros((1, *image_shape)),
                                  train=False))
  return export_variables(out_dir, config=config, variables=dict(variables),
                          num_classes=num_classes, image_shape=image_shape,
                          source=dict(config=config_name, initialized=True, seed=config.seed),
                          net=net)
