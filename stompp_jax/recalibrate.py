"""Re-estimated BatchNorm statistics of the fully binary network (issue 15, in the spirit of
PreciseBN, Wu & Johnson 2021).

The running statistics a run keeps were collected on the network as trained: mid-run a partly
continuous one, and at the end one whose binary weights may still be moving (STE, StoMPP+STE).
The deployed (fully binary) network can have other statistics. `Recalibrator` runs the fully
binary network in train mode (BatchNorm normalizes with batch statistics) over n training
batches and returns, for every BatchNorm, the plain average over the batches of its per-batch
mean and (biased, as flax's) variance: a true average, not an exponential moving one. The
train state is not changed; `recalibrate_variables` does the same for a checkpoint's variables
(the export's --recalibrate_bn_batches). train.train_and_evaluate evaluates the fully binary network with
these statistics as `eval_fully_binary_recalibrated_*` when train.recalibrate_bn_batches > 0.

Works sharded and multi-process: batches are global jax.Arrays, the per-batch reductions run
under jit over the whole global batch, and the result has the state's batch_stats shardings.
"""

from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from stompp_jax import compiler
from stompp_jax import layers
from stompp_jax import parallel
from stompp_jax import state as state_lib
from stompp_jax.binary import context as bctx
from stompp_jax.data import pipeline


def batch_statistics(model, binarization: bctx.BinarizationConfig, params: Any,
                     batch_stats: Any, images: jax.Array, step: jax.Array,
                     key: jax.Array) -> Any:
  """Per-BatchNorm statistics of one batch through the fully binary network (train mode).

  Args:
    model: the Flax model (BatchNorms are nn.BatchNorm with feature axis -1).
    binarization: static settings with the site table.
    params, batch_stats: the model's variables (batch_stats only seeds the mutable collection).
    images: float (B, H, W, C).
    step, key: the context's step and mask key (unused by a fully binary context's masks).

  Returns:
    A tree shaped like `batch_stats`: {'mean': (C,), 'var': (C,)} float32 of every BatchNorm,
    the mean and biased variance of its input over all axes but the last.
  """
  found = {}

  def record(next_fun, args, kwargs, call):
    if call.method_name == '__call__' and isinstance(call.module, nn.BatchNorm):
      x = args[0].astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      found[layers.module_path(call.module)] = {
          'mean': mean, 'var': jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)}
    return next_fun(*args, **kwargs)

  ctx = bctx.BinarizationContext(step=step, key=key, config=binarization, fully_binary=True)
  with nn.intercept_methods(record):
    model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True, ctx=ctx,
                mutable=['batch_stats', 'binary_stats'])

  def leaf(path, _):
    module = '/'.join(p.key for p in path[:-1])
    return found[module][path[-1].key]

  return jax.tree_util.tree_map_with_path(leaf, batch_stats)


class Recalibrator:
  """Compiled re-estimation of a state's BatchNorm statistics over `num_batches` batches.

  Args:
    model, binarization: as for the train step.
    state: a train state (or its abstract shape) with params, batch_stats, step, mask_key.
    state_shardings: the state's shardings (the result gets its batch_stats shardings).
    abstract_batch: {'image': ShapeDtypeStruct with the batch sharding, ...} of a train batch.
    num_batches: n > 0, the batches averaged.
  """

  def __init__(self, model, binarization, state, state_shardings, abstract_batch: dict,
               num_batches: int):
    if num_batches < 1:
      raise ValueError(f'num_batches must be >= 1, got {num_batches}.')
    self.num_batches = num_batches
    stats_shardings = state_shardings.batch_stats

    def add(total, state, images):
      stats = batch_statistics(model, binarization, state.params, state.batch_stats, images,
                               state.step, state.mask_key)
      return jax.tree.map(lambda t, s: t + s / num_batches, total, stats)

    platform = compiler.platform_of(abstract_batch['image'].sharding)
    self._add = compiler.jit(add, platform=platform,
                             in_shardings=(stats_shardings, state_shardings,
                                           abstract_batch['image'].sharding),
                             out_shardings=stats_shardings, donate_argnums=0,
                             ).lower(state.batch_stats, state, abstract_batch['image']).compile()
    self._zeros = jax.jit(lambda stats: jax.tree.map(jnp.zeros_like, stats),
                          in_shardings=(stats_shardings,), out_shardings=stats_shardings,
                          ).lower(state.batch_stats).compile()

  def __call__(self, state, batches: Iterable[dict]) -> Any:
    """The averaged statistics over the first `num_batches` global batches of `batches`."""
    total, used = self._zeros(state.batch_stats), 0
    for batch in batches:
      if used == self.num_batches:
        break
      total, used = self._add(total, state, batch['image']), used + 1
    if used < self.num_batches:
      raise ValueError(f'only {used} batches to re-estimate BatchNorm statistics on, '
                       f'{self.num_batches} asked for: lower train.recalibrate_bn_batches.')
    return total


def global_train_batches(data_config, *, global_batch_size: int, seed: int,
                         mesh) -> Iterator[dict]:
  """Global training batches for re-estimation: a fresh iterator over the run's train stream
  (from its first batch, augmented as in training), so the run's own iterator never moves."""
  iterator = pipeline.make_train_iterator(data_config, global_batch_size=global_batch_size,
                                          seed=seed)
  try:
    while True:
      yield parallel.global_batch(next(iterator), mesh)
  finally:
    iterator.close()


def recalibrated_state(recalibrator: Recalibrator, state, data_config, *, global_batch_size: int,
                       seed: int, mesh):
  """`state` with its batch_stats replaced by re-estimated ones (a new state; `state` unchanged)."""
  stats = recalibrator(state, global_train_batches(
      data_config, global_batch_size=global_batch_size, seed=seed, mesh=mesh))
  return state.replace(batch_stats=stats)



def recalibrate_variables(config, model, binarization, variables: dict, num_batches: int) -> dict:
  """`variables` ({'params', 'batch_stats'}) with re-estimated batch_stats, on one device, over
  the first `num_batches` train batches of the run's config (batch size, seed, data)."""
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                               batch_stats=variables['batch_stats'], opt_state=(),
                               mask_key=jnp.zeros((2,), jnp.uint32))
  mesh = parallel.make_mesh(1)
  shardings = parallel.state_sharding(jax.eval_shape(lambda: state), mesh, False)
  state = jax.device_put(state, shardings)
  _, image_shape = pipeline.input_shape(config.data)
  images = jax.ShapeDtypeStruct((config.train.batch_size, *image_shape), jnp.float32,
                                sharding=parallel.batch_sharding(mesh))
  recalibrator = Recalibrator(model, binarization, state, shardings, {'image': images},
                              num_batches)
  state = recalibrated_state(recalibrator, state, config.data,
                             global_batch_size=config.train.batch_size, seed=config.seed,
                             mesh=mesh)
  return {'params': variables['params'], 'batch_stats': jax.device_get(state.batch_stats)}
