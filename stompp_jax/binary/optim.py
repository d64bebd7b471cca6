"""optax transformations for binary kernels.

`zero_frozen_updates`: STE-free StoMPP commits frozen entries, so their updates are zeroed
(momentum must not keep moving them). Its masks come from `context.site_frozen_mask`, the same
function the forward pass uses. It needs the step's `BinarizationContext` as an extra argument:

    tx = optax.chain(optax.sgd(0.1, momentum=0.9), zero_frozen_updates(kernel_sites))
    updates, opt_state = tx.update(grads, opt_state, params, binarization_context=ctx)

`clip_latent_kernels`: the STE baseline keeps latent kernels in [-1, 1] after every step.

Both take `kernel_sites`: {param path (tuple of str): site index} of the binary kernels; other
parameters pass through untouched. Put them last in a chain so they act on the final update.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from stompp_jax.binary import context

KernelSites = Mapping[tuple[str, ...], int]


def _key_path(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _map_kernels(fn: Callable[[jax.Array, int, Any], jax.Array], updates, kernel_sites: KernelSites,
                 params=None):
  """Applies fn(update, site, param) to binary-kernel leaves of `updates`."""
  def visit(path, update, *param):
    site = kernel_sites.get(_key_path(path))
    if site is None:
      return update
    return fn(update, site, param[0] if param else None)

  if params is None:
    return jax.tree_util.tree_map_with_path(visit, updates)
  return jax.tree_util.tree_map_with_path(visit, updates, params)


def zero_frozen_updates(kernel_sites: KernelSites) -> optax.GradientTransformationExtraArgs:
  """Zeroes the updates of frozen kernel entries.

  Extra argument of `update`: `binarization_context` (a context.BinarizationContext of the step
  whose gradient is being applied).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, binarization_context, **extra):
    del params, extra

    def zero_frozen(update, site, param):
      del param
      frozen = context.site_frozen_mask(binarization_context, site, 'kernel', update.shape)
      return jnp.where(frozen, jnp.zeros_like(update), update)

    return _map_kernels(zero_frozen, updates, kernel_sites), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip_latent_kernels(kernel_sites: KernelSites) -> optax.GradientTransformationExtraArgs:
  """Makes the update keep binary latent kernels inside [-1, 1] (BinaryConnect)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    del extra
    if params is None:
      raise ValueError('clip_latent_kernels needs params: call tx.update(grads, state, params).')

    def clip(update, site, param):
      del site
      return jnp.clip(param + update, -1, 1) - param

    return _map_kernels(clip, updates, kernel_sites, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
