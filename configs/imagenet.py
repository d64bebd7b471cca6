"""ImageNet (ILSVRC2012) experiments of the papers, one family with arguments.

Needs ImageNet prepared with tfds in the array_record format first (docs/data.md, "Preparing
ImageNet"); on Cloud TPU VMs read the bucket through its gcsfuse mount (launch/tpu_vm.sh
mount-data mounts gs://BUCKET at /mnt/stompp_data; launch/README.md):

    python -m stompp_jax.main --workdir=gs://BUCKET/runs/in_r50_bnn_stompp \
      --config=configs/imagenet.py:model=resnet50,mode=bnn,method=stompp \
      --config.data.dir=/mnt/stompp_data/tensorflow_datasets

Arguments (defaults in brackets): model [resnet50] | resnet18 | resnet34 | mobilenet_v2; mode
[bnn] | bwn | fp; method [stompp] | ste | stompp_ste | fp; order [layerwise] | global | reverse;
shape [cubic] | linear | quadratic | cosine | flipped_quadratic; refresh [100]; epochs [90].

Recipe (2606.27759): SGD momentum 0.9, constant lr 0.1, no weight decay, batch 256; standard
ImageNet augmentation (random-resized crop 224 + flip; eval resize 256 / center crop 224); 90
epochs is ours (not stated).

Paper numbers (top-1 %, docs/reproducing.md): ResNet-50 BNN ste 30.8 | stompp +3.8 over ste |
stompp_ste 48.5. ResNet-18 BNN: stompp over ste +1.3.
Cost: 450,360 steps at 90 epochs (5,004 per epoch); no accelerator time measured yet.
"""

from configs import default
from configs import family

DEFAULTS = dict(model='resnet50', mode='bnn', method='stompp', order='layerwise', shape='cubic',
                refresh='100', epochs='90')


def get_config(arg=None):
  args = family.parse_args(arg, DEFAULTS)
  config = default.get_config()
  config.data.name = 'imagenet2012'
  config.data.source = 'tfds'
  config.data.num_workers = 7  # gpu_slurm.sbatch's 8 CPUs a task: 7 workers + the trainer.
  config.model.name = args['model']
  family.apply_method(config, mode=args['mode'], method=args['method'], order=args['order'],
                      shape=args['shape'], refresh=args['refresh'])
  config.train.num_epochs = float(args['epochs'])
  config.train.batch_size = 256
  config.train.eval_batch_size = 1024
  config.train.log_every = 100
  config.train.eval_every = 5000
  config.train.checkpoint_every = 2500
  return config
