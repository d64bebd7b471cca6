"""ResNet-18 (CIFAR stem) BNN on CIFAR-10 with StoMPP.

    python -m stompp_jax.main --config=configs/cifar10_r18.py --workdir=runs/c10_r18_stompp

Target (2601.22660): 3.1 points above the STE baseline (`--config.binary.method=ste`).
Data: configs/cifar.py's (the CIFAR-10 archive is downloaded when missing). Cost: 39,000 steps
(200 epochs at batch 256); on a 2-core CPU a step of this network takes seconds, so use a GPU or
TPU (docs/reproducing.md).
"""

from configs import cifar


def get_config(arg=None):
  del arg
  return cifar.get_config('dataset=cifar10,model=resnet18,mode=bnn,method=stompp')
