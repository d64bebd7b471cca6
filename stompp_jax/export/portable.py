"""Portable export: the fully binary network's inference as one `jax.export` artefact.

    python -m stompp_jax.export --workdir=RUN --out=DIR      # also writes DIR/model.jax_export
    portable.export_run(RUN, DIR, model=MyNet())             # a run of your own model
    portable.export_run(RUN, DIR, allow_unfinished=True)     # a run without done.json

Run it wherever JAX runs, without this project (nor Flax) installed:

    import jax
    with open('DIR/model.jax_export', 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    logits = exported.call(pixels)      # uint8 (B, H, W, C) -> float32 (B, num_classes)

Input: raw uint8 pixels, any batch size B (a symbolic dimension), H x W x C as the model was
trained (CIFAR: 32x32x3 as stored; ImageNet: 224x224x3 after the eval resize to 256 and
center crop), channels in the training data's order. The training normalization
(pixels - 255 * mean) / (255 * std) per channel runs inside, in float32 as the data pipeline
does. Output: the logits of the fully binary network (every mask = 1), the network that the
training's `eval_fully_binary_*` metrics evaluate. The parameters are constants of the
program (latent float32 kernels, signed inside), so the file is about the float32 model's size:
it trades the bit-packed export's compactness (manifest.json + tensors.npz) for running anywhere, on any model,
including the ones that export cannot walk (MobileNetV2, Bi-Real Net, your own model).
Lowered for PLATFORMS; `exported.platforms` lists them.
"""

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from stompp_jax import evaluate
from stompp_jax import recalibrate
from stompp_jax import storage
from stompp_jax.binary import context as bctx
from stompp_jax.choices import check_at_least
from stompp_jax.data import pipeline

FILE = 'model.jax_export'
PLATFORMS = ('cpu', 'cuda', 'tpu')


def fully_binary_inference(model: Any, variables: dict, binarization: bctx.BinarizationConfig,
                           offset: np.ndarray, scale: np.ndarray) -> Callable[[jax.Array], jax.Array]:
  """pixels uint8 (B, H, W, C) -> float32 logits (B, K) of the fully binary network.

  `model` as train.py takes it (a zoo model or models.from_module); `variables` its
  {'params', 'batch_stats'}; `offset`, `scale` float32 (C,) the data's normalization.
  """
  ctx = bctx.BinarizationContext(step=jnp.zeros((), jnp.int32), key=jnp.zeros((2,), jnp.uint32),
                                 config=binarization, fully_binary=True)

  def infer(pixels: jax.Array) -> jax.Array:
    images = (pixels.astype(jnp.float32) - offset) * scale
    return model.apply(variables, images, train=False, ctx=ctx).astype(jnp.float32)

  return infer


def export_inference(infer: Callable[[jax.Array], jax.Array],
                     image_shape: tuple[int, int, int]) -> jax.export.Exported:
  """`infer` lowered for PLATFORMS on uint8 (batch, *image_shape) pixels, batch symbolic."""
  batch, = jax.export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
  return jax.export.export(jax.jit(infer), platforms=PLATFORMS)(spec)


def exported_model(model: Any, variables: dict, binarization: bctx.BinarizationConfig,
                   data_config: Any, image_shape: tuple[int, int, int]) -> jax.export.Exported:
  """The artefact of `model` with `variables` ({'params', 'batch_stats'}), not written; the
  input normalization is the one `data_config` (a config's `data` section) trains with."""
  infer = fully_binary_inference(model, variables, binarization,
                                 *pipeline.normalization(data_config))
  return export_inference(infer, tuple(image_shape))


def exported_run(workdir: str, *, model: Any = None, allow_unfinished: bool = False,
                 recalibrate_bn_batches: int = 0) -> jax.export.Exported:
  """The artefact of the newest checkpoint of the run in `workdir`, not written.

  `model`: the Linen model of a run of your own model (None: the zoo model of its config);
  `allow_unfinished`: accept a run that has not finished (`evaluate.load_run`);
  `recalibrate_bn_batches` > 0: with BatchNorm statistics re-estimated on the fully binary
  network over that many of the run's training batches, the same ones the bit-packed export
  folds (`recalibrate.recalibrate_variables`), instead of the running statistics.

  Raises:
    evaluate.RunError, errors.SetupError: as `evaluate.load_run` (no run, an unfinished run, no
      checkpoint); a negative `recalibrate_bn_batches`.
  """
  check_at_least('--recalibrate_bn_batches', recalibrate_bn_batches, 0)
  run = evaluate.load_run(workdir, model=model, allow_unfinished=allow_unfinished)
  variables = jax.device_get({'params': run.state.params, 'batch_stats': run.state.batch_stats})
  if recalibrate_bn_batches:
    variables = recalibrate.recalibrate_variables(run.config, run.model, run.binarization,
                                                  variables, recalibrate_bn_batches)
  return exported_model(run.model, variables, run.binarization, run.config.data,
                        run.info.image_shape)


def write(out_dir: str, exported: jax.export.Exported) -> str:
  """(Over)writes out_dir/FILE whole (`storage.write_bytes`; local or gs://, `out_dir` created
  if missing); returns its path."""
  storage.write_bytes(storage.path(out_dir) / FILE, exported.serialize())
  return os.path.join(out_dir, FILE)


def export_run(workdir: str, out_dir: str, *, model: Any = None, allow_unfinished: bool = False,
               recalibrate_bn_batches: int = 0) -> str:
  """Writes out_dir/FILE for the newest checkpoint of the run in `workdir` (`exported_run`);
  returns the path written."""
  return write(out_dir, exported_run(workdir, model=model, allow_unfinished=allow_unfinished,
                                     recalibrate_bn_batches=recalibrate_bn_batches))
