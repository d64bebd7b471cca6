"""A short CPU run: CIFAR ResNet-20 BNN trained with StoMPP.

    python -m stompp_jax.main --config=configs/quickstart.py --workdir=/tmp/stompp_quickstart

Data: the npz copy in $STOMPP_DATA_DIR when it holds train.npz/test.npz (e.g. the CIFAR-10
JPEG copy: its numbers are "CIFAR-10 (JPEG copy)"), else the original CIFAR-10 archive,
downloaded into ~/stompp_data when missing. Budget: 400 steps at batch 128 (~1 epoch), the
schedule compressed into the run, evaluated on the full test split: a few minutes on 2 CPU cores.
Expect well above chance (10%) but far from converged.
Argument: a method (stompp | ste | stompp_ste), e.g. `--config=configs/quickstart.py:ste`.
"""

import os

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.model.name = 'resnet20'
  config.model.mode = 'bnn'
  config.binary.method = arg or 'stompp'
  config.binary.refresh_every = 10
  data_dir = os.environ.get('STOMPP_DATA_DIR', '')
  has_npz = data_dir and os.path.exists(os.path.join(data_dir, 'train.npz'))
  config.data.source = 'npz' if has_npz else 'cifar_archive'
  config.train.batch_size = 128
  config.train.eval_batch_size = 500
  config.train.num_steps = 400
  config.train.log_every = 50
  config.train.eval_every = 0
  config.train.checkpoint_every = 200
  return config
