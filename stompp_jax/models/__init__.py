"""The model zoo: `create_model(config.model, ...)` and the binary-layer rules of a model config.

    model = create_model(config.model, num_classes=10, image_shape=(32, 32, 3))
    variables = model.init(key, x)                                 # ctx=None: full precision
    logits, updates = model.apply(variables, x, train=True, ctx=ctx, mutable=['batch_stats'])

See resnet.py, bireal.py and mobilenet_v2.py for the module paths that `binary_include/exclude` match.
`from_module(module, mode)` makes any Linen model of plain `nn.Conv` / `nn.Dense` layers
trainable the same way (layers.ByRules).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from stompp_jax import errors
from stompp_jax import layers
from stompp_jax.binary import context as bctx
from stompp_jax.choices import check_choice
from stompp_jax.choices import check_number
from stompp_jax.models import bireal
from stompp_jax.models import mobilenet_v2
from stompp_jax.models import resnet

_MODELS = {
    'resnet18': resnet.ResNet18,
    'resnet34': resnet.ResNet34,
    'resnet50': resnet.ResNet50,
    'resnet20': resnet.ResNet20,
    'resnet32': resnet.ResNet32,
    'resnet44': resnet.ResNet44,
    'resnet56': resnet.ResNet56,
    'resnet110': resnet.ResNet110,
    'bireal18': bireal.BiReal18,
    'mobilenet_v2': mobilenet_v2.MobileNetV2,
    'tiny_resnet': resnet.TinyResNet,
}
MODEL_NAMES = tuple(_MODELS)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Images up to this size (pixels, larger side) get the CIFAR stem under stem='auto'.
AUTO_CIFAR_STEM_MAX_SIZE = 64


def check_model_config(model_config: Any) -> None:
  """Checks `config.model`'s name, stem, mode, dtype, width and bnn_shortcut (one-line
  SetupErrors)."""
  check_choice('model.name', model_config.name, MODEL_NAMES)
  check_choice('model.stem', model_config.stem, ('auto', *resnet.STEMS))
  check_choice('model.mode', model_config.mode, resnet.MODES)
  check_choice('model.dtype', model_config.dtype, tuple(DTYPES))
  if model_config.name != 'mobilenet_v2' and model_config.width_multiplier != 1.0:
    raise errors.SetupError(f'model.width_multiplier applies to mobilenet_v2 only; '
                     f'set it to 1.0 for {model_config.name}.')
  bnn_shortcut = model_config.bnn_shortcut
  check_choice('model.bnn_shortcut', bnn_shortcut, resnet.BNN_SHORTCUTS)
  if model_config.name == 'mobilenet_v2' and bnn_shortcut != 'real':
    raise errors.SetupError(f'model.bnn_shortcut={bnn_shortcut!r} is defined for the ResNets only:'
                     ' use model.bnn_shortcut=real with mobilenet_v2.')
  check_number('model.width_multiplier', model_config.width_multiplier, 0, above_low=True,
               hint=' (1.0 = the standard width)')


def create_model(model_config: Any, *, num_classes: int,
                 image_shape: tuple[int, int, int]) -> nn.Module:
  """Builds the model that `model_config` (the ConfigDict `config.model`) names.

  Args:
    model_config: fields name, stem, mode, bnn_shortcut, width_multiplier, dtype
      (configs/default.py), as `check_model_config` accepts them (experiment.check_config
      checks them before anything is built).
    num_classes: logits per example.
    image_shape: (height, width, channels) of the input images; picks the stem under 'auto'.

  Returns:
    An unbound module called as `model.apply(variables, x, train=..., ctx=...)` with x float
    (B, H, W, C), returning float32 logits (B, num_classes).

  Raises:
    errors.SetupError: `model_config.own_class` names a model of the user's (`with_own_class`).
  """
  if model_config.own_class:
    raise errors.SetupError(
        f'model.own_class={model_config.own_class!r}: this run trained your own model, which'
        ' the command line cannot rebuild; evaluate or export it from Python with'
        f' model={model_config.own_class.rsplit(".", 1)[-1]}(...) (docs/own-model.md).')
  stem = model_config.stem
  if stem == 'auto':
    stem = 'cifar' if max(image_shape[:2]) <= AUTO_CIFAR_STEM_MAX_SIZE else 'imagenet'
  kwargs = dict(num_classes=num_classes, stem=stem, mode=model_config.mode,
                dtype=DTYPES[model_config.dtype])
  if model_config.name == 'mobilenet_v2':
    kwargs['width_multiplier'] = model_config.width_multiplier
  else:
    kwargs['bnn_shortcut'] = model_config.bnn_shortcut
  return _MODELS[model_config.name](**kwargs)


def with_own_class(config: Any, module: nn.Module) -> Any:
  """A copy of the run config `config` whose `model.own_class` records the class of `module`
  (the user's model it trains) as 'package.module.Class'."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.own_class = f'{type(module).__module__}.{type(module).__qualname__}'
  return config


def model_label(model_config: Any) -> str:
  """What trained the run: the user's model class (`model.own_class`), else `model.name`."""
  return model_config.own_class or model_config.name


def from_module(module: nn.Module, mode: str) -> layers.ByRules:
  """A user's Linen model (called as `module(x, train=...)`, returning logits) in `mode`.

  `mode`: `config.model.mode` (fp, bwn or bnn). Mode bnn
  binarizes the kernels and the inputs of its site layers, bwn the kernels only, fp nothing;
  the model's own nonlinearities stay as written.
  """
  if not isinstance(module, nn.Module):
    raise errors.SetupError(f'model= must be a flax.linen.Module, not {type(module).__name__}: pass'
                     ' your model instance, unbound.')
  check_choice('mode', mode, resnet.MODES)
  return layers.ByRules(module, binarize_input=(mode == 'bnn'))


def binary_rules(model_config: Any) -> bctx.BinaryRules:
  """The rules of `model_config.binary_include/exclude` (regexes on module paths)."""
  return bctx.BinaryRules(include=tuple(model_config.binary_include),
                          exclude=tuple(model_config.binary_exclude))
