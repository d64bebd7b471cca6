"""The command line of torch_peer.py, apart from the script so that it parses without torch (the
documented commands are checked where torch is not installed: tests/test_documented_benchmarks.py).
"""

import argparse

# The project's name -> (channels per stage, blocks per stage) (models/resnet.py).
MODELS = {'resnet20': ((16, 32, 64), 3), 'resnet18': ((64, 128, 256, 512), 2)}
METHODS = ('ste', 'stompp')


def parse_args(argv=None, description=None) -> argparse.Namespace:
  """torch_peer.py's arguments, --methods as a checked list."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument('--model', default='resnet20', choices=sorted(MODELS))
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--steps', type=int, default=3, help='Consecutive steps per repetition.')
  parser.add_argument('--methods', default=','.join(METHODS),
                      help=f'Comma-separated of {", ".join(METHODS)}.')
  parser.add_argument('--xla_defaults', action='store_true',
                      help="Also JAX with XLA's default CPU options (before compiler.py's).")
  parser.add_argument('--breakdown', action='store_true',
                      help='Also time one conv per stage and the STE step at batch 2.')
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(',') if m]
  if not methods or set(methods) - set(METHODS):
    parser.error(f'--methods={args.methods}: choose from {", ".join(METHODS)}')
  args.methods = methods
  return args
