"""Stateless per-element frozen masks with soft refresh (docs/method.md, "Masks").

Every element of a binarized tensor has a score s in [0, 1) and is frozen iff s < p, where p
is its site's frozen fraction. Scores are a pure function of (key, step): nothing is stored, a
resumed run sees the same masks.

Soft refresh with period r: element j has a fixed phase o_j in {0..r-1}; its score epoch is
e_j(t) = floor((t + o_j) / r) and its score is U(key, 1 + e_j(t)). So each element re-draws its
score once every r steps, and about 1/r of the scores change at any step. Between re-draws the
frozen set only grows as p rises (nested masks). r = 0 means the scores never change.

Random numbers: U(key, stream)[j] is a counter-based hash of (key, stream, flat index j), not
threefry. ~300 unrolled threefry instances made a ResNet-50 step take minutes to compile on CPU,
while the hash is a few integer ops that XLA fuses into one loop per tensor. A refreshed score
costs two hash fields per element: the phase o_j, and U(key, 1 + e_j(t))[j] with the stream
words of the element's own epoch chosen before hashing (the two epochs' words are scalars).
Being elementwise in the flat index, the values do not depend on how the tensor is sharded.
"""

import jax
import jax.numpy as jnp
import numpy as np

TENSORS = ('kernel', 'input')
_GOLDEN = np.uint32(0x9E3779B9)


def _mix(x: jax.Array) -> jax.Array:
  """A 32-bit integer finalizer with full avalanche (lowbias32, C. Wellons)."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _key_words(key: jax.Array) -> jax.Array:
  """uint32 (2,) words of a raw (uint32[2]) or typed PRNG key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32).reshape(-1)[:2]


def _derive_pair(first: jax.Array, second: jax.Array, value) -> tuple[jax.Array, jax.Array]:
  """`_derive` on the two words held apart (any matching shapes; no stacking, which keeps the
  fused code of a vectorized derivation small)."""
  value = jnp.asarray(value).astype(jnp.uint32)
  new_first = _mix(first ^ _mix(value + _GOLDEN))
  return new_first, _mix(second + _mix(new_first ^ value))


def _derive(words: jax.Array, value) -> jax.Array:
  """New key words (..., 2) from `words` (..., 2) and an integer `value` (may be traced; an
  array broadcasts against the leading dims of `words`)."""
  return jnp.stack(_derive_pair(words[..., 0], words[..., 1], value), axis=-1)


def site_key(key: jax.Array, site: int, tensor: str) -> jax.Array:
  """The mask key (uint32 (2,)) of one binarized tensor: `tensor` ('kernel' | 'input') of `site`."""
  if tensor not in TENSORS:
    raise ValueError(f'Unknown tensor {tensor!r}: use one of {", ".join(TENSORS)}.')
  return _derive(_derive(_key_words(key), site), TENSORS.index(tensor))


def all_site_keys(key: jax.Array, num_sites: int) -> tuple[jax.Array, jax.Array]:
  """Every site's keys in one vectorized computation (the same integer operations, the same
  words): (first, second) words, uint32 (num_sites, 2) each, [site, TENSORS.index(tensor)] being
  `site_key(key, site, tensor)`."""
  words = _key_words(key)
  sites = jnp.arange(num_sites, dtype=jnp.uint32)
  first, second = _derive_pair(words[0], words[1], sites)
  tensors = jnp.arange(len(TENSORS), dtype=jnp.uint32)[None, :]
  return _derive_pair(first[:, None], second[:, None], tensors)


def _hash(first: jax.Array, second: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 array of `shape`: hash of stream words (first, second; scalars or of `shape`) and the
  flat element index."""
  size = int(np.prod(shape, dtype=np.int64))
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _mix(_mix(index ^ first) + second)


def _bits(words: jax.Array, stream, shape: tuple[int, ...]) -> jax.Array:
  """uint32 array of `shape`: hash of (key words, stream, flat element index)."""
  stream_words = _derive(words, stream)
  return _hash(stream_words[0], stream_words[1], shape)


def _to_unit(bits: jax.Array) -> jax.Array:
  """uint32 -> float32 in [0, 1) from the top 24 bits."""
  return (bits >> 8).astype(jnp.float32) * np.float32(2.0**-24)


def uniform(key: jax.Array, stream, shape: tuple[int, ...]) -> jax.Array:
  """float32 array of `shape` in [0, 1) with 24 random bits per element (stream may be traced)."""
  return _to_unit(_bits(_key_words(key), stream, shape))


def stream_words(words, step: jax.Array, refresh_every: int) -> jax.Array:
  """The scalar part of the scores at `step`: uint32 (..., 7).

  Args:
    words: key words, uint32 (..., 2) (a tensor's `site_key`), or their (first, second) pair
      of any matching shapes (`all_site_keys`: every site at once).
    step: int scalar, may be traced.
    refresh_every: static int r >= 0.

  Returns:
    [phase stream 0 words (2), epoch words of e = floor(t / r) (2), of e + 1 (2), t mod r]; with
    r = 0 the epoch words are those of stream 1 and the rest is unused. `scores_from_words`
    does the per-element part.
  """
  if refresh_every < 0:
    raise ValueError(f'refresh_every must be >= 0 (0 = never), got {refresh_every}.')
  if not isinstance(words, tuple):
    words = jnp.asarray(words, jnp.uint32)
    words = (words[..., 0], words[..., 1])
  if refresh_every == 0:
    stream1 = _derive_pair(*words, 1)
    zero = jnp.zeros_like(stream1[0])
    parts = (zero, zero) + stream1 + (zero, zero, zero)
  else:
    step = jnp.asarray(step, jnp.int32)
    epoch = step // refresh_every
    position = jnp.broadcast_to((step % refresh_every).astype(jnp.uint32), words[0].shape)
    parts = (_derive_pair(*words, 0) + _derive_pair(*words, 1 + epoch)
             + _derive_pair(*words, 2 + epoch) + (position,))
  return jnp.stack(parts, axis=-1)


def scores_from_words(words: jax.Array, shape: tuple[int, ...], refresh_every: int) -> jax.Array:
  """Per-element scores (float32, `shape`) from one tensor's `stream_words` (7,)."""
  if refresh_every == 0:
    return _to_unit(_hash(words[2], words[3], shape))
  phase = _hash(words[0], words[1], shape) % np.uint32(refresh_every)
  # e_j = epoch or epoch + 1: pick that epoch's stream words per element, then hash once
  # (the same values as uniform(key, 1 + e_j) element by element).
  in_next_epoch = words[6] + phase >= refresh_every
  first = jnp.where(in_next_epoch, words[4], words[2])
  second = jnp.where(in_next_epoch, words[5], words[3])
  return _to_unit(_hash(first, second, shape))


def element_scores(key: jax.Array, step: jax.Array, shape: tuple[int, ...],
                   refresh_every: int) -> jax.Array:
  """Per-element scores in [0, 1) at `step`.

  Args:
    key: key of this tensor (see `site_key`).
    step: int scalar, may be traced.
    shape: static shape of the tensor.
    refresh_every: static int r >= 0; 0 disables refresh.

  Returns:
    float32 array of `shape`.
  """
  return scores_from_words(stream_words(_key_words(key), step, refresh_every), shape,
                           refresh_every)


def frozen_mask(key: jax.Array, step: jax.Array, fraction: jax.Array, shape: tuple[int, ...],
                refresh_every: int) -> jax.Array:
  """Boolean frozen mask: about `fraction` of the entries are True.

  Args:
    key: key of this tensor (see `site_key`).
    step: int scalar training step, may be traced.
    fraction: float scalar p in [0, 1], may be traced; p = 0 freezes nothing, p = 1 everything.
    shape: static shape of the mask (the tensor's shape, or its non-batch shape).
    refresh_every: static int r >= 0; scores are re-drawn once every r steps per element.

  Returns:
    bool array of `shape`.
  """
  return element_scores(key, step, shape, refresh_every) < fraction


def frozen_mask_from_words(words: jax.Array, fraction: jax.Array, shape: tuple[int, ...],
                           refresh_every: int) -> jax.Array:
  """`frozen_mask` from one tensor's `stream_words` (7,): the per-element part alone."""
  return scores_from_words(words, shape, refresh_every) < fraction
