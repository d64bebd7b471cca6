"""Bit packing and BatchNorm folding of the export: numpy in, numpy out; no model code.

    packed = fold.pack_kernel(kernel)          # float (kh, kw, cin, cout) -> uint8 sign bits
    ops = fold.fold_batch_norm_signs(ops, tensors)   # binary layer -> BN -> sign  =>  threshold
"""

import dataclasses
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One exported array: `array` as stored, `shape` its logical (unpacked) shape."""

  array: np.ndarray
  precision: str  # 'binary' (1 bit per element, packed), 'float32', 'int32' or 'bool'.
  shape: tuple[int, ...]


def pack_kernel(kernel: np.ndarray) -> np.ndarray:
  """Sign bits of a latent kernel packed along its input axis (-2), as `np.packbits` does.

  kernel: float (kh, kw, cin, cout) or (in, out). Returns uint8 (kh, kw, ceil(cin / 8), cout)
  or (ceil(in / 8), out): bit 1 = +1 (latent >= 0, sign(0) = +1), channel 8j + b in bit b of
  byte j counted from the most significant bit ('big' order), zero pad bits at the end.
  """
  return np.packbits(np.asarray(kernel) >= 0, axis=-2)


def batch_norm(y: jax.Array, center: jax.Array, multiplier: jax.Array,
               offset: jax.Array) -> jax.Array:
  """Folded BatchNorm (y - mean) * (scale / sqrt(var + eps)) + bias over the last axis.

  The centered form rounds exactly as Flax's BatchNorm does in float32, so a sign taken after
  it (after a residual addition, say) is the training-time sign. y: int or float (..., C).
  Used by the fold below (in numpy) and by the reference inference (inference.py, in JAX).
  """
  return (y.astype(jnp.float32) - center) * multiplier + offset


def batch_norm_multiplier(var: np.ndarray, scale: np.ndarray, epsilon: float) -> np.ndarray:
  """Flax's order of operations: rsqrt(var + eps) * scale, in float32 under XLA. (C,) arrays."""
  return np.asarray(jax.lax.rsqrt(jnp.asarray(var) + epsilon) * scale)


def fold_threshold(center: np.ndarray, multiplier: np.ndarray, offset: np.ndarray,
                   taps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel integer thresholds equal to sign(batch_norm(y)) for every integer |y| <= taps.

  The float32 `batch_norm` (which rounds as Flax's does; run in numpy here, IEEE float32 like
  XLA) is evaluated on every possible XNOR-popcount output, so the fold is exact, rounding
  included; rounding is monotone, so the +1 set is an up-set (scale > 0), a down-set
  (scale < 0) or constant (scale = 0).

  Args:
    center, multiplier, offset: float32 (C,), the folded BatchNorm.
    taps: the number of +-1 products summed per output (kh * kw * cin, or in for a dense).

  Returns:
    (threshold int32 (C,), flip bool (C,)): sign is +1 iff (y >= threshold) XOR flip.
  """
  ys = np.arange(-taps, taps + 1, dtype=np.int32)[:, None]
  positive = batch_norm(ys, center, multiplier, offset) >= 0
  rising = np.all(positive[1:] >= positive[:-1], axis=0)
  falling = np.all(positive[1:] <= positive[:-1], axis=0)
  if not np.all(rising | falling):
    raise ValueError('BatchNorm + sign is not monotone in the conv output (non-finite BatchNorm'
                     ' statistics?); cannot fold it into thresholds.')
  count = positive.sum(0)
  threshold = np.where(rising, taps + 1 - count, count - taps)
  return threshold.astype(np.int32), ~rising


def _taps(op: dict, tensors: dict[str, Tensor]) -> int:
  """+-1 products per output of a binary conv or dense: its kernel's size over out channels."""
  return math.prod(tensors[op['kernel']].shape[:-1])


def _inputs(op: dict) -> list[str]:
  return op.get('inputs', [op['input']] if 'input' in op else [])


def fold_batch_norm_signs(ops: list[dict], tensors: dict[str, Tensor]) -> list[dict]:
  """Replaces each binary layer -> batch_norm -> sign chain by binary layer -> threshold.

  Only where the BatchNorm's output has no consumer but the sign and its input is an integer
  XNOR-popcount output. `tensors` is updated in place (affine out, thresholds in).
  """
  producers = {op['output']: op for op in ops}
  consumers = Counter(name for op in ops for name in _inputs(op))
  thresholds, folded_norms = {}, set()  # sign output -> its threshold op; folded norm outputs.
  for op in ops:
    norm = producers.get(op['input']) if op['op'] == 'sign' else None
    if norm is None or norm['op'] != 'batch_norm' or consumers[norm['output']] != 1:
      continue
    layer = producers.get(norm['input'])
    if layer is None or layer['op'] not in ('conv', 'dense') or layer['precision'] != 'binary':
      continue
    path = norm['layer']
    affine = [tensors.pop(norm[key]).array for key in ('center', 'multiplier', 'offset')]
    threshold, flip = fold_threshold(*affine, taps=_taps(layer, tensors))
    tensors[f'{path}/threshold'] = Tensor(threshold, 'int32', threshold.shape)
    tensors[f'{path}/flip'] = Tensor(flip, 'bool', flip.shape)
    folded_norms.add(norm['output'])
    thresholds[op['output']] = {
        'op': 'threshold', 'layer': path, 'input': norm['input'],
        'threshold': f'{path}/threshold', 'flip': f'{path}/flip', 'output': op['output']}
  return [thresholds.get(op['output'], op) for op in ops if op['output'] not in folded_norms]
