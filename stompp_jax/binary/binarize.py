"""Binarizers as `jax.custom_vjp` functions (docs/method.md, "Binarizers").

All functions are elementwise, keep the input dtype, and save only a boolean residual
for the backward pass (one bit of information per element instead of a float copy).

Residuals (`residual=`): 'bool' keeps one bool per element; 'packed' keeps the same bits
packed eight to a byte (uint8). Values and gradients are the same bit for bit; the train step
takes `binary.residuals` (binary/context.py: packed on CPU, bool on TPU and GPU, where the
packing's extra passes cost more HBM traffic than the smaller residual saves). Why packing pays
on XLA:CPU beyond the 8x: a bool residual that is a cheap
elementwise function of x is recomputed by XLA's fusion inside every backward consumer instead
of being stored, so x itself stays alive until the backward pass (a float32 activation where a
bool would do), and for a latent kernel both optimizer updates (params and momentum) read the
old kernel, which makes XLA copy every donated kernel at the start of the step. A packed
residual is made by a reduction, which XLA does not duplicate into its consumers.

    masked_sign(x, frozen)      StoMPP:  frozen * sign(x) + (1 - frozen) * clip(x, -1, 1)
    ste_sign(x)                 BinaryConnect-style baseline: sign(x) with a straight-through
                                gradient

sign(0) = +1 everywhere [ours]. sign(NaN) = NaN [ours]: a NaN is never turned into -1, so a NaN
upstream of a committed (frozen) binarizer reaches the loss, and the train step's finiteness
check drops that update, instead of training on as if the value were negative.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from stompp_jax.choices import check_choice

FROZEN_GRADS = ('none', 'ste_clipped', 'ste_identity')
STE_GRADS = ('clipped', 'identity')


def sign(x: jax.Array) -> jax.Array:
  """Hard sign with sign(0) = +1 and sign(NaN) = NaN, in the dtype of `x`."""
  return jnp.where(x >= 0, 1, jnp.where(x < 0, -1, x)).astype(x.dtype)


def _in_clip_range(x: jax.Array) -> jax.Array:
  return jnp.abs(x) <= 1


RESIDUALS = ('bool', 'packed')
_BIT_WEIGHTS = np.uint8(1) << np.arange(8, dtype=np.uint8)


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape `pack_bits` gives a bool array of `shape`: the last axis (1 for a scalar) packed
  into ceil(n / 8) bytes, the leading axes kept."""
  shape = tuple(shape) or (1,)
  return (*shape[:-1], -(-shape[-1] // 8))


def pack_bits(bits: jax.Array) -> jax.Array:
  """bool array -> uint8 of `packed_shape`: bit j of byte k holds element 8k + j of the last
  axis. Leading axes (a batch sharded over devices, say) are kept: packing is local to each
  device's shard and never moves data between devices."""
  bits = bits.reshape(bits.shape or (1,))
  bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, -bits.shape[-1] % 8)])
  grouped = bits.reshape(*bits.shape[:-1], -1, 8).astype(jnp.uint8)
  return jnp.sum(grouped * _BIT_WEIGHTS, axis=-1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `pack_bits`: the bool array of `shape`."""
  last = shape[-1] if shape else 1
  bits = (packed[..., None] & _BIT_WEIGHTS) != 0
  return bits.reshape(*packed.shape[:-1], -1)[..., :last].reshape(shape)


def _save(bits: jax.Array, residual: str):
  return pack_bits(bits) if residual == 'packed' else bits


def _load(saved, residual: str, shape: tuple[int, ...]):
  return unpack_bits(saved, shape) if residual == 'packed' else saved


def _passes(x, frozen, frozen_grad):
  """bool: the entries whose gradient passes (`masked_sign`'s backward)."""
  in_range = _in_clip_range(x)
  if frozen_grad == 'none':
    return in_range & ~frozen
  if frozen_grad == 'ste_clipped':
    return in_range
  return in_range | frozen  # ste_identity


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _masked_sign(x, frozen, frozen_grad, residual):
  return jnp.where(frozen, sign(x), jnp.clip(x, -1, 1).astype(x.dtype))


def _masked_sign_fwd(x, frozen, frozen_grad, residual):
  y = _masked_sign(x, frozen, frozen_grad, residual)
  return y, _save(_passes(x, frozen, frozen_grad), residual)


def _masked_sign_bwd(frozen_grad, residual, saved, g):
  del frozen_grad
  passes = _load(saved, residual, g.shape)
  return jnp.where(passes, g, jnp.zeros_like(g)), None


_masked_sign.defvjp(_masked_sign_fwd, _masked_sign_bwd)


def masked_sign(x: jax.Array, frozen: jax.Array, *, frozen_grad: str = 'none',
                residual: str = 'bool') -> jax.Array:
  """StoMPP partial binarizer.

  Args:
    x: any shape, floating dtype (latent weights or pre-binarization activations).
    frozen: bool, broadcastable to `x.shape`; True entries are committed to sign(x).
    frozen_grad: gradient on frozen entries. 'none' (STE-free StoMPP): frozen entries pass
      no gradient. 'ste_clipped' (StoMPP+STE default): 1[|x| <= 1] * g. 'ste_identity': g.
    residual: what the backward pass keeps (module docstring): 'bool', one bool per element
      (which entries pass gradient), or 'packed', those bits eight to a byte. The same values
      and gradients either way.

  Returns:
    Same shape and dtype as `x`: sign(x) where frozen, clip(x, -1, 1) elsewhere.
    Backward: unfrozen entries pass 1[|x| <= 1] * g; frozen ones as `frozen_grad` says.
  """
  check_choice('frozen_grad', frozen_grad, FROZEN_GRADS)
  check_choice('residual', residual, RESIDUALS)
  frozen = jnp.broadcast_to(jnp.asarray(frozen, bool), x.shape)
  return _masked_sign(x, frozen, frozen_grad, residual)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _ste_sign(x, grad, residual):
  return sign(x)


def _ste_sign_fwd(x, grad, residual):
  saved = _save(_in_clip_range(x), residual) if grad == 'clipped' else None
  return sign(x), saved


def _ste_sign_bwd(grad, residual, saved, g):
  if grad == 'clipped':
    g = jnp.where(_load(saved, residual, g.shape), g, jnp.zeros_like(g))
  return (g,)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def ste_sign(x: jax.Array, *, grad: str = 'clipped', residual: str = 'bool') -> jax.Array:
  """BinaryConnect-style binarizer: forward sign(x), straight-through backward.

  Args:
    x: any shape, floating dtype.
    grad: 'clipped' passes 1[|x| <= 1] * g (BinaryNet, used for activations);
      'identity' passes g unchanged (BinaryConnect, used for weights whose latent values the
      optimizer clips to [-1, 1]).
    residual: 'bool' (one bool per element) or 'packed' (eight to a byte) for 'clipped';
      'identity' keeps nothing.

  Returns:
    sign(x), same shape and dtype as `x`.
  """
  check_choice('ste grad', grad, STE_GRADS)
  check_choice('ste residual', residual, RESIDUALS)
  return _ste_sign(x, grad, residual)
