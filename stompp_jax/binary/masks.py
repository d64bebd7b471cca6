"""Stateless per-element frozen masks with soft refresh (METHOD.md, "Masks").

Every element of a binarized tensor has a score s in [0, 1) and is frozen iff s < p, where p
is its site's frozen fraction. Scores are a pure function of (key, step): nothing is stored,
a resumed run sees the same masks, and with `jax_threefry_partitionable` (the default) the
masks do not depend on how the tensor is sharded.

Soft refresh with period r: element j has a fixed phase o_j in {0..r-1}; its score epoch is
e_j(t) = floor((t + o_j) / r) and its score is U(key, 1 + e_j(t)). So each element re-draws its
score once every r steps, and about 1/r of the scores change at any step. Between re-draws the
frozen set only grows as p rises (nested masks). r = 0 means the scores never change.
"""

import jax
import jax.numpy as jnp

TENSORS = ('kernel', 'input')


def site_key(key: jax.Array, site: int, tensor: str) -> jax.Array:
  """The mask key of one binarized tensor: `tensor` ('kernel' or 'input') of `site`."""
  if tensor not in TENSORS:
    raise ValueError(f'Unknown tensor {tensor!r}: use one of {", ".join(TENSORS)}.')
  return jax.random.fold_in(jax.random.fold_in(key, site), TENSORS.index(tensor))


def element_scores(key: jax.Array, step: jax.Array, shape: tuple[int, ...],
                   refresh_every: int) -> jax.Array:
  """Per-element scores in [0, 1) at `step`.

  Args:
    key: PRNG key of this tensor (see `site_key`).
    step: int scalar, may be traced.
    shape: static shape of the tensor.
    refresh_every: static int r >= 0; 0 disables refresh.

  Returns:
    float32 array of `shape`.
  """
  if refresh_every < 0:
    raise ValueError(f'refresh_every must be >= 0 (0 = never), got {refresh_every}.')
  if refresh_every == 0:
    return jax.random.uniform(jax.random.fold_in(key, 1), shape)
  step = jnp.asarray(step, jnp.int32)
  phase = jax.random.randint(jax.random.fold_in(key, 0), shape, 0, refresh_every)
  epoch = step // refresh_every
  # e_j = epoch or epoch + 1, so two uniform fields cover every element.
  in_next_epoch = (step % refresh_every) + phase >= refresh_every
  current = jax.random.uniform(jax.random.fold_in(key, 1 + epoch), shape)
  following = jax.random.uniform(jax.random.fold_in(key, 2 + epoch), shape)
  return jnp.where(in_next_epoch, following, current)


def frozen_mask(key: jax.Array, step: jax.Array, fraction: jax.Array, shape: tuple[int, ...],
                refresh_every: int) -> jax.Array:
  """Boolean frozen mask: about `fraction` of the entries are True.

  Args:
    key: PRNG key of this tensor (see `site_key`).
    step: int scalar training step, may be traced.
    fraction: float scalar p in [0, 1], may be traced; p = 0 freezes nothing, p = 1 everything.
    shape: static shape of the mask (the tensor's shape, or its non-batch shape).
    refresh_every: static int r >= 0; scores are re-drawn once every r steps per element.

  Returns:
    bool array of `shape`.
  """
  return element_scores(key, step, shape, refresh_every) < fraction
