"""StoMPP on your own Flax model: plain nn.Conv / nn.Dense layers, binarized by rules.

    python -m examples.own_model --workdir=/tmp/own_model

trains the small VGG-style `Net` below as a BNN with StoMPP (on synthetic CIFAR-shaped data, so it
runs anywhere; set --config.data.source=cifar_archive for CIFAR-10) and prints the final row.
The model code knows nothing about binarization: `config.model.binary_include/exclude` (regexes
on module paths) pick the layers whose kernels (and, in mode bnn, inputs) are binarized, here
every conv and dense layer but the first conv and the classifier. Any config field can be
overridden on the command line, e.g. --config.binary.method=ste or --config.model.mode=bwn.
"""

from absl import app
from absl import flags
import flax.linen as nn
from ml_collections import config_flags

from configs import default
from stompp_jax import train


class Net(nn.Module):
  """(B, 32, 32, 3) images -> (B, num_classes) logits: 3 conv stages and 2 dense layers.

  No ReLU: in a BNN the sign of each binary layer's input is the nonlinearity.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    for i, features in enumerate((32, 64, 128)):
      x = nn.Conv(features, (3, 3), use_bias=False, name=f'conv{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f'bn{i}')(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dense(256, use_bias=False, name='fc')(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn_fc')(x)
    return nn.Dense(self.num_classes, name='classifier')(x)


def get_config():
  config = default.get_config()
  config.model.mode = 'bnn'
  config.model.binary_include = ('.*',)
  config.model.binary_exclude = ('^conv0$', '^classifier$')  # First and last layer stay float.
  config.binary.method = 'stompp'
  config.data.source = 'synthetic'
  config.train.num_steps = 200
  config.train.batch_size = 64
  config.train.eval_batch_size = 128
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  return config


_CONFIG = config_flags.DEFINE_config_dict('config', get_config())
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory.', required=True)


def main(argv):
  del argv
  final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, model=Net())
  print(' | '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in final.items()))


if __name__ == '__main__':
  app.run(main)
