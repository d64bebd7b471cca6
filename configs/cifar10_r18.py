"""ResNet-18 (CIFAR stem) BNN on CIFAR-10 with StoMPP.

    python -m stompp_jax.main --config=configs/cifar10_r18.py --workdir=runs/c10_r18_stompp

Target (2601.22660): 3.1 points above the STE baseline
(`--config.binary.method=ste`). Runtime on one CPU core pair: ~3 s per step at batch 128,
i.e. far too slow for the full 200 epochs; use a GPU or TPU.
"""

from configs import cifar


def get_config(arg=None):
  del arg
  return cifar.get_config('dataset=cifar10,model=resnet18,mode=bnn,method=stompp')
