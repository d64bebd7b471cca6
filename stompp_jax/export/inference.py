"""Reference inference of an exported fully binary network (docs/export.md), in JAX.

    model = inference.load('/tmp/export')              # reads manifest.json and tensors.npz only
    logits = model(images)                             # float (B, H, W, C) -> float32 (B, classes)

Nothing here imports the model code or Flax: the export's program (a list of ops over named
values) is interpreted op by op. Binary layers of a BNN compute with bits only: their input
is packed into uint32 words (32 channels per word) and multiplied with the packed kernel by
XNOR-popcount. For C channels of +-1 values a and w packed into words,

    sum_c a_c * w_c = agreements - disagreements = C - 2 * popcount(a XOR w)

(agreements = popcount(XNOR(a, w)) over the C real bits; computing the disagreements with XOR
lets the zero pad bits, equal in both operands, drop out: the form larq compute engine and
daBNN use). Zero padding of the training-time conv has no bit: a padded tap contributes 0,
so each output position sums only over its valid taps. Binary-weight (BWN) layers have real
inputs, so XNOR does not apply: their stored bits are decoded to +-1 at call time and used
in a float conv (multiplying by +-1 is exact).

Everything is jit-compatible; `ExportedModel.__call__` jits the whole program.
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stompp_jax import compiler

from stompp_jax.export import files
from stompp_jax.export.fold import batch_norm

WORD_BYTES = 4  # uint32 words: 32 channels per word.


def bytes_to_words(packed: jax.Array) -> jax.Array:
  """uint8 (..., n) packed bytes -> uint32 (..., ceil(n / 4)) words; zero bytes pad the tail."""
  pad = -packed.shape[-1] % WORD_BYTES
  packed = jnp.pad(packed, [(0, 0)] * (packed.ndim - 1) + [(0, pad)])
  grouped = packed.reshape(*packed.shape[:-1], -1, WORD_BYTES)
  return jax.lax.bitcast_convert_type(grouped, jnp.uint32)


def pack_signs(x: jax.Array) -> jax.Array:
  """float (..., C) -> uint32 (..., ceil(C / 32)): bit 1 where x >= 0 (sign(0) = +1)."""
  return bytes_to_words(jnp.packbits(x >= 0, axis=-1))


def kernel_words(packed_kernel: jax.Array) -> jax.Array:
  """Stored binary kernel -> (..., out, words) for `xor_popcount`.

  packed_kernel: uint8 (kh, kw, ceil(cin / 8), cout) of a conv or (ceil(in / 8), out) of a dense.
  Returns uint32 (kh, kw, cout, words) or (out, words).
  """
  return bytes_to_words(jnp.swapaxes(packed_kernel, -1, -2))


def decode_signs(packed_kernel: jax.Array, count: int) -> jax.Array:
  """Stored binary kernel -> float32 +-1 kernel; bytes on axis -2, `count` real channels there."""
  bits = jnp.unpackbits(packed_kernel, axis=-2, count=count)
  return jnp.where(bits == 1, 1.0, -1.0).astype(jnp.float32)


def xor_popcount(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Disagreeing bits: x uint32 (..., words), kernel (out, words) -> int32 (..., out)."""
  differing = jnp.bitwise_xor(x[..., None, :], kernel)
  return jax.lax.population_count(differing).astype(jnp.int32).sum(-1)


def _pads(padding: Any, spatial: Sequence[int], window: Sequence[int],
          strides: Sequence[int]) -> list[tuple[int, int]]:
  """'SAME' | 'VALID' | explicit pairs -> [(lo, hi), (lo, hi)] as lax resolves them."""
  if isinstance(padding, str):
    return list(jax.lax.padtype_to_pads(spatial, window, strides, padding))
  return [tuple(p) for p in padding]


def binary_conv(x: jax.Array, kernel: jax.Array, *, in_channels: int, strides: Sequence[int],
                padding: Any) -> jax.Array:
  """XNOR-popcount conv of +-1 inputs and kernels, equal to the float conv of the +-1 values.

  Args:
    x: uint32 (B, H, W, words), `pack_signs` of the +-1 input.
    kernel: uint32 (kh, kw, cout, words), `kernel_words` of the stored kernel.
    in_channels: real channels C in the words.
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or [(lo, hi), (lo, hi)]; padded taps count as 0 (zero padding).

  Returns:
    int32 (B, H', W', cout): per output position, the sum over valid taps of C - 2 * popcount.
  """
  kh, kw = kernel.shape[:2]
  (top, bottom), (left, right) = _pads(padding, x.shape[1:3], (kh, kw), strides)
  padded = jnp.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])
  valid = jnp.pad(jnp.ones(x.shape[1:3], jnp.int32), [(top, bottom), (left, right)])
  sh, sw = strides
  out_h = (padded.shape[1] - kh) // sh + 1
  out_w = (padded.shape[2] - kw) // sw + 1
  y = jnp.zeros((x.shape[0], out_h, out_w, kernel.shape[2]), jnp.int32)
  for i in range(kh):
    for j in range(kw):
      rows = slice(i, i + sh * (out_h - 1) + 1, sh)
      cols = slice(j, j + sw * (out_w - 1) + 1, sw)
      taps = in_channels - 2 * xor_popcount(padded[:, rows, cols], kernel[i, j])
      y = y + valid[rows, cols, None] * taps
  return y


def float_conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int], padding: Any,
               groups: int = 1) -> jax.Array:
  """The training-time conv (NHWC, HWIO): x (B, H, W, C), kernel (kh, kw, C / groups, cout).

  Returns (B, H', W', cout) in the operands' dtype.
  """
  if not isinstance(padding, str):
    padding = [tuple(p) for p in padding]
  return jax.lax.conv_general_dilated(x, kernel, window_strides=tuple(strides), padding=padding,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=groups)


def threshold_signs(y: jax.Array, threshold: jax.Array, flip: jax.Array) -> jax.Array:
  """Folded BatchNorm + sign of an integer conv output: int32 (..., C) -> packed uint32 words.

  The bit (+1) is (y >= threshold) XOR flip, per channel.
  """
  bits = (y >= threshold) != flip
  return bytes_to_words(jnp.packbits(bits, axis=-1))


def _conv(op, v, t):
  x = v[op['input']]
  if op['precision'] == 'binary':
    return binary_conv(x, kernel_words(t[op['kernel']]), in_channels=op['in_channels'],
                       strides=op['strides'], padding=op['padding'])
  kernel = t[op['kernel']]
  if op['precision'] == 'binary_weight':
    kernel = decode_signs(kernel, op['in_channels'] // op['groups'])
  y = float_conv(x, kernel, strides=op['strides'], padding=op['padding'], groups=op['groups'])
  return y + t[op['bias']] if op.get('bias') else y


def _dense(op, v, t):
  x, kernel = v[op['input']], t[op['kernel']]
  if op['precision'] == 'binary':
    y = op['in_channels'] - 2 * xor_popcount(x, kernel_words(kernel))
  else:
    if op['precision'] == 'binary_weight':
      kernel = decode_signs(kernel, op['in_channels'])
    y = x @ kernel
  return y.astype(jnp.float32) + t[op['bias']] if op.get('bias') else y


def _max_pool(op, v, t):
  del t
  window, strides = tuple(op['window']), tuple(op['strides'])
  return jax.lax.reduce_window(v[op['input']], -jnp.inf, jax.lax.max, (1, *window, 1),
                               (1, *strides, 1), op['padding'])


# One function per op kind: (op, values, tensors) -> the op's output value.
OPS: dict[str, Callable[[dict, dict, dict], jax.Array]] = {
    'conv': _conv,
    'dense': _dense,
    'batch_norm': lambda op, v, t: batch_norm(v[op['input']], t[op['center']],
                                              t[op['multiplier']], t[op['offset']]),
    'threshold': lambda op, v, t: threshold_signs(v[op['input']], t[op['threshold']],
                                                  t[op['flip']]),
    'sign': lambda op, v, t: pack_signs(v[op['input']]),
    'binarize': lambda op, v, t: jnp.where(v[op['input']] >= 0, 1.0, -1.0).astype(jnp.float32),
    'relu': lambda op, v, t: jax.nn.relu(v[op['input']]),
    'add': lambda op, v, t: v[op['inputs'][0]] + v[op['inputs'][1]],
    'max_pool': _max_pool,
    'global_average_pool': lambda op, v, t: jnp.mean(v[op['input']], axis=(1, 2)),
}


def run_program(manifest: dict, tensors: dict[str, jax.Array], images: jax.Array) -> jax.Array:
  """Interprets the manifest's program on images float (B, H, W, C): float32 logits (B, K)."""
  values = {manifest['input']: images.astype(jnp.float32)}
  for op in manifest['program']:
    values[op['output']] = OPS[op['op']](op, values, tensors)
  return values[manifest['output']].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ExportedModel:
  """An export loaded from disk: call it on images float (B, H, W, C) for float32 logits (B, K)."""

  manifest: dict
  tensors: dict[str, np.ndarray]

  @functools.cached_property
  def _apply(self):
    return compiler.jit(functools.partial(run_program, self.manifest))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self._apply(self.tensors, images)


def load(directory: str) -> ExportedModel:
  """Reads `directory`/manifest.json and tensors.npz (nothing else)."""
  return ExportedModel(*files.read(directory))
