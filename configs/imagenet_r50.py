"""ResNet-50 BNN on ImageNet with StoMPP (the papers' headline setting).

    python -m stompp_jax.main --config=configs/imagenet_r50.py --workdir=gs://BUCKET/runs/r50 \
      --config.data.dir=gs://BUCKET/tensorflow_datasets

Targets (2606.27759, top-1): STE 30.8, StoMPP 3.8 points above STE; with
`--config.binary.method=stompp_ste` 48.5. A synthetic-data smoke run needs no dataset:
`--config.data.source=synthetic --config.train.num_steps=2 --config.train.batch_size=8`.
Runtime: not measured here (days on a v4-32 slice).
"""

from configs import imagenet


def get_config(arg=None):
  del arg
  return imagenet.get_config('model=resnet50,mode=bnn,method=stompp')
