"""The tiny run of the tests: tiny_resnet BNN on synthetic 16x16 images of 4 classes.

    python -m stompp_jax.main --config=configs/tiny.py --workdir=DIR

12 steps at batch 32 (log every 3, eval and checkpoint every 6), in well under a minute on a
laptop CPU; its accuracy means nothing (random images). Every test that needs a tiny run
starts from this config (tests/helpers.py: `tiny_config`), so the suite's runs share their
compiled programs through the persistent compilation cache.
Argument: the method (stompp | ste | stompp_ste | fp; default stompp); fp trains the float
network (model.mode fp), any other the BNN.
"""

from configs import default
from stompp_jax.binary import context

METHODS = context.METHODS


def get_config(arg=None):
  method = arg or 'stompp'
  if method not in METHODS:
    raise ValueError(f'Bad config argument {arg!r}: use one of {", ".join(METHODS)}.')
  config = default.get_config()
  config.update_from_flattened_dict({
      'model.name': 'tiny_resnet', 'model.mode': 'fp' if method == 'fp' else 'bnn',
      'binary.method': method, 'binary.refresh_every': 4,
      'data.name': 'cifar10', 'data.source': 'synthetic', 'data.synthetic_image_shape': (16, 16, 3),
      'data.synthetic_num_classes': 4, 'data.synthetic_train_size': 512,
      'data.synthetic_eval_size': 96,
      'train.batch_size': 32, 'train.eval_batch_size': 32, 'train.num_steps': 12,
      'train.log_every': 3, 'train.eval_every': 6, 'train.checkpoint_every': 6})
  return config
