"""CIFAR-10 at 16x16 for the study: 2x2 average pooling of an npz copy of CIFAR-10.

    python benchmarks/prepare_cifar16.py --src=$STOMPP_DATA_DIR --out=~/stompp_data/cifar10_16

Reads SRC/train.npz and SRC/test.npz (keys image uint8 (N, 32, 32, 3), label; the layout of the
npz data source, stompp_jax/data/sources.py) and writes OUT/train.npz and OUT/test.npz with
image uint8 (N, 16, 16, 3), each pixel the rounded mean of a 2x2 block, and the labels as they
are. About 4x fewer pixels per image, so a train step costs about a quarter; train with
`--config.data.source=npz --config.data.dir=OUT`. The derived files are not committed (the
source's licence and size): rerun this script on a new machine.
"""

import argparse
import os
import sys

import numpy as np

SPLITS = ('train.npz', 'test.npz')


def pool_2x2(images: np.ndarray) -> np.ndarray:
  """uint8 (N, H, W, C) with even H, W -> uint8 (N, H/2, W/2, C), rounded block means."""
  n, height, width, channels = images.shape
  blocks = images.reshape(n, height // 2, 2, width // 2, 2, channels).astype(np.uint16)
  return ((blocks.sum(axis=(2, 4)) + 2) // 4).astype(np.uint8)


def prepare(src: str, out: str) -> list[str]:
  """Writes OUT/{train,test}.npz from SRC's; returns the paths written."""
  written = []
  os.makedirs(out, exist_ok=True)
  for name in SPLITS:
    with np.load(os.path.join(src, name)) as data:
      images, labels = data['image'], data['label']
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] % 2 or images.shape[2] % 2:
      raise ValueError(f'{os.path.join(src, name)}: image {images.shape} {images.dtype} is not'
                       ' uint8 (N, H, W, C) with even H and W')
    path = os.path.join(out, name)
    temporary = path + '.tmp.npz'
    np.savez(temporary, image=pool_2x2(images), label=labels)
    os.replace(temporary, path)
    written.append(path)
  return written


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's arguments (main checks --src: that needs the data)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--src', default=os.environ.get('STOMPP_DATA_DIR', ''),
                      help='Directory of train.npz and test.npz at 32x32 (default $STOMPP_DATA_DIR).')
  parser.add_argument('--out', required=True, help='Directory to write the 16x16 files to.')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  src, out = os.path.expanduser(args.src), os.path.expanduser(args.out)
  missing = [n for n in SPLITS if not os.path.isfile(os.path.join(src, n))]
  if not args.src or missing:
    print(f'Error: --src={args.src!r} has no {", ".join(missing or SPLITS)}: give the directory'
          ' of the CIFAR-10 npz copy (or set STOMPP_DATA_DIR).', file=sys.stderr)
    return 2
  try:
    for path in prepare(src, out):
      print(f'wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)')
  except ValueError as e:
    print(f'Error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
