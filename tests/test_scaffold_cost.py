"""The scaffold's cost switches (`binary.masks_by`, `binary.residuals`,
`binary.committed_backward`) change how masks, residuals and gradients are computed and stored,
never what they are: a run's masks, values and parameters must stay bit for bit those of the
implementation they replaced (a long study resumes across commits), except that skipping a
committed site's gradients ('skip', CPU's default) takes the other sites' convolution gradients
from binary/committed.py, equal up to float32 summation order.

The reference below is that implementation, kept here: per-site keys and scores hashed inside
each site's `lax.cond`, bool kernel masks, bool residuals. The tiny model is trained with it
(patched in) and with the package as it is, under every setting of the two switches, and the parameters,
optimizer state, BatchNorm statistics and per-site values after every step must be identical.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stompp_jax import experiment
from stompp_jax.binary import binarize
from stompp_jax.binary import context
from stompp_jax.binary import masks

from helpers import tiny_config  # pylint: disable=g-bad-import-order

KEY = jax.random.key(7)


# ---------------------------------------------------------------------------------------------
# The reference: the committed implementation before the change (commit 3576984).


def _reference_scores(key, step, shape, refresh_every):
  words = masks._key_words(key)  # pylint: disable=protected-access
  if refresh_every == 0:
    return masks.uniform(key, 1, shape)
  step = jnp.asarray(step, jnp.int32)
  phase = masks._bits(words, 0, shape) % np.uint32(refresh_every)  # pylint: disable=protected-access
  epoch = step // refresh_every
  in_next_epoch = (step % refresh_every).astype(jnp.uint32) + phase >= refresh_every
  current = masks._derive(words, 1 + epoch)  # pylint: disable=protected-access
  following = masks._derive(words, 2 + epoch)  # pylint: disable=protected-access
  first = jnp.where(in_next_epoch, following[0], current[0])
  second = jnp.where(in_next_epoch, following[1], current[1])
  return masks._to_unit(masks._hash(first, second, shape))  # pylint: disable=protected-access


def _reference_site_frozen_mask(ctx, site, tensor, shape):
  if ctx.fully_binary or ctx.config.method == 'ste':
    return jnp.ones(shape, bool)
  fraction = context.site_fraction(ctx, site)
  key = masks.site_key(ctx.key, site, tensor)
  return jax.lax.cond(
      (fraction > 0) & (fraction < 1),
      lambda: _reference_scores(key, ctx.step, shape, ctx.config.refresh_every) < fraction,
      lambda: jnp.full(shape, fraction >= 1))


def _use_reference(monkeypatch):
  monkeypatch.setattr(context, 'site_frozen_mask', _reference_site_frozen_mask)
  monkeypatch.setattr(context, 'with_kernel_masks', lambda ctx, shapes: ctx)
  monkeypatch.setattr(binarize, '_save', lambda bits, residual: bits)
  monkeypatch.setattr(binarize, '_load', lambda saved, residual, shape: saved)


# ---------------------------------------------------------------------------------------------
# Masks


def _config(masks_by, refresh_every, num_sites=5):
  from stompp_jax.binary import schedule  # pylint: disable=import-outside-toplevel
  return context.BinarizationConfig(
      method='stompp', schedule=schedule.ScheduleConfig(total_steps=100),
      sites=tuple((f'layer{i}',) for i in range(num_sites)), refresh_every=refresh_every,
      masks_by=masks_by)


SHAPES = [(3, 3, 4, 8), (5, 7), (13,), (2, 3, 5)]  # Sizes not multiples of 8 among them.


@pytest.mark.parametrize('masks_by', context.MASKS_BY)
@pytest.mark.parametrize('refresh_every', [0, 7])
def test_every_mask_matches_the_reference_at_every_step(masks_by, refresh_every):
  config = _config(masks_by, refresh_every)

  @jax.jit
  def both(step):
    ctx = context.BinarizationContext(step=step, key=KEY, config=config)
    with_masks = context.with_kernel_masks(ctx, [SHAPES[i % 4] for i in range(5)])
    return [(context.site_frozen_mask(ctx, i, tensor, SHAPES[i % 4]),
             context.site_frozen_mask(with_masks, i, tensor, SHAPES[i % 4]),
             _reference_site_frozen_mask(ctx, i, tensor, SHAPES[i % 4]))
            for i in range(5) for tensor in masks.TENSORS]

  for step in range(0, 100, 3):
    for got, from_context, want in both(jnp.int32(step)):
      np.testing.assert_array_equal(got, want)
      np.testing.assert_array_equal(from_context, want)


def test_the_switches_are_static_and_checked():
  assert _config('cond', 4) != _config('select', 4)  # Part of the jit cache key.
  with pytest.raises(ValueError, match='binary.masks_by'):
    _config('sometimes', 4)
  with pytest.raises(ValueError, match='binary.residuals'):
    context.for_platform('residuals', 'floats', 'cpu')


@pytest.mark.parametrize('platform', ['cpu', 'tpu', 'gpu'])
@pytest.mark.parametrize('field,on_cpu,elsewhere', [('masks_by', 'cond', 'select'),
                                                    ('residuals', 'packed', 'bool'),
                                                    ('committed_backward', 'skip', 'full')])
def test_auto_is_the_platforms_choice_and_a_choice_is_kept(platform, field, on_cpu, elsewhere):
  assert context.for_platform(field, 'auto', platform) == (
      on_cpu if platform == 'cpu' else elsewhere)
  for value in (on_cpu, elsewhere):
    assert context.for_platform(field, value, platform) == value


# ---------------------------------------------------------------------------------------------
# Training: bit for bit against the reference.


def _train(method, steps=12, **binary):
  """Every leaf of (params, opt_state, batch_stats) after `steps` tiny train steps, and the
  per-site values of every step, as numpy arrays keyed by path; and the compiled step's HLO.
  `binary`: binary.* fields to set."""
  config = tiny_config(method)
  config.binary.update(binary)
  exp = experiment.build(config)
  state = jax.jit(exp.init_state, out_shardings=exp.state_shardings)()
  compiled = exp.compile_train_step()
  rng = np.random.default_rng(0)
  out = {}
  for i in range(steps):
    batch = {'image': rng.standard_normal((32, 16, 16, 3), np.float32),
             'label': rng.integers(0, 4, 32).astype(np.int32)}
    state, _, per_site = compiled(state, jax.device_put(batch, exp.batch_sharding))
    out.update({f'{i}/{k}': np.asarray(v) for k, v in per_site.items()})
  leaves = jax.tree_util.tree_flatten_with_path((state.params, state.opt_state,
                                                 state.batch_stats))[0]
  out.update({jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
  return out, compiled.as_text()


def _assert_bitwise_equal(got, want):
  assert got.keys() == want.keys()
  differ = [k for k in want if got[k].dtype != want[k].dtype
            or got[k].tobytes() != want[k].tobytes()]
  assert not differ, f'{len(differ)} of {len(want)} arrays differ, e.g. {differ[:3]}'


@pytest.mark.parametrize('method', ['stompp', 'ste'])
def test_training_is_bitwise_that_of_the_reference(method, monkeypatch):
  got, hlo = _train(method)
  # The packed residuals (the default on CPU) keep XLA from copying every donated kernel
  # (binarize.py, "Residuals").
  assert not re.search(r'copy\(%state_params', hlo)
  full = dict(committed_backward='full')
  variants = {'bool residuals': _train(method, residuals='bool', **full)[0]}
  if method == 'stompp':
    variants['select'] = _train(method, masks_by='select', **full)[0]
    variants['full'] = _train(method, **full)[0]
  with monkeypatch.context() as patch:
    _use_reference(patch)
    want = _train(method)[0]
  for variant in variants.values():
    _assert_bitwise_equal(variant, want)
  if method == 'ste':  # Nothing to skip: the default is the reference bit for bit.
    _assert_bitwise_equal(got, want)
  else:
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=k)
