"""ResNet-50 BNN on ImageNet with StoMPP (the papers' headline setting).

Needs ImageNet prepared with tfds in the array_record format first (docs/data.md); the data
directory is the gcsfuse mount of the bucket, made on a TPU VM by
`launch/tpu_vm.sh --data-bucket=BUCKET mount-data`:

    python -m stompp_jax.main --config=configs/imagenet_r50.py --workdir=gs://BUCKET/runs/r50 \
      --config.data.dir=/mnt/stompp_data/tensorflow_datasets

Targets (2606.27759, top-1): STE 30.8, StoMPP 3.8 points above STE; with
`--config.binary.method=stompp_ste` 48.5. Cost: 450,360 steps (docs/reproducing.md).

Argument `smoke`: the same network on synthetic 224x224 ImageNet-like data, 2 steps at batch 2,
an 8-image eval, no dataset needed (a check of the ImageNet path on any machine):

    python -m stompp_jax.main --config=configs/imagenet_r50.py:smoke --workdir=/tmp/r50
"""

from configs import imagenet


def get_config(arg=None):
  if arg not in (None, '', 'smoke'):
    raise ValueError(f'Bad config argument {arg!r}: use configs/imagenet_r50.py or'
                     ' configs/imagenet_r50.py:smoke.')
  config = imagenet.get_config('model=resnet50,mode=bnn,method=stompp')
  if arg == 'smoke':
    config.update_from_flattened_dict({
        'data.source': 'synthetic', 'data.synthetic_train_size': 64,
        'data.synthetic_eval_size': 8, 'data.num_workers': 0, 'train.batch_size': 2,
        'train.eval_batch_size': 8, 'train.num_steps': 2, 'train.log_every': 1,
        'train.checkpoint_every': 2})
  return config
