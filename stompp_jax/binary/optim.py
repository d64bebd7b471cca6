"""optax transformations for binary kernels.

`zero_frozen_updates`: STE-free StoMPP commits frozen entries, so their updates are zeroed
(momentum must not keep moving them). Its masks come from `context.site_frozen_mask`, the same
function the forward pass uses. It needs the step's `BinarizationContext` as an extra argument:

    tx = optax.chain(optax.sgd(0.1, momentum=0.9), zero_frozen_updates(sites))
    updates, opt_state = tx.update(grads, opt_state, params, binarization_context=ctx)

`clip_latent_kernels`: the STE baseline keeps latent kernels in [-1, 1] after every step.

Both take `sites`, the run's site tree (binary/site_tree.py: params-shaped, the site index at
each binary kernel, None elsewhere); other parameters pass through untouched, and updates of
another structure raise ValueError. Put them last in a chain so they act on the final update.
"""

from typing import Any

import jax.numpy as jnp
import optax

from stompp_jax.binary import context
from stompp_jax.binary import site_tree


def zero_frozen_updates(sites: Any) -> optax.GradientTransformationExtraArgs:
  """Zeroes the updates of frozen kernel entries.

  Extra argument of `update`: `binarization_context` (a context.BinarizationContext of the step
  whose gradient is being applied).
  """

  def init_fn(params):
    site_tree.check_structure(sites, params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, binarization_context, **extra):
    del params, extra

    def zero_frozen(update, site):
      frozen = context.site_frozen_mask(binarization_context, site, 'kernel', update.shape)
      return jnp.where(frozen, jnp.zeros_like(update), update)

    return site_tree.map_sites(zero_frozen, sites, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_latent_kernels(sites: Any) -> optax.GradientTransformationExtraArgs:
  """Makes the update keep binary latent kernels inside [-1, 1] (BinaryConnect)."""

  def init_fn(params):
    site_tree.check_structure(sites, params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError('clip_latent_kernels needs params: call tx.update(grads, state, params).')

    def clip(update, site, param):
      del site
      return jnp.clip(param + update, -1, 1) - param

    return site_tree.map_sites(clip, sites, updates, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
