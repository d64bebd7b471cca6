"""optax transforms for binary kernels, against docs/method.md.

STE-free StoMPP: a frozen entry gets zero gradient (frozen entries pass none) and, by default,
zero optimizer update (momentum must not keep moving it); it learns again once a refresh
unfreezes it. STE baseline: latent kernels are clipped to [-1, 1] after every step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stompp_jax import layers
from stompp_jax.binary import context
from stompp_jax.binary import optim
from stompp_jax.binary import schedule
from stompp_jax.binary import site_tree

KEY = jax.random.key(7)
_site_mask = jax.jit(context.site_frozen_mask, static_argnums=(1, 2, 3))


def _ctx(method, step, sites=(('dense',),), refresh_every=3, total_steps=100):
  cfg = context.BinarizationConfig(
      method=method, sites=sites, refresh_every=refresh_every,
      schedule=schedule.ScheduleConfig(total_steps=total_steps, shape='linear', span_end=1.0))
  return context.BinarizationContext(step=jnp.int32(step), key=KEY, config=cfg)


class _OneDense(nn.Module):

  @nn.compact
  def __call__(self, x, ctx=None):
    return layers.BinaryDense(features=8, name='dense')(x, ctx)


def test_frozen_entries_get_zero_grad_and_update_then_learn_after_refresh():
  # One site, p = step / 100 (linear over the whole run), refresh every 3 steps: over steps
  # 40..60 about half the kernel is frozen and refreshes move entries in and out.
  model = _OneDense()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  target = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  params = model.init(jax.random.key(0), x)['params']
  params = {'dense': {'kernel': jnp.asarray(rng.uniform(-0.5, 0.5, (8, 8)), jnp.float32),
                      'bias': params['dense']['bias']}}
  tx = optax.chain(optax.sgd(1e-3, momentum=0.9),
                   optim.zero_frozen_updates({'dense': {'kernel': 0, 'bias': None}}))
  opt_state = tx.init(params)

  def loss(params, ctx):
    return jnp.sum((model.apply({'params': params}, x, ctx) - target) ** 2)

  @jax.jit
  def step_fn(params, opt_state, ctx):
    grads = jax.grad(loss)(params, ctx)
    updates, opt_state = tx.update(grads, opt_state, params, binarization_context=ctx)
    # The kernel the forward pass computed with: eye(8) @ kernel, bias 0, is exact.
    no_bias = {'dense': {'kernel': params['dense']['kernel'], 'bias': jnp.zeros(8)}}
    effective = model.apply({'params': no_bias}, jnp.eye(8), ctx)
    return grads, updates, optax.apply_updates(params, updates), opt_state, effective

  frozen_after_learning = 0   # frozen entries whose momentum buffer was not zero
  resumed = 0                 # entries that learn again after being frozen
  was_frozen = np.zeros((8, 8), bool)
  for step in range(40, 60):
    ctx = _ctx('stompp', step)
    frozen = np.asarray(_site_mask(ctx, 0, 'kernel', (8, 8)))
    kernel = np.asarray(params['dense']['kernel'])
    momentum = np.asarray(opt_state[0][0].trace['dense']['kernel'])
    grads, updates, params, opt_state, effective = step_fn(params, opt_state, ctx)
    g, u = np.asarray(grads['dense']['kernel']), np.asarray(updates['dense']['kernel'])
    new_kernel = np.asarray(params['dense']['kernel'])
    # The forward used this mask: sign where frozen, the (in-range) latent value elsewhere.
    np.testing.assert_array_equal(np.asarray(effective), np.where(frozen, np.sign(kernel), kernel))
    # Frozen: exactly zero gradient, update and change.
    assert np.all(g[frozen] == 0) and np.all(u[frozen] == 0)
    np.testing.assert_array_equal(new_kernel[frozen], kernel[frozen])
    # Unfrozen: they learn (all latent values stay inside [-1, 1], so all get gradient).
    assert np.all(g[~frozen] != 0) and np.all(u[~frozen] != 0)
    assert np.all(new_kernel[~frozen] != kernel[~frozen])
    frozen_after_learning += int(np.sum(frozen & (momentum != 0)))
    resumed += int(np.sum(was_frozen & ~frozen))
    was_frozen = frozen
  assert 0.3 < frozen.mean() < 0.8
  assert frozen_after_learning > 20 and resumed > 5, (frozen_after_learning, resumed)


def test_zero_frozen_updates_uses_the_forward_masks_of_each_site():
  sites = (('enc', 'conv'), ('dec', 'conv'))
  # T=100, span [0, 1], two windows of 50 steps: at step 40 site 0 has p = 0.8, site 1 p = 0.
  # At step 70, site 0 is fully frozen and site 1 has p = 0.4.
  updates = {'enc': {'conv': {'kernel': jnp.ones((3, 3, 4, 8)), 'bias': jnp.ones(8)}},
             'dec': {'conv': {'kernel': jnp.ones((3, 3, 8, 8))}},
             'bn': {'scale': jnp.ones(8)}}
  tx = optim.zero_frozen_updates(site_tree.from_paths(updates, [(*p, 'kernel') for p in sites]))
  state, update = tx.init(updates), jax.jit(tx.update)
  for step, fractions in [(40, (0.8, 0.0)), (70, (1.0, 0.4))]:
    ctx = _ctx('stompp', step, sites=sites, refresh_every=10)
    out, _ = update(updates, state, binarization_context=ctx)
    for site, path in enumerate([('enc', 'conv'), ('dec', 'conv')]):
      kernel_update = np.asarray(out[path[0]][path[1]]['kernel'])
      frozen = np.asarray(_site_mask(ctx, site, 'kernel', kernel_update.shape))
      np.testing.assert_array_equal(kernel_update, np.where(frozen, 0.0, 1.0))
      assert abs(frozen.mean() - fractions[site]) < 0.2, (step, site, frozen.mean())
    # Non-kernel leaves pass through untouched.
    np.testing.assert_array_equal(out['enc']['conv']['bias'], np.ones(8))
    np.testing.assert_array_equal(out['bn']['scale'], np.ones(8))


def test_zero_frozen_updates_under_jit_matches_eager():
  ctx = _ctx('stompp', 50, sites=(('w',),))
  tx = optim.zero_frozen_updates({'w': 0})
  updates = {'w': jnp.arange(1.0, 65.0).reshape(8, 8)}
  eager, _ = tx.update(updates, tx.init(updates), binarization_context=ctx)
  jitted, _ = jax.jit(lambda u, c: tx.update(u, tx.init(u), binarization_context=c))(updates, ctx)
  np.testing.assert_array_equal(jitted['w'], eager['w'])
  assert 0 < np.mean(np.asarray(eager['w']) == 0) < 1


def test_clip_latent_kernels_values():
  params = {'k': jnp.asarray([-0.9, 0.5, 0.95, -1.0, 0.0]), 'b': jnp.asarray([0.9, 0.9])}
  updates = {'k': jnp.asarray([-0.5, 0.2, 0.1, 0.3, -3.0]), 'b': jnp.asarray([0.5, -2.0])}
  tx = optim.clip_latent_kernels({'k': 0, 'b': None})
  out, _ = tx.update(updates, tx.init(params), params)
  new = optax.apply_updates(params, out)
  np.testing.assert_allclose(new['k'], [-1.0, 0.7, 1.0, -0.7, -1.0], atol=1e-7)
  np.testing.assert_array_equal(out['b'], updates['b'])  # not a binary kernel: untouched


def test_clip_latent_kernels_keeps_latents_inside_unit_interval_over_sgd_steps():
  rng = np.random.default_rng(1)
  params = {'k': jnp.asarray(rng.uniform(-1, 1, 10_000), jnp.float32)}
  sgd = optax.sgd(0.5, momentum=0.9)
  tx = optax.chain(sgd, optim.clip_latent_kernels({'k': 0}))
  state, sgd_state = tx.init(params), sgd.init(params)
  for _ in range(5):
    grads = {'k': jnp.asarray(rng.normal(size=10_000), jnp.float32)}
    sgd_updates, sgd_state = sgd.update(grads, sgd_state, params)
    expected = np.clip(np.asarray(params['k']) + np.asarray(sgd_updates['k']), -1, 1)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    k = np.asarray(params['k'])
    assert k.min() >= -1.0 and k.max() <= 1.0
    assert np.mean(np.abs(k) == 1.0) > 0.1  # the clip is active
    np.testing.assert_allclose(k, expected, atol=2.4e-7)  # p + (clip(p + u) - p): 2 roundings


def test_clip_latent_kernels_needs_params():
  tx = optim.clip_latent_kernels({'k': 0})
  with pytest.raises(ValueError, match='params'):
    tx.update({'k': jnp.ones(2)}, tx.init({'k': jnp.ones(2)}))


@pytest.mark.parametrize('transform', [optim.zero_frozen_updates, optim.clip_latent_kernels])
def test_the_transforms_refuse_a_tree_without_their_sites(transform):
  """A site tree of another params tree is an error, never a transform that does nothing."""
  sites = {'enc': {'kernel': 0}}
  params = {'encoder': {'kernel': jnp.ones((2, 2))}}
  tx = transform(sites)
  with pytest.raises(ValueError, match='structure of the site tree.*enc/kernel'):
    tx.init(params)
  with pytest.raises(ValueError, match='structure of the site tree'):
    tx.update(params, optax.EmptyState(), params, binarization_context=_ctx('stompp', 50))


def test_site_tree_from_paths_refuses_a_path_the_params_lack():
  params = {'conv': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
  assert site_tree.from_paths(params, [('conv', 'kernel')]) == {'conv': {'kernel': 0, 'bias': None}}
  with pytest.raises(ValueError, match='No parameter at conv/weight'):
    site_tree.from_paths(params, [('conv', 'weight')])
