"""The packed XNOR-popcount conv of the export's reference inference against the float conv, on CPU.

    python benchmarks/packed_conv.py [--shapes 32x32x64:32,32x32x64:128] [--reps 7]

Shapes are `HxWxC:batch`: a 3x3 stride-1 'SAME' conv from C to C channels on a batch of HxW
images, the body conv of a CIFAR ResNet stage. Two jitted functions on the same +-1 values:

  float   jax.lax.conv_general_dilated of float32 +-1 inputs and kernel (what XLA runs for the
          training-time fully binary network);
  packed  inference.binary_conv: inputs already packed into uint32 words (a deployed BNN
          passes packed activations from layer to layer; the kernel is packed once), XOR +
          popcount per tap, exact int32 outputs.

The outputs are checked equal first. Compile time is excluded (one warm-up call); --reps
repetitions alternate the two, `block_until_ready` around each call; the table gives medians
and the ratio packed / float (> 1: the float conv is faster).

What to expect, and why it is not the 32x of the bit count: per output, the float conv does
9 * C float32 multiply-adds in a tuned, vectorized kernel (Eigen's conv in XLA:CPU); the
packed conv does 9 * ceil(C / 32) XOR + popcount word operations, but XLA has no bit-serial
conv kernel: the taps become generic elementwise loops (slice, XOR, popcount, sum over words,
add per tap) with no register blocking, so it gets a small fraction of the ideal 32x. On the
project's shared 2-core CPU the packed conv measured 2-4x faster than the float conv, from 16
to 512 channels (docs/export.md has the table); other CPUs (more cores or wider vectors for the
float conv) will give other ratios: run this to see. Dedicated kernels (larq compute engine,
daBNN: register-blocked XOR-popcount GEMM on ARM NEON/x86) are where bit-packed convs pay off
fully; the memory saving (a kernel 32x smaller than float32) holds everywhere.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from stompp_jax import compiler  # noqa: E402
from stompp_jax.export import fold  # noqa: E402
from stompp_jax.export import inference  # noqa: E402


def parse_shape(text: str) -> tuple[int, int, int, int]:
  """'HxWxC:batch' -> (batch, H, W, C)."""
  spatial, batch = text.split(':')
  height, width, channels = map(int, spatial.split('x'))
  return int(batch), height, width, channels


def make_convs(batch: int, height: int, width: int, channels: int, seed: int = 0):
  """(float_fn, float_args, packed_fn, packed_args) for one shape, outputs checked equal."""
  rng = np.random.default_rng(seed)
  x = np.where(rng.normal(size=(batch, height, width, channels)) >= 0, 1.0, -1.0).astype(np.float32)
  kernel = np.where(rng.normal(size=(3, 3, channels, channels)) >= 0, 1.0, -1.0).astype(np.float32)
  float_fn = compiler.jit(lambda x, k: inference.float_conv(x, k, strides=(1, 1), padding='SAME'))
  packed_fn = compiler.jit(lambda x, k: inference.binary_conv(
      x, k, in_channels=channels, strides=(1, 1), padding='SAME'))
  float_args = (jnp.asarray(x), jnp.asarray(kernel))
  packed_args = (inference.pack_signs(jnp.asarray(x)),
                 inference.kernel_words(jnp.asarray(fold.pack_kernel(kernel))))
  np.testing.assert_array_equal(packed_fn(*packed_args), float_fn(*float_args))
  return float_fn, float_args, packed_fn, packed_args


def time_ms(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) * 1e3


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's arguments."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='32x32x64:32,32x32x64:128,16x16x128:128,8x8x256:128')
  parser.add_argument('--reps', type=int, default=7)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs; '
        f'3x3 stride-1 SAME conv C -> C; median ms of {args.reps} calls, compile excluded')
  print(f'{"shape (B, H, W, C)":<22} {"float ms":>9} {"packed ms":>10} {"packed / float":>15}')
  for text in args.shapes.split(','):
    shape = parse_shape(text)
    float_fn, float_args, packed_fn, packed_args = make_convs(*shape)
    times = {'float': [], 'packed': []}
    for _ in range(args.reps):
      times['float'].append(time_ms(float_fn, float_args))
      times['packed'].append(time_ms(packed_fn, packed_args))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f'{str(shape):<22} {med["float"]:9.2f} {med["packed"]:10.2f} '
          f'{med["packed"] / med["float"]:15.2f}')


if __name__ == '__main__':
  main()
