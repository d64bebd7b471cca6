"""CIFAR-10/100 experiments of the papers, one family with arguments (docs/reproducing.md).

    python -m stompp_jax.main --workdir=runs/c100_r50_bnn_stompp \
      --config=configs/cifar.py:dataset=cifar100,model=resnet50,mode=bnn,method=stompp

Arguments (defaults in brackets): dataset [cifar10] | cifar100; model [resnet18] | resnet34 |
resnet50 | resnet20 | resnet32 | resnet44 | resnet56 | resnet110 | mobilenet_v2; mode [bnn] | bwn |
fp; method [stompp] | ste | stompp_ste | fp; order [layerwise] | global | reverse; shape [cubic] |
linear | quadratic | cosine | flipped_quadratic; refresh [100]; epochs [200].

Recipe (2606.27759, "matched minimal recipe"): SGD momentum 0.9, constant lr 0.1, no weight
decay, batch 256, standard CIFAR augmentation; epochs are not stated in the papers (200 is ours).
Data (data.source=auto): a tfds dataset prepared in data.dir is read when there; otherwise the
original archive, downloaded into data.dir ($STOMPP_DATA_DIR, else ~/stompp_data) and
md5-checked when missing. No TensorFlow needed; the run's `Data:` line says which source ran.

Paper numbers each setting targets (top-1 %, docs/reproducing.md):
  model=resnet50 mode=bnn  dataset=cifar10:  ste 51.5 | stompp 69.5 | stompp_ste 78.6
  model=resnet50 mode=bnn  dataset=cifar100: ste 26.7 | stompp 40.2 | stompp_ste 46.5
  model=resnet18 mode=bnn: stompp over ste +3.1 (cifar10), +4.7 (cifar100)
  model=resnet50 mode=bwn  method=stompp: 91.2 (cifar10), 69.5 (cifar100)
  order ablation, bnn cifar100 stompp: resnet18 layerwise 53.8 / global 53.2 / reverse 28.4;
                                       resnet50 40.0 / 35.9 / 8.6
  lr ablation, resnet18 bnn cifar100: ste 48.9 vs stompp 53.8 at 0.1; 46.8 vs 54.2 at 0.05
                                       (--config.optim.learning_rate=0.05)
  model=mobilenet_v2 dataset=cifar100: ste 40.5 -> stompp_ste 48.0
Cost: 39,000 steps at 200 epochs (195 per epoch); no accelerator time measured yet
(docs/reproducing.md).
"""

from configs import default
from configs import family

DEFAULTS = dict(dataset='cifar10', model='resnet18', mode='bnn', method='stompp',
                order='layerwise', shape='cubic', refresh='100', epochs='200')


def get_config(arg=None):
  args = family.parse_args(arg, DEFAULTS)
  config = default.get_config()
  config.data.name = args['dataset']
  config.data.source = 'auto'  # A prepared tfds dataset in data.dir, else the original archive.
  config.model.name = args['model']
  family.apply_method(config, mode=args['mode'], method=args['method'], order=args['order'],
                      shape=args['shape'], refresh=args['refresh'])
  config.train.num_epochs = float(args['epochs'])
  config.train.batch_size = 256
  config.train.eval_every = 2000
  config.train.checkpoint_every = 2000
  return config
