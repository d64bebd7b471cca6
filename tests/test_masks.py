"""Frozen masks against docs/method.md ("Masks").

Each element has a score s in [0, 1) and is frozen iff s < p. Without refresh the scores never
change, so the frozen set only grows with p (nested masks). With soft refresh every r steps each
element re-draws its score once, at its own fixed phase, so about 1/r of the scores change per
step. Masks are a pure function of (key, site, step): the same on any number of devices and in
any process.

Statistical tolerances are 5 binomial standard deviations, sqrt(n q (1 - q)): a correct
implementation fails such a check with probability < 1e-6, and the checks are deterministic
for a fixed key anyway.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stompp_jax.binary import context
from stompp_jax.binary import masks
from stompp_jax.binary import schedule

from helpers import REPO  # pylint: disable=g-bad-import-order

KEY = jax.random.key(1234)

# Jitted once per shape: many small eager ops would each compile (slow on a 2-core machine).
_frozen_mask = jax.jit(masks.frozen_mask, static_argnums=(3, 4))
_element_scores = jax.jit(masks.element_scores, static_argnums=(2, 3))
_site_mask = jax.jit(context.site_frozen_mask, static_argnums=(1, 2, 3))
_binarize_site_tensor = jax.jit(context.binarize_site_tensor, static_argnums=(2, 3))


def _within_binomial(count, n, q, sigmas=5.0):
  """True when `count` successes out of n are within `sigmas` std of Binomial(n, q)."""
  return abs(count - n * q) <= sigmas * np.sqrt(n * q * (1 - q))


def _scores(step, shape, r, key=KEY):
  return np.asarray(_element_scores(key, jnp.asarray(step), shape, r))


# ---------------------------------------------------------------------------------------------
# Frozen fraction


@pytest.mark.parametrize('r, step', [(0, 0), (100, 1250)])  # 1250: half the phases re-drew.
def test_realized_frozen_fraction_on_a_million_elements(r, step):
  n = 1_000_000
  scores = _element_scores(KEY, jnp.int32(step), (1000, 1000), r)
  for p in (0.01, 0.1, 0.5, 0.9, 0.99):
    mask = _frozen_mask(KEY, step, jnp.float32(p), (1000, 1000), r)
    assert mask.dtype == jnp.bool_ and mask.shape == (1000, 1000)
    count = int(jnp.sum(mask))
    assert _within_binomial(count, n, p), (p, count, n * p)
    assert count == int(jnp.sum(scores < p))  # frozen iff score < p


@pytest.mark.parametrize('r', [0, 7])
def test_p_zero_freezes_nothing_and_p_one_everything(r):
  for step in (0, 3, 11):
    assert not jnp.any(_frozen_mask(KEY, step, 0.0, (64, 64), r))
    assert jnp.all(_frozen_mask(KEY, step, 1.0, (64, 64), r))


@pytest.mark.parametrize('r', [0, 10])
def test_scores_are_float32_in_unit_interval(r):
  s = _scores(13, (4096,), r)
  assert s.dtype == np.float32 and s.shape == (4096,)
  assert s.min() >= 0.0 and s.max() < 1.0


# ---------------------------------------------------------------------------------------------
# Nested masks and soft refresh


def test_masks_are_nested_without_refresh():
  shape = (100, 100)
  previous = np.zeros(shape, bool)
  for step, p in [(0, 0.0), (10, 0.05), (20, 0.2), (30, 0.2), (40, 0.5), (50, 0.9), (60, 1.0)]:
    mask = np.asarray(_frozen_mask(KEY, step, p, shape, 0))
    assert np.all(mask[previous]), f'an entry frozen before was unfrozen at step {step}'
    previous = mask
  assert previous.all()


def test_without_refresh_scores_never_change():
  np.testing.assert_array_equal(_scores(0, (1000,), 0), _scores(123456, (1000,), 0))


def test_masks_are_nested_between_refreshes():
  # With refresh, entries whose score did not change between two steps keep nestedness.
  shape, r = (100, 100), 10
  s0, s1 = _scores(20, shape, r), _scores(25, shape, r)
  m0 = np.asarray(_frozen_mask(KEY, 20, 0.3, shape, r))
  m1 = np.asarray(_frozen_mask(KEY, 25, 0.6, shape, r))
  kept = s0 == s1
  assert 0.4 < kept.mean() < 0.6  # half the phases re-drew in 5 of 10 steps
  assert np.all(m1[kept & m0])


@pytest.mark.parametrize('r', [10, 100, 1000])
def test_realized_refresh_rate_is_one_over_r(r):
  n = 100_000
  for step in (0, r // 2, 3 * r - 1, 5 * r + 3):
    changed = int(np.sum(_scores(step, (n,), r) != _scores(step + 1, (n,), r)))
    assert _within_binomial(changed, n, 1 / r), (step, changed, n / r)


def test_each_score_is_redrawn_exactly_once_per_period_at_a_fixed_phase():
  n, r, start = 2000, 10, 37
  history = np.stack([_scores(start + i, (n,), r) for i in range(2 * r + 1)])
  changed = history[1:] != history[:-1]        # (2r transitions, n)
  np.testing.assert_array_equal(changed[:r].sum(0), np.ones(n))
  np.testing.assert_array_equal(changed[r:].sum(0), np.ones(n))
  # Fixed phase: each element changes at the same offset in consecutive periods.
  np.testing.assert_array_equal(changed[:r].argmax(0), changed[r:].argmax(0))
  # Phases are spread over the period, about n / r per offset.
  per_offset = np.bincount(changed[:r].argmax(0), minlength=r)
  assert all(_within_binomial(c, n, 1 / r) for c in per_offset), per_offset


def test_redrawn_scores_are_independent_of_old_ones():
  n, r = 100_000, 4
  old, new = _scores(0, (n,), r), _scores(r, (n,), r)  # every element re-drew once in r steps
  assert np.all(old != new)
  # Correlation of independent uniforms: std 1/sqrt(n); 5 sigma.
  assert abs(np.corrcoef(old, new)[0, 1]) < 5 / np.sqrt(n)
  assert _within_binomial(int(np.sum(new < 0.3)), n, 0.3)


def test_negative_refresh_period_raises():
  with pytest.raises(ValueError, match='refresh_every'):
    masks.frozen_mask(KEY, 0, 0.5, (4,), -1)


# ---------------------------------------------------------------------------------------------
# Keys: one independent mask per (site, tensor)


def test_site_keys_give_independent_masks():
  n = 100_000
  keys = [masks.site_key(KEY, 0, 'kernel'), masks.site_key(KEY, 0, 'input'),
          masks.site_key(KEY, 1, 'kernel'), masks.site_key(KEY, 1, 'input')]
  mask_list = [np.asarray(_frozen_mask(k, 5, 0.5, (n,), 10)) for k in keys]
  for i in range(4):
    for j in range(i + 1, 4):
      # Independent p=0.5 masks agree on about half the entries.
      assert _within_binomial(int(np.sum(mask_list[i] == mask_list[j])), n, 0.5), (i, j)


def test_unknown_tensor_name_raises():
  with pytest.raises(ValueError, match='kernel'):
    masks.site_key(KEY, 0, 'bias')


# ---------------------------------------------------------------------------------------------
# Pure function of (key, step): jit, devices, processes

SHAPE = (64, 24)


def _mask_fn(key, step):
  return masks.frozen_mask(masks.site_key(key, 2, 'kernel'), step, jnp.float32(0.37), SHAPE, 10)


def test_same_mask_eager_and_jit_and_traced_step():
  eager = np.asarray(_mask_fn(KEY, 53))
  np.testing.assert_array_equal(jax.jit(_mask_fn)(KEY, jnp.int32(53)), eager)
  assert 0 < eager.mean() < 1


@pytest.mark.parametrize('spec', [P('d'), P(None, 'd'), P('d', None)])
@pytest.mark.parametrize('step', [0, 53])
def test_same_mask_on_1_and_8_devices(spec, step):
  assert jax.device_count() == 8
  one = jax.devices()[0]
  single = jax.jit(_mask_fn)(jax.device_put(KEY, one), jax.device_put(jnp.int32(step), one))
  assert len(single.sharding.device_set) == 1
  mesh = Mesh(np.array(jax.devices()), ('d',))
  sharded = jax.jit(_mask_fn, out_shardings=NamedSharding(mesh, spec))(KEY, step)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


_SUBPROCESS = """
import sys, jax, jax.numpy as jnp, numpy as np
from stompp_jax.binary import masks
key = jax.random.key(int(sys.argv[1]))
m = masks.frozen_mask(masks.site_key(key, 2, 'kernel'), int(sys.argv[2]), jnp.float32(0.37),
                      (64, 24), 10)
print(jax.device_count(), np.packbits(np.asarray(m)).tobytes().hex())
"""


def test_same_mask_for_the_same_key_and_step_in_another_process():
  step = 53
  out = subprocess.run([sys.executable, '-c', _SUBPROCESS, '1234', str(step)], cwd=REPO,
                       capture_output=True, text=True, check=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'})
  devices, bits = out.stdout.split()
  assert int(devices) != jax.device_count()  # here 8 fake devices, there the default 1
  other = np.unpackbits(np.frombuffer(bytes.fromhex(bits), np.uint8))[:np.prod(SHAPE)]
  np.testing.assert_array_equal(other.reshape(SHAPE).astype(bool), np.asarray(_mask_fn(KEY, step)))


# ---------------------------------------------------------------------------------------------
# context.site_frozen_mask: the masks the layers and the optimizer use

SITES = (('a',), ('b',), ('c',), ('d',))
SCHEDULE = schedule.ScheduleConfig(total_steps=1000, shape='linear')  # windows of 200 steps


def _ctx(method, step, fully_binary=False, **kwargs):
  cfg = context.BinarizationConfig(method=method, schedule=SCHEDULE, sites=SITES, **kwargs)
  return context.BinarizationContext(step=jnp.int32(step), key=KEY, config=cfg,
                                     fully_binary=fully_binary)


@jax.jit
def _frozen_counts(ctx):
  """[site][tensor] number of frozen entries of a (250, 250) mask, and [site] fractions."""
  counts = [[jnp.sum(context.site_frozen_mask(ctx, site, tensor, (250, 250)))
             for tensor in masks.TENSORS] for site in range(len(SITES))]
  fractions = [context.site_fraction(ctx, site) for site in range(len(SITES))]
  return jnp.asarray(counts), jnp.asarray(fractions)


@pytest.mark.parametrize('method', ['stompp', 'stompp_ste'])
def test_site_mask_fraction_follows_the_schedule(method):
  n = 250 * 250
  # step 450: sites 0, 1 frozen, site 2 at p = 0.25 (linear, window [400, 600]), site 3 at 0.
  counts, fractions = _frozen_counts(_ctx(method, 450))
  for site, p in enumerate([1.0, 1.0, 0.25, 0.0]):
    assert float(fractions[site]) == pytest.approx(p, abs=1e-6)
    for count in np.asarray(counts[site]):
      if p in (0.0, 1.0):
        assert count == p * n
      else:
        assert _within_binomial(count, n, p), (site, count)


def test_site_mask_is_all_frozen_for_ste_and_fully_binary():
  assert jnp.all(_site_mask(_ctx('ste', 0), 3, 'kernel', (8, 8)))
  assert float(context.site_fraction(_ctx('ste', 0), 3)) == 1.0
  for method in ('stompp', 'stompp_ste'):
    ctx = _ctx(method, 0, fully_binary=True)
    assert jnp.all(_site_mask(ctx, 3, 'input', (8, 8)))
    assert float(context.site_fraction(ctx, 3)) == 1.0


def test_site_mask_uses_the_site_key_and_step():
  ctx = _ctx('stompp', 450, refresh_every=7)
  expected = _frozen_mask(masks.site_key(KEY, 2, 'input'), 450, 0.25, (40, 40), 7)
  np.testing.assert_array_equal(_site_mask(ctx, 2, 'input', (40, 40)), expected)


@pytest.mark.parametrize('masks_by', context.MASKS_BY)
def test_per_example_masks_of_a_batch_sharded_over_8_devices_are_the_global_ones(masks_by):
  """Per-example activation masks with the batch split over the 8 devices: each device builds
  the masks of its slice of the batch, and together they are the one-device masks, bit for bit."""
  assert jax.device_count() == 8
  ctx = _ctx('stompp', 500, per_example_activation_masks=True, masks_by=masks_by)  # p = 0.5
  x = jax.random.uniform(jax.random.key(7), (16, 6, 6, 4), minval=-1.5, maxval=1.5)
  binarize = jax.jit(lambda x, ctx: context.binarize_site_tensor(x, ctx, 2, 'input'))
  one = jax.devices()[0]
  single = binarize(jax.device_put(x, one), jax.device_put(ctx, one))
  mesh = Mesh(np.array(jax.devices()), ('data',))
  sharded = binarize(jax.device_put(x, NamedSharding(mesh, P('data'))), ctx)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
  frozen = np.isin(np.asarray(single), (-1.0, 1.0))
  assert not all(np.array_equal(frozen[0], frozen[i]) for i in range(1, 16))  # Per example.


@pytest.mark.parametrize('per_example, expect_shared', [(False, True), (True, False)])
def test_activation_masks_shared_over_the_batch_or_per_example(per_example, expect_shared):
  # Two identical examples: a mask shared over the batch binarizes them identically.
  ctx = _ctx('stompp', 500, per_example_activation_masks=per_example)  # site 2 at p = 0.5
  x = jnp.broadcast_to(jnp.linspace(-0.9, 0.9, 256).reshape(16, 16), (2, 16, 16))
  y = np.asarray(_binarize_site_tensor(x, ctx, 2, 'input'))
  assert np.array_equal(y[0], y[1]) == expect_shared
  frozen = np.isin(y, (-1.0, 1.0))
  assert _within_binomial(int(frozen.sum()), frozen.size, 0.5)
  if expect_shared:
    frozen_mask = np.asarray(_site_mask(ctx, 2, 'input', (16, 16)))
    np.testing.assert_array_equal(y[0], np.where(frozen_mask, np.sign(x[0]), x[0]))


def test_binarize_site_tensor_per_method():
  x = jnp.asarray([[-2.0, -0.5, 0.0, 0.5, 2.0]])
  np.testing.assert_array_equal(context.binarize_site_tensor(x, _ctx('fp', 500), 2, 'kernel'), x)
  for tensor in masks.TENSORS:
    np.testing.assert_array_equal(
        context.binarize_site_tensor(x, _ctx('ste', 500), 2, tensor), [[-1, -1, 1, 1, 1]])
    for method in ('stompp', 'stompp_ste'):
      np.testing.assert_array_equal(  # site 3 has p = 0 at step 500, site 0 has p = 1
          context.binarize_site_tensor(x, _ctx(method, 500), 3, tensor), [[-1, -0.5, 0, 0.5, 1]])
      np.testing.assert_array_equal(
          context.binarize_site_tensor(x, _ctx(method, 500), 0, tensor), [[-1, -1, 1, 1, 1]])


@pytest.mark.parametrize('method, tensor, expected', [
    ('ste', 'kernel', [1, 1, 1, 1, 1]),          # identity STE for weights
    ('ste', 'input', [0, 1, 1, 1, 0]),           # clipped STE for activations
    ('stompp', 'kernel', [0, 0, 0, 0, 0]),       # fully frozen site: STE-free passes nothing
    ('stompp_ste', 'kernel', [0, 1, 1, 1, 0]),   # default surrogate: clipped STE
])
def test_binarize_site_tensor_grads_per_method(method, tensor, expected):
  x = jnp.asarray([[-2.0, -0.5, 0.0, 0.5, 2.0]])
  grad = jax.grad(lambda x: jnp.sum(context.binarize_site_tensor(x, _ctx(method, 500), 0, tensor)))
  np.testing.assert_array_equal(grad(x), [expected])


def test_stompp_ste_identity_option_reaches_the_binarizer():
  x = jnp.asarray([[-2.0, -0.5, 0.0, 0.5, 2.0]])
  ctx = _ctx('stompp_ste', 500, frozen_grad='ste_identity')
  grad = jax.grad(lambda x: jnp.sum(context.binarize_site_tensor(x, ctx, 0, 'kernel')))
  np.testing.assert_array_equal(grad(x), [[1, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match='frozen_grad'):
    _ctx('stompp_ste', 0, frozen_grad='none')


def test_all_site_keys_and_stream_words_match_the_per_site_derivation():
  first, second = masks.all_site_keys(KEY, 4)
  for site in range(4):
    for t, tensor in enumerate(masks.TENSORS):
      key = masks.site_key(KEY, site, tensor)
      np.testing.assert_array_equal([first[site, t], second[site, t]], key)
      for r in (0, 5):
        np.testing.assert_array_equal(masks.stream_words((first, second), 13, r)[site, t],
                                      masks.stream_words(key, 13, r))
        np.testing.assert_array_equal(
            masks.scores_from_words(masks.stream_words(key, 13, r), (6, 5), r),
            _scores(13, (6, 5), r, key=key))
