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


def _derive(words: jax.Array, value) -> jax.Array:
  """New key words from `words` and an integer `value` (may be traced)."""
  value = jnp.asarray(value).astype(jnp.uint32)
  first = _mix(words[0] ^ _mix(value + _GOLDEN))
  second = _mix(words[1] + _mix(first ^ value))
  return jnp.stack([first, second])


def site_key(key: jax.Array, site: int, tensor: str) -> jax.Array:
  """The mask key (uint32 (2,)) of one binarized tensor: `tensor` ('kernel' | 'input') of `site`."""
  if tensor not in TENSORS:
    raise ValueError(f'Unknown tensor {tensor!r}: use one of {", ".join(TENSORS)}.')
  return _derive(_derive(_key_words(key), site), TENSORS.index(tensor))


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
  if refresh_every < 0:
    raise ValueError(f'refresh_every must be >= 0 (0 = never), got {refresh_every}.')
  if refresh_every == 0:
    return uniform(key, 1, shape)
  step = jnp.asarray(step, jnp.int32)
  words = _key_words(key)
  phase = _bits(words, 0, shape) % np.uint32(refresh_every)
  epoch = step // refresh_every
  # e_j = epoch or epoch + 1: pick that epoch's stream words per element, then hash once
  # (the same values as uniform(key, 1 + e_j) element by element).
  in_next_epoch = (step % refresh_every).astype(jnp.uint32) + phase >= refresh_every
  current, following = _derive(words, 1 + epoch), _derive(words, 2 + epoch)
  first = jnp.where(in_next_epoch, following[0], current[0])
  second = jnp.where(in_next_epoch, following[1], current[1])
  return _to_unit(_hash(first, second, shape))


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
