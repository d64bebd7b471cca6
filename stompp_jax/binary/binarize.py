"""Binarizers as `jax.custom_vjp` functions (docs/method.md, "Binarizers").

All functions are elementwise, keep the input dtype, and save only a boolean residual
for the backward pass (one bit of information per element instead of a float copy).

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

from stompp_jax.binary.choices import check_choice

FROZEN_GRADS = ('none', 'ste_clipped', 'ste_identity')
STE_GRADS = ('clipped', 'identity')


def sign(x: jax.Array) -> jax.Array:
  """Hard sign with sign(0) = +1 and sign(NaN) = NaN, in the dtype of `x`."""
  return jnp.where(x >= 0, 1, jnp.where(x < 0, -1, x)).astype(x.dtype)


def _in_clip_range(x: jax.Array) -> jax.Array:
  return jnp.abs(x) <= 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_sign(x, frozen, frozen_grad):
  return jnp.where(frozen, sign(x), jnp.clip(x, -1, 1).astype(x.dtype))


def _masked_sign_fwd(x, frozen, frozen_grad):
  in_range = _in_clip_range(x)
  if frozen_grad == 'none':
    passes = in_range & ~frozen
  elif frozen_grad == 'ste_clipped':
    passes = in_range
  else:  # ste_identity
    passes = in_range | frozen
  return _masked_sign(x, frozen, frozen_grad), passes


def _masked_sign_bwd(frozen_grad, passes, g):
  del frozen_grad
  return jnp.where(passes, g, jnp.zeros_like(g)), None


_masked_sign.defvjp(_masked_sign_fwd, _masked_sign_bwd)


def masked_sign(x: jax.Array, frozen: jax.Array, *, frozen_grad: str = 'none') -> jax.Array:
  """StoMPP partial binarizer.

  Args:
    x: any shape, floating dtype (latent weights or pre-binarization activations).
    frozen: bool, broadcastable to `x.shape`; True entries are committed to sign(x).
    frozen_grad: gradient on frozen entries. 'none' (STE-free StoMPP): frozen entries pass
      no gradient. 'ste_clipped' (StoMPP+STE default): 1[|x| <= 1] * g. 'ste_identity': g.

  Returns:
    Same shape and dtype as `x`: sign(x) where frozen, clip(x, -1, 1) elsewhere.
    Backward: unfrozen entries pass 1[|x| <= 1] * g; frozen ones as `frozen_grad` says.
  """
  check_choice('frozen_grad', frozen_grad, FROZEN_GRADS)
  frozen = jnp.broadcast_to(jnp.asarray(frozen, bool), x.shape)
  return _masked_sign(x, frozen, frozen_grad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_sign(x, grad):
  return sign(x)


def _ste_sign_fwd(x, grad):
  residual = _in_clip_range(x) if grad == 'clipped' else None
  return sign(x), residual


def _ste_sign_bwd(grad, in_range, g):
  if grad == 'clipped':
    g = jnp.where(in_range, g, jnp.zeros_like(g))
  return (g,)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def ste_sign(x: jax.Array, *, grad: str = 'clipped') -> jax.Array:
  """BinaryConnect-style binarizer: forward sign(x), straight-through backward.

  Args:
    x: any shape, floating dtype.
    grad: 'clipped' passes 1[|x| <= 1] * g (BinaryNet, used for activations);
      'identity' passes g unchanged (BinaryConnect, used for weights whose latent values the
      optimizer clips to [-1, 1]).

  Returns:
    sign(x), same shape and dtype as `x`.
  """
  check_choice('ste grad', grad, STE_GRADS)
  return _ste_sign(x, grad)
