"""Numerics of the train step: the finiteness guard and bfloat16 compute.

- A step whose new BatchNorm statistics hold a NaN is dropped like one with a NaN loss or
  gradient (steps.train_step), even when the loss and the gradients are finite.
- bfloat16: one rule for what is binarized (binary/context.py: the float32 latent kernel, then
  cast), the same in the zoo's layers and in `layers.ByRules`; a bfloat16 run follows the
  float32 run to a stated tolerance.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config
from stompp_jax import experiment
from stompp_jax import layers
from stompp_jax.binary import context as bctx
from stompp_jax.binary import schedule


class _NaNInStatisticsOnly(nn.Module):
  """A probe BatchNorm on log(x) (NaN for the negative pixels) whose output the logits do not
  use: its new running statistics are NaN, the loss and every gradient are finite."""

  @nn.compact
  def __call__(self, x, train=False):
    nn.BatchNorm(use_running_average=not train, name='probe')(jnp.log(x))
    x = nn.Conv(4, (3, 3), name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    return nn.Dense(4, name='head')(x.mean(axis=(1, 2)))


def _batch(exp, seed=0):
  rng = np.random.default_rng(seed)
  shape = (exp.config.train.batch_size, *exp.data.image_shape)
  return jax.device_put({'image': rng.normal(size=shape).astype(np.float32),
                         'label': rng.integers(0, 4, shape[0]).astype(np.int32)},
                        exp.batch_sharding)


def test_nan_reaching_only_the_batchnorm_statistics_drops_the_update():
  exp = experiment.build(tiny_config('fp'), model=_NaNInStatisticsOnly())
  state = jax.jit(exp.init_state, out_shardings=exp.state_shardings)()
  before = jax.device_get(state)
  new_state, metrics, _ = exp.compile_train_step()(state, _batch(exp))
  assert np.isfinite(float(metrics.compute()['loss']))  # The loss alone would not show it.
  assert float(metrics.nonfinite.total) == 1.0
  after = jax.device_get(new_state)
  assert int(after.step) == 1
  for name, old, new in [('params', before.params, after.params),
                         ('batch_stats', before.batch_stats, after.batch_stats)]:
    for o, n in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
      np.testing.assert_array_equal(n, o, err_msg=name)


# ------------------------------------------------------------------------------------ bfloat16


class _ZooDense(nn.Module):

  @nn.compact
  def __call__(self, x, ctx=None):
    return layers.BinaryDense(features=3, use_bias=False, dtype=jnp.bfloat16, name='dense')(x, ctx)


class _PlainDense(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3, use_bias=False, dtype=jnp.bfloat16, name='dense')(x)


def test_zoo_and_by_rules_binarize_the_float32_latent_kernel_in_bfloat16():
  """Latent entries just outside [-1, 1] round to +-1 in bfloat16; the rule binarizes the
  float32 value, so they get no gradient in either way in (the clipped identity's window)."""
  kernel = np.asarray([[1.002, -0.5, 0.25], [-1.003, 0.75, 2.0]], np.float32)
  x = np.asarray([[1.0, 2.0], [-0.5, 1.5]], np.float32)
  g = np.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
  config = bctx.BinarizationConfig(method='stompp', sites=(('dense',),),
                                   schedule=schedule.ScheduleConfig(total_steps=10))
  ctx = bctx.BinarizationContext(step=jnp.int32(0), key=jax.random.key_data(jax.random.key(0)),
                                 config=config)  # Step 0: nothing frozen, the clipped identity.
  by_rules = layers.ByRules(_PlainDense())

  def kernel_grad(apply):
    loss = lambda k: jnp.sum(apply({'params': {'dense': {'kernel': k}}}).astype(jnp.float32) * g)
    return np.asarray(jax.grad(loss)(jnp.asarray(kernel)))

  zoo = kernel_grad(lambda v: _ZooDense().apply(v, jnp.asarray(x), ctx))
  rules = kernel_grad(lambda v: by_rules.apply(v, jnp.asarray(x), ctx=ctx))
  in_window = np.abs(kernel) <= 1  # Of the float32 latent values.
  expected = np.where(in_window, x.T @ g, 0.0)  # d/dk sum((x @ clip(k)) * g), by hand.
  np.testing.assert_array_equal(zoo, expected)
  np.testing.assert_array_equal(rules, expected)


def _losses(dtype, num_steps=4):
  config = tiny_config('stompp')
  config.model.dtype = dtype
  exp = experiment.build(config)
  state = jax.jit(exp.init_state, out_shardings=exp.state_shardings)()
  step = exp.compile_train_step()
  losses = []
  for i in range(num_steps):
    state, metrics, _ = step(state, _batch(exp, seed=i))
    losses.append(float(metrics.compute()['loss']))
  return np.asarray(losses), jax.device_get(state.params)


def test_bfloat16_training_follows_float32():
  """Four StoMPP steps of tiny_resnet (BNN) in bfloat16 and in float32 from the same init and
  batches. Tolerance: the per-step losses agree to 0.5% (bfloat16 keeps 8 significant bits,
  0.4% per rounding; measured: at most 0.11%); each latent kernel moves by at most 2% of its
  largest entry (measured: 0.25%), and a latent weight may change sign only where float32's value
  lies within 1% of the kernel's median magnitude of zero, where rounding decides the sign
  (measured: none on an AMD EPYC; one entry of 576 at |w| = 2.4e-4, median 0.11, on an Intel Xeon
  with AVX-512)."""
  f32_losses, f32_params = _losses('float32')
  bf16_losses, bf16_params = _losses('bfloat16')
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=5e-3)
  for a, b in zip(jax.tree.leaves(f32_params), jax.tree.leaves(bf16_params)):
    assert b.dtype == np.float32  # Latent weights stay float32.
    if a.ndim > 1:
      assert np.abs(a - b).max() <= 0.02 * np.abs(a).max()
      flipped = (a >= 0) != (b >= 0)
      assert np.all(np.abs(a[flipped]) <= 0.01 * np.median(np.abs(a))), np.abs(a[flipped])
