"""A short CPU run: CIFAR ResNet-20 BNN trained with StoMPP, offline-capable.

    python -m stompp_jax.main --config=configs/quickstart.py --workdir=/tmp/stompp_quickstart

Data (printed at start as `Data: ...`, and in the closing line):
  1. CIFAR-10 from the npz copy in $STOMPP_DATA_DIR when it holds train.npz/test.npz (e.g. the
     CIFAR-10 JPEG copy: its numbers are "CIFAR-10 (JPEG copy)");
  2. else CIFAR-10 from the original archive when it is already in the data directory
     ($STOMPP_DATA_DIR, else ~/stompp_data);
  3. else the built-in handwritten digits (1,437 train / 360 test 8x8 images, 10 classes,
     stompp_jax/data/builtin/README.md): no network and no download needed.
`configs/quickstart.py:stompp,cifar10` asks for CIFAR-10 whatever is there (downloading the
archive into ~/stompp_data when missing); `:stompp,digits` for the built-in digits.
Budget: 400 steps at batch 128 (about one CIFAR-10 epoch), the schedule compressed into the run,
evaluated on the full test split. Its measured time and last line: README.md, "Quickstart".
Expect well above chance but far from converged on CIFAR-10.
Argument: a method (stompp | ste | stompp_ste), optionally `,` and a dataset (auto | cifar10 |
digits), e.g. `--config=configs/quickstart.py:ste`.
"""

import os

from configs import default
from stompp_jax.data import cifar_archive
from stompp_jax.data import sources

DATASETS = ('auto', 'cifar10', 'digits')


def choose_data(dataset: str = 'auto') -> tuple[str, str, str]:
  """(data.name, data.source, data.dir) of the quickstart: see the module docstring."""
  if dataset not in DATASETS:
    raise ValueError(f'Bad config argument dataset={dataset!r}: use one of {", ".join(DATASETS)}.')
  if dataset == 'digits':
    return 'digits', 'npz', sources.BUILTIN_DIRS['digits']
  data_dir = os.environ.get('STOMPP_DATA_DIR', '')
  if data_dir and os.path.exists(os.path.join(data_dir, 'train.npz')):
    return 'cifar10', 'npz', ''
  local = sources.data_dir(default.get_config().data)
  if dataset == 'cifar10' or cifar_archive.is_present(local, 'cifar10'):
    return 'cifar10', 'cifar_archive', ''
  return 'digits', 'npz', sources.BUILTIN_DIRS['digits']


def get_config(arg=None):
  method, _, dataset = (arg or '').partition(',')
  config = default.get_config()
  config.model.name = 'resnet20'
  config.model.mode = 'bnn'
  config.binary.method = method or 'stompp'
  config.binary.refresh_every = 10
  config.data.name, config.data.source, config.data.dir = choose_data(dataset or 'auto')
  config.train.batch_size = 128
  config.train.eval_batch_size = 512
  config.train.num_steps = 400
  config.train.log_every = 50
  config.train.eval_every = 0
  config.train.checkpoint_every = 200
  return config
