"""Binarizers against docs/method.md ("Binarizers"), element by element.

    forward:  u' = M * sign(u) + (1 - M) * clip(u, -1, 1),  sign(0) = +1
    backward: unfrozen entries pass 1[|u| <= 1] * g; frozen entries pass
              0 (frozen_grad='none', STE-free StoMPP), 1[|u| <= 1] * g ('ste_clipped'),
              g ('ste_identity').
    ste_sign: forward sign(u); backward 1[|u| <= 1] * g ('clipped') or g ('identity').

Every expected value below is written out by hand from these formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from stompp_jax.binary import binarize

# The probe points: both clip boundaries |x| = 1, zero, and points inside / outside the range.
X = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], np.float32)
SIGN_X = np.array([-1, -1, -1, 1, 1, 1, 1], np.float32)
CLIP_X = np.array([-1, -1, -0.5, 0, 0.5, 1, 1], np.float32)
# Distinct cotangents, so a test sees that g itself (not 1) is passed through.
G = np.array([1, 2, 3, 4, 5, 6, 7], np.float32)
IN_RANGE_G = np.array([0, 2, 3, 4, 5, 6, 0], np.float32)  # 1[|x| <= 1] * g: |x| = 1 passes.
ZERO_G = np.zeros(7, np.float32)

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _vjp(fn, x, g=G):
  """(forward value, x-cotangent for output cotangent g)."""
  y, pullback = jax.vjp(fn, jnp.asarray(x))
  return y, pullback(jnp.asarray(g, y.dtype))[0]


def _masked(frozen, frozen_grad='none'):
  return lambda x: binarize.masked_sign(x, frozen, frozen_grad=frozen_grad)


# ---------------------------------------------------------------------------------------------
# sign


def test_sign_is_plus_one_at_zero_and_keeps_dtype():
  for dtype in FLOAT_DTYPES:
    x = jnp.asarray([-3.0, -1e-3, -0.0, 0.0, 1e-3, 3.0], dtype)
    y = binarize.sign(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), [-1, -1, 1, 1, 1, 1])


@pytest.mark.parametrize('binarizer', [
    binarize.sign, lambda x: binarize.ste_sign(x),
    lambda x: binarize.masked_sign(x, jnp.ones(x.shape, bool)),
    lambda x: binarize.masked_sign(x, jnp.zeros(x.shape, bool))],
    ids=['sign', 'ste_sign', 'masked_sign_frozen', 'masked_sign_unfrozen'])
def test_nan_stays_nan(binarizer):
  """A NaN is not a negative number: committed or not, it comes out NaN (binarize.py)."""
  for dtype in FLOAT_DTYPES:
    x = jnp.asarray([np.nan, -0.5, 0.0, 0.5], dtype)
    y = np.asarray(binarizer(x), np.float32)
    assert np.isnan(y[0]) and np.all(np.isfinite(y[1:])), y


# ---------------------------------------------------------------------------------------------
# masked_sign: values


def test_masked_sign_unfrozen_is_clip():
  y = binarize.masked_sign(jnp.asarray(X), jnp.zeros(7, bool))
  np.testing.assert_array_equal(y, CLIP_X)


def test_masked_sign_frozen_is_sign():
  y = binarize.masked_sign(jnp.asarray(X), jnp.ones(7, bool))
  np.testing.assert_array_equal(y, SIGN_X)


def test_masked_sign_mixed_mask_picks_per_element():
  frozen = np.array([1, 0, 1, 0, 1, 0, 1], bool)
  y = binarize.masked_sign(jnp.asarray(X), jnp.asarray(frozen))
  np.testing.assert_array_equal(y, [-1, -1, -1, 0, 1, 1, 1])


def test_masked_sign_accepts_0_1_float_mask():
  y = binarize.masked_sign(jnp.asarray(X), jnp.asarray([1, 0, 1, 0, 1, 0, 1], jnp.float32))
  np.testing.assert_array_equal(y, [-1, -1, -1, 0, 1, 1, 1])


def test_masked_sign_broadcasts_a_shared_activation_mask_over_the_batch():
  x = jnp.asarray(np.stack([X, -X]))                  # (batch 2, 7)
  frozen = jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool)   # (7,), shared by both examples
  y = binarize.masked_sign(x, frozen)
  np.testing.assert_array_equal(y, [[-1, -1, -1, 0, 1, 1, 1], [1, 1, 1, 0, -1, -1, -1]])
  dx = jax.grad(lambda x: jnp.sum(binarize.masked_sign(x, frozen) * jnp.asarray(G)))(x)
  np.testing.assert_array_equal(dx, [[0, 2, 0, 4, 0, 6, 0], [0, 2, 0, 4, 0, 6, 0]])


# ---------------------------------------------------------------------------------------------
# masked_sign: gradients


@pytest.mark.parametrize('frozen_grad', binarize.FROZEN_GRADS)
def test_masked_sign_unfrozen_grad_is_clipped_identity_for_every_option(frozen_grad):
  _, dx = _vjp(_masked(jnp.zeros(7, bool), frozen_grad), X)
  np.testing.assert_array_equal(dx, IN_RANGE_G)


@pytest.mark.parametrize('frozen_grad, expected', [
    ('none', ZERO_G),              # STE-free: frozen entries pass nothing, even inside [-1, 1].
    ('ste_clipped', IN_RANGE_G),   # StoMPP+STE default.
    ('ste_identity', G),           # identity STE on frozen entries, also where |x| > 1.
])
def test_masked_sign_frozen_grad_options(frozen_grad, expected):
  _, dx = _vjp(_masked(jnp.ones(7, bool), frozen_grad), X)
  np.testing.assert_array_equal(dx, expected)


@pytest.mark.parametrize('frozen_grad, expected', [
    ('none', [0, 2, 0, 4, 0, 6, 0]),
    ('ste_clipped', [0, 2, 3, 4, 5, 6, 0]),
    ('ste_identity', [1, 2, 3, 4, 5, 6, 7]),
])
def test_masked_sign_grad_with_mixed_mask(frozen_grad, expected):
  frozen = jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool)
  _, dx = _vjp(_masked(frozen, frozen_grad), X)
  np.testing.assert_array_equal(dx, expected)


def test_masked_sign_mask_gets_no_gradient():
  frozen = jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool)
  _, pullback = jax.vjp(binarize.masked_sign, jnp.asarray(X), frozen)
  _, dfrozen = pullback(jnp.asarray(G))
  assert dfrozen.dtype == jax.dtypes.float0


def test_masked_sign_stompp_grad_matches_numerical_derivative_where_smooth():
  # STE-free StoMPP is the exact derivative of its forward (sign' = 0); away from the kinks
  # (x = 0 for frozen, |x| = 1 for unfrozen entries) it must agree with finite differences.
  x = jnp.asarray([-1.7, -0.6, -0.2, 0.3, 0.8, 1.5, -0.9, 0.45])
  frozen = jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1], bool)
  check_grads(_masked(frozen), (x,), order=1, modes=['rev'], eps=1e-3)
  check_grads(_masked(~frozen), (x,), order=1, modes=['rev'], eps=1e-3)


def test_masked_sign_rejects_unknown_frozen_grad():
  with pytest.raises(ValueError, match='ste_identity'):
    binarize.masked_sign(jnp.asarray(X), jnp.ones(7, bool), frozen_grad='identity')


# ---------------------------------------------------------------------------------------------
# ste_sign


@pytest.mark.parametrize('grad', binarize.STE_GRADS)
def test_ste_sign_forward_is_sign(grad):
  np.testing.assert_array_equal(binarize.ste_sign(jnp.asarray(X), grad=grad), SIGN_X)


@pytest.mark.parametrize('grad, expected', [('clipped', IN_RANGE_G), ('identity', G)])
def test_ste_sign_grads(grad, expected):
  _, dx = _vjp(lambda x: binarize.ste_sign(x, grad=grad), X)
  np.testing.assert_array_equal(dx, expected)


def test_ste_sign_rejects_unknown_grad():
  with pytest.raises(ValueError, match='clipped'):
    binarize.ste_sign(jnp.asarray(X), grad='none')


# ---------------------------------------------------------------------------------------------
# Residuals: the backward pass must keep booleans only (one bit per element), no float copy.

BINARIZERS = {
    'masked_sign/none': _masked(jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool), 'none'),
    'masked_sign/ste_clipped': _masked(jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool), 'ste_clipped'),
    'masked_sign/ste_identity': _masked(jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool), 'ste_identity'),
    'ste_sign/clipped': lambda x: binarize.ste_sign(x, grad='clipped'),
    'ste_sign/identity': lambda x: binarize.ste_sign(x, grad='identity'),
}


def _residual_dtypes(fn, *args):
  """dtypes of every array the pullback of fn keeps alive (its residuals)."""
  _, pullback = jax.vjp(fn, *args)
  return [leaf.dtype for leaf in jax.tree_util.tree_leaves(pullback)]


def test_residual_probe_detects_float_residuals():
  # Negative control: the same forward written with plain jnp ops keeps float residuals.
  frozen = jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool)
  plain = lambda x: jnp.where(frozen, jnp.sign(x), jnp.clip(x, -1, 1))
  dtypes = _residual_dtypes(plain, jnp.asarray(X))
  assert any(jnp.issubdtype(d, jnp.floating) for d in dtypes), dtypes


@pytest.mark.parametrize('name', sorted(BINARIZERS))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_residuals_are_boolean(name, dtype):
  dtypes = _residual_dtypes(BINARIZERS[name], jnp.asarray(X, dtype))
  assert all(d == jnp.bool_ for d in dtypes), f'{name} keeps non-boolean residuals {dtypes}'


def test_residuals_are_boolean_with_a_traced_mask():
  dtypes = _residual_dtypes(binarize.masked_sign, jnp.asarray(X), jnp.asarray(X > 0))
  assert dtypes and all(d == jnp.bool_ for d in dtypes), dtypes


@pytest.mark.parametrize('shape', [(1,), (7,), (8,), (9,), (3, 3, 5, 7), (2, 64)])
def test_pack_bits_round_trips_in_an_eighth_of_the_bytes(shape):
  bits = np.random.default_rng(sum(shape)).random(shape) < 0.5
  packed = binarize.pack_bits(jnp.asarray(bits))
  assert packed.dtype == jnp.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] // 8))
  np.testing.assert_array_equal(binarize.unpack_bits(packed, shape), bits)


def _residual_case():
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((5, 7, 3)) * 1.5).astype(np.float32)
  x.flat[:6] = [1.0, -1.0, 0.0, 1.0000001, -0.9999999, np.nan]  # Edges of sign and clip.
  return jnp.asarray(x), jnp.asarray(rng.random((5, 7, 3)) < 0.5)


@pytest.mark.parametrize('frozen_grad', binarize.FROZEN_GRADS)
def test_masked_sign_packed_residual_gives_the_same_values_and_grads(frozen_grad):
  residual = 'packed'
  x, frozen = _residual_case()
  g = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
  results = {}
  for option in ('bool', residual):
    y, pullback = jax.vjp(lambda x, o=option: binarize.masked_sign(
        x, frozen, frozen_grad=frozen_grad, residual=o), x)
    results[option] = (np.asarray(y), np.asarray(pullback(g)[0]))
  for want, got in zip(results['bool'], results[residual]):
    assert want.tobytes() == got.tobytes()


def test_ste_sign_packed_residual_gives_the_same_grads():
  x, _ = _residual_case()
  g = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
  want, got = (jax.vjp(lambda x, o=o: binarize.ste_sign(x, residual=o), x)[1](g)[0]
               for o in ('bool', 'packed'))
  assert np.asarray(want).tobytes() == np.asarray(got).tobytes()


@pytest.mark.parametrize('name', ['masked_sign', 'ste_sign'])
def test_packed_residuals_are_uint8_an_eighth_of_the_last_axis(name):
  x, frozen = _residual_case()
  fn = ((lambda x: binarize.masked_sign(x, frozen, residual='packed')) if name == 'masked_sign'
        else (lambda x: binarize.ste_sign(x, residual='packed')))
  _, pullback = jax.vjp(fn, x)
  leaves = jax.tree_util.tree_leaves(pullback)
  assert [(leaf.dtype, leaf.shape) for leaf in leaves] == [(jnp.uint8, (5, 7, 1))]


def test_unknown_residual_option_raises():
  with pytest.raises(ValueError, match='residual'):
    binarize.masked_sign(jnp.asarray(X), jnp.asarray(X > 0), residual='floats')
  with pytest.raises(ValueError, match='residual'):
    binarize.ste_sign(jnp.asarray(X), residual='floats')


# ---------------------------------------------------------------------------------------------
# dtypes and bfloat16


@pytest.mark.parametrize('name', sorted(BINARIZERS))
@pytest.mark.parametrize('dtype', FLOAT_DTYPES)
def test_dtype_is_preserved_forward_and_backward(name, dtype):
  y, dx = _vjp(BINARIZERS[name], jnp.asarray(X, dtype))
  assert y.dtype == dtype and dx.dtype == dtype


def test_bfloat16_values_and_grads_are_exact():
  # Every probe value, +-1 and the gradients 1..7 are exactly representable in bfloat16.
  frozen = jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool)
  y, dx = _vjp(_masked(frozen), jnp.asarray(X, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(y, np.float32), [-1, -1, -1, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(dx, np.float32), [0, 2, 0, 4, 0, 6, 0])
  y, dx = _vjp(lambda x: binarize.ste_sign(x), jnp.asarray(X, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(y, np.float32), SIGN_X)
  np.testing.assert_array_equal(np.asarray(dx, np.float32), IN_RANGE_G)


def test_bfloat16_boundary_just_outside_one_gets_no_gradient():
  # The next bfloat16 above 1 is 1 + 2^-7: outside the clip range, so no gradient.
  x = jnp.asarray([1.0, 1.0 + 2.0**-7, -1.0, -1.0 - 2.0**-7], jnp.bfloat16)
  _, dx = _vjp(_masked(jnp.zeros(4, bool)), x, g=[1.0, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(np.asarray(dx, np.float32), [1, 0, 1, 0])


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad, sharded inputs


def _loss(x, frozen, frozen_grad='none'):
  return jnp.sum(binarize.masked_sign(x, frozen, frozen_grad=frozen_grad) * jnp.asarray(G))


@pytest.mark.parametrize('frozen_grad', binarize.FROZEN_GRADS)
def test_jit_of_grad_matches_eager(frozen_grad):
  frozen = jnp.asarray([1, 0, 1, 0, 1, 0, 1], bool)
  expected = {'none': [0, 2, 0, 4, 0, 6, 0], 'ste_clipped': [0, 2, 3, 4, 5, 6, 0],
              'ste_identity': [1, 2, 3, 4, 5, 6, 7]}[frozen_grad]
  dx = jax.jit(jax.grad(_loss), static_argnums=2)(jnp.asarray(X), frozen, frozen_grad)
  np.testing.assert_array_equal(dx, expected)


def test_vmap_with_per_example_masks():
  frozen = jnp.asarray([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], bool)
  x = jnp.asarray(np.stack([X, X]))
  y = jax.vmap(binarize.masked_sign)(x, frozen)
  np.testing.assert_array_equal(y, np.stack([SIGN_X, CLIP_X]))
  dx = jax.vmap(jax.grad(_loss))(x, frozen)
  np.testing.assert_array_equal(dx, np.stack([ZERO_G, IN_RANGE_G]))


def test_vmap_with_a_shared_mask_and_ste_sign():
  x = jnp.asarray(np.stack([X, -X]))
  frozen = jnp.zeros(7, bool)
  y = jax.vmap(binarize.masked_sign, in_axes=(0, None))(x, frozen)
  np.testing.assert_array_equal(y, np.stack([CLIP_X, -CLIP_X]))
  y = jax.vmap(binarize.ste_sign)(x)
  np.testing.assert_array_equal(y, np.stack([SIGN_X, [1, 1, 1, 1, -1, -1, -1]]))


def test_second_order_grad_of_stompp_is_zero():
  # The backward is a select by a constant boolean: its own derivative is zero.
  frozen = jnp.zeros(7, bool)
  hvp = jax.grad(lambda x: jnp.sum(jax.grad(_loss)(x, frozen) * x))(jnp.asarray(X))
  np.testing.assert_array_equal(hvp, IN_RANGE_G)  # d/dx sum(g(x) * x) = g(x) since g' = 0.


def test_sharded_input_over_8_devices_matches_unsharded():
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ('data',))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-2, 2, (16, 7)), jnp.float32)
  frozen = jnp.asarray(rng.uniform(size=(16, 7)) < 0.5)
  sharding = NamedSharding(mesh, P('data'))
  xs, fs = jax.device_put(x, sharding), jax.device_put(frozen, sharding)

  c = jnp.asarray(rng.normal(size=(16, 7)), jnp.float32)
  fwd_and_grad = jax.jit(lambda x, f: (binarize.masked_sign(x, f),
                                       jax.grad(lambda x: jnp.sum(binarize.masked_sign(x, f) * c))(x)))
  y, dx = fwd_and_grad(xs, fs)
  y_ref, dx_ref = fwd_and_grad(x, frozen)
  assert y.sharding.is_equivalent_to(sharding, 2)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)
  # And both equal the formula.
  xn, fn = np.asarray(x), np.asarray(frozen)
  y_formula = np.where(fn, np.where(xn >= 0, 1, -1), np.clip(xn, -1, 1))
  np.testing.assert_array_equal(y, y_formula)
  np.testing.assert_array_equal(dx, np.where(~fn & (np.abs(xn) <= 1), np.asarray(c), 0))
