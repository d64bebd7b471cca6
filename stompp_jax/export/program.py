"""The export's program: ops over named values, built from one abstract trace of the model.

    ops, tensors = program.build_program(model_config, variables, trace=trace, summary=summary)

1. One abstract trace (models/inspect.py) records every conv, dense, BatchNorm and residual
   block call: attributes (strides, padding, epsilon), the block order and, inside each block,
   its layers in call order (main path, then the projection shortcut). The model summary
   (models/summary.py, from the same trace) gives each layer's precision under the binary rules.
2. `resnet_program` emits conv, dense, batch_norm, sign, binarize, relu, add, max_pool and
   global_average_pool ops from those calls. What the trace of module calls cannot show, the
   wiring between them (where the nonlinearity, the residual addition and the ImageNet stem's
   max-pool sit), follows models/resnet.py. Binary kernels become sign bits packed along the
   input-channel axis; float layers keep float32 kernels; every BatchNorm becomes a
   per-channel affine in the centered form (y - mean) * multiplier + bias.
3. Folding (fold.py): where a BatchNorm's output goes only into a sign and its input is the
   integer output of an XNOR-popcount layer, the pair becomes an integer threshold per channel.
Every variable of the model must end up in the export (checked), so a model change that the
wiring does not follow fails loudly; tests/test_export.py checks the logits against the
training-time fully binary evaluation.
"""

from typing import Any

import flax.linen as nn
import flax.traverse_util
import numpy as np

from stompp_jax import layers
from stompp_jax.export import fold
from stompp_jax.export.fold import Tensor
from stompp_jax.models import inspect
from stompp_jax.models import resnet
from stompp_jax.models import summary as summary_lib


class UnsupportedModelError(NotImplementedError):
  """A model, or a layer of it, that the export cannot walk (the message says which)."""


def _json_padding(padding: Any) -> Any:
  return padding if isinstance(padding, str) else [list(map(int, p)) for p in padding]


class ProgramBuilder:
  """Emits ops and tensors for layers given by module path; tracks which variables it used.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of the model (numpy or jax arrays).
    trace: the model's abstract trace (layer attributes by path).
    precisions: {path: 'binary' | 'binary_weight' | 'float'} of the conv and dense layers.
    mode: 'fp', 'bwn' or 'bnn' (bnn has no ReLU).
  """

  def __init__(self, variables: dict, trace: inspect.Trace, precisions: dict[str, str],
               mode: str):
    self._variables = {collection: flax.traverse_util.flatten_dict(tree, sep='/')
                       for collection, tree in variables.items()}
    self._unused = {(c, k) for c, tree in self._variables.items() for k in tree}
    self._modules = {c.name: c.module for c in trace.layer_calls()}
    self._precisions = precisions
    self._mode = mode
    self._signs: dict[str, str] = {}
    self.ops: list[dict] = []
    self.tensors: dict[str, Tensor] = {}

  def unused_variables(self) -> list[str]:
    return sorted(f'{c}/{k}' for c, k in self._unused)

  def _variable(self, collection: str, path: str) -> np.ndarray:
    self._unused.discard((collection, path))
    return np.asarray(self._variables[collection][path], np.float32)

  def _add_tensor(self, name: str, array: np.ndarray, precision: str,
                  shape: tuple[int, ...]) -> str:
    self.tensors[name] = Tensor(array, precision, tuple(shape))
    return name

  def _emit(self, op: str, **fields) -> str:
    output = f'v{len(self.ops)}'
    self.ops.append({'op': op, **fields, 'output': output})
    return output

  def _kernel_and_bias(self, path: str, groups: int = 1) -> dict[str, Any]:
    """Fields of conv and dense ops: precision, kernel (packed if binary), bias, in_channels."""
    precision = self._precisions[path]
    kernel = self._variable('params', f'{path}/kernel')
    fields = dict(layer=path, precision=precision, in_channels=kernel.shape[-2] * groups)
    if precision == 'float':
      fields['kernel'] = self._add_tensor(f'{path}/kernel', kernel, 'float32', kernel.shape)
    else:
      fields['kernel'] = self._add_tensor(f'{path}/kernel', fold.pack_kernel(kernel), 'binary',
                                          kernel.shape)
    if self._modules[path].use_bias:
      bias = self._variable('params', f'{path}/bias')
      fields['bias'] = self._add_tensor(f'{path}/bias', bias, 'float32', bias.shape)
    return fields

  def precision(self, path: str) -> str:
    """'binary', 'binary_weight' or 'float' of the conv or dense layer at `path`."""
    return self._precisions[path]

  def _layer_input(self, x: str, path: str) -> str:
    return self.sign(x) if self._precisions[path] == 'binary' else x

  def sign(self, x: str) -> str:
    """Packed sign bits of the float value `x` (one op per value however many layers read it)."""
    if x not in self._signs:
      self._signs[x] = self._emit('sign', input=x)
    return self._signs[x]

  def layer(self, x: str, path: str) -> str:
    """The conv, dense or BatchNorm at `path` applied to `x`."""
    module = self._modules[path]
    if isinstance(module, nn.BatchNorm):
      return self._batch_norm(x, path, module)
    if isinstance(module, layers.BinaryDense):
      return self._emit('dense', input=self._layer_input(x, path), **self._kernel_and_bias(path))
    groups = module.feature_group_count
    if groups != 1 and self._precisions[path] == 'binary':
      raise UnsupportedModelError(f'{path}: grouped binary convs are not exported yet.')
    return self._emit('conv', input=self._layer_input(x, path),
                      **self._kernel_and_bias(path, groups), strides=list(module.strides),
                      padding=_json_padding(module.padding), groups=groups)

  def _batch_norm(self, x: str, path: str, module: nn.BatchNorm) -> str:
    if not (module.use_scale and module.use_bias):
      raise UnsupportedModelError(f'{path}: BatchNorm without scale or bias is not exported.')
    mean = self._variable('batch_stats', f'{path}/mean')
    multiplier = fold.batch_norm_multiplier(self._variable('batch_stats', f'{path}/var'),
                                            self._variable('params', f'{path}/scale'),
                                            module.epsilon)
    names = {key: self._add_tensor(f'{path}/{key}', value, 'float32', value.shape)
             for key, value in (('center', mean), ('multiplier', multiplier),
                                ('offset', self._variable('params', f'{path}/bias')))}
    return self._emit('batch_norm', layer=path, input=x, **names)

  def binarize(self, x: str) -> str:
    """The float +-1 value sign(x) (sign(0) = +1): a block input in the `binarized` reading."""
    return self._emit('binarize', input=x)

  def act(self, x: str) -> str:
    """The block nonlinearity: ReLU in fp and bwn, none in bnn (the binarizers take its place)."""
    return x if self._mode == 'bnn' else self._emit('relu', input=x)

  def add(self, a: str, b: str) -> str:
    return self._emit('add', inputs=[a, b])

  def max_pool(self, x: str, window: tuple[int, int], strides: tuple[int, int],
               padding: str) -> str:
    return self._emit('max_pool', input=x, window=list(window), strides=list(strides),
                      padding=padding)

  def global_average_pool(self, x: str) -> str:
    return self._emit('global_average_pool', input=x)


def _layers_under(trace: inspect.Trace, prefix: str) -> list[str]:
  """Paths of the conv, dense and BatchNorm calls under `prefix` (top level for ''), in order."""
  return [c.name for c in trace.layer_calls()
          if (c.name.startswith(f'{prefix}/') if prefix else '/' not in c.name)]


def resnet_program(builder: ProgramBuilder, trace: inspect.Trace) -> None:
  """Emits a ResNet of models/resnet.py from its trace (either stem, any residual blocks).

  Top-level layers: stem conv and BatchNorm, then the classifier. A block: (conv, BatchNorm)
  pairs in call order, the nonlinearity between pairs, then the addition of the shortcut (the
  block input, or its `shortcut_*` projection pair) and the nonlinearity. In the `binarized`
  reading (model.bnn_shortcut) a block whose conv1 is binary first takes sign(input) as a
  float +-1 value (`binarize`), which feeds conv1 and the shortcut.
  """
  model = trace.calls[0].module
  stem_conv, stem_bn, classifier = _layers_under(trace, '')
  x = builder.act(builder.layer(builder.layer('input', stem_conv), stem_bn))
  if model.stem == 'imagenet':
    x = builder.max_pool(x, (3, 3), (2, 2), 'SAME')
  for block in trace.calls_of(resnet.Block):
    paths = _layers_under(trace, block.name)
    main = [p for p in paths if not p.rsplit('/', 1)[1].startswith('shortcut_')]
    projection = [p for p in paths if p not in main]
    if block.module.bnn_shortcut == 'binarized' and builder.precision(main[0]) == 'binary':
      x = builder.binarize(x)  # Once, for conv1 and the shortcut (models/resnet.py).
    y = x
    for i in range(0, len(main), 2):
      if i:
        y = builder.act(y)
      y = builder.layer(builder.layer(y, main[i]), main[i + 1])
    shortcut = x
    for path in projection:
      shortcut = builder.layer(shortcut, path)
    x = builder.act(builder.add(y, shortcut))
  builder.layer(builder.global_average_pool(x), classifier)


def check_exportable(model: nn.Module, model_name: str) -> None:
  """UnsupportedModelError for a model the export cannot walk (anything but a models/resnet.py
  ResNet)."""
  if not isinstance(model, resnet.ResNet) or not issubclass(
      model.block_cls, (resnet.BasicBlock, resnet.BottleneckBlock)):
    raise UnsupportedModelError(f'Export supports the ResNets of models/resnet.py; '
                                f'{model_name} is not supported yet.')


def build_program(model_config: Any, variables: dict, *, trace: inspect.Trace,
                  summary: summary_lib.Summary) -> tuple[list[dict], dict[str, Tensor]]:
  """The folded program and its tensors of one model's variables.

  Args:
    model_config: the ConfigDict `config.model` (name and mode).
    variables: {'params', 'batch_stats'} (float32 latent weights and statistics).
    trace: the model's abstract trace (`inspect.trace_model`), of a model that
      `check_exportable` accepted.
    summary: the model summary of the same trace (each layer's precision).

  Raises:
    UnsupportedModelError: a grouped binary conv, or a BatchNorm without scale or bias.
    ValueError: a variable of the model is not in the export (the wiring missed a layer).
  """
  precisions = {r.path: r.precision for r in summary.rows if r.kind != 'batch_norm'}
  builder = ProgramBuilder(variables, trace, precisions, model_config.mode)
  resnet_program(builder, trace)
  if builder.unused_variables():
    raise ValueError(f'The export misses variables {builder.unused_variables()[:5]}: '
                     'export.program.resnet_program no longer follows models/resnet.py.')
  return fold.fold_batch_norm_signs(builder.ops, builder.tensors), builder.tensors
