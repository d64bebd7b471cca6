"""Export of the deployed fully binary network (every mask = 1): packed bits, folded BatchNorm.

    python -m stompp_jax.export --workdir=RUN --out=DIR            # newest checkpoint of a run
    python -m stompp_jax.export --config=configs/imagenet.py:model=resnet18 --out=DIR
                                                                   # initialized model (sizes)

writes DIR/manifest.json and DIR/tensors.npz (format: docs/export.md) and prints the size
report. `binary_inference.load(DIR)` runs the export with bit operations only for binary layers.

How the export is made:
1. The model is rebuilt from the config; one abstract trace records every conv, dense,
   BatchNorm and residual-block call (strides, padding, epsilon; block types in call order), and
   the model summary (models/summary.py) gives each layer's precision under the binary rules.
2. A walker that mirrors models/resnet.py emits the program: ops over named values (conv,
   dense, batch_norm, sign, relu, add, max_pool, global_average_pool). Binary kernels become
   sign bits packed along the input-channel axis; float layers keep float32 kernels; every
   BatchNorm becomes a per-channel affine in the centered form (y - mean) * multiplier + bias.
3. Folding: where a BatchNorm's output goes only into a sign and its input is the integer
   output of an XNOR-popcount layer, the pair becomes an integer threshold per channel
   (`fold_threshold`); other BatchNorms (before a residual addition, after a float layer) stay
   affine, and the sign is taken of the float sum as in training.
Every variable of the checkpoint must end up in the export (checked), so a model change that
the walker does not mirror fails loudly; tests/test_export.py checks the logits against the
training-time fully binary evaluation.
"""

import dataclasses
import json
import math
import os
from collections import Counter
from typing import Any, Optional

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from stompp_jax import binary_inference
from stompp_jax import layers
from stompp_jax import models
from stompp_jax import sites
from stompp_jax.data import pipeline
from stompp_jax.models import resnet
from stompp_jax.models import summary as summary_lib

FORMAT = 'stompp_jax.export/1'


# ------------------------------------------------------------------------------- packing, folding


def pack_kernel(kernel: np.ndarray) -> np.ndarray:
  """Sign bits of a latent kernel packed along its input axis (-2), as `np.packbits` does.

  kernel: float (kh, kw, cin, cout) or (in, out). Returns uint8 (kh, kw, ceil(cin / 8), cout)
  or (ceil(in / 8), out): bit 1 = +1 (latent >= 0, sign(0) = +1), channel 8j + b in bit b of
  byte j counted from the most significant bit ('big' order), zero pad bits at the end.
  """
  return np.packbits(np.asarray(kernel) >= 0, axis=-2)


def fold_threshold(center: np.ndarray, multiplier: np.ndarray, offset: np.ndarray,
                   taps: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel integer thresholds equal to sign(batch_norm(y)) for every integer |y| <= taps.

  The float32 BatchNorm of `binary_inference.batch_norm` (which rounds as Flax's does; run
  in numpy here, IEEE float32 like XLA) is evaluated on every possible XNOR-popcount output,
  so the fold is exact, rounding included; rounding is monotone, so the +1 set is an up-set
  (scale > 0), a down-set (scale < 0) or constant (scale = 0).

  Args:
    center, multiplier, offset: float32 (C,), the folded BatchNorm.
    taps: the number of +-1 products summed per output (kh * kw * cin, or in for a dense).

  Returns:
    (threshold int32 (C,), flip bool (C,)): sign is +1 iff (y >= threshold) XOR flip.
  """
  ys = np.arange(-taps, taps + 1, dtype=np.int32)[:, None]
  positive = binary_inference.batch_norm(ys, center, multiplier, offset) >= 0
  rising = np.all(positive[1:] >= positive[:-1], axis=0)
  falling = np.all(positive[1:] <= positive[:-1], axis=0)
  if not np.all(rising | falling):
    raise ValueError('BatchNorm + sign is not monotone in the conv output (non-finite BatchNorm'
                     ' statistics?); cannot fold it into thresholds.')
  count = positive.sum(0)
  threshold = np.where(rising, taps + 1 - count, count - taps)
  return threshold.astype(np.int32), ~rising


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One exported array: `array` as stored, `shape` its logical (unpacked) shape."""

  array: np.ndarray
  precision: str  # 'binary' (1 bit per element, packed), 'float32', 'int32' or 'bool'.
  shape: tuple[int, ...]


def _taps(op: dict, tensors: dict[str, Tensor]) -> int:
  """+-1 products per output of a binary conv or dense: its kernel's size over out channels."""
  return math.prod(tensors[op['kernel']].shape[:-1])


def _inputs(op: dict) -> list[str]:
  return op.get('inputs', [op['input']] if 'input' in op else [])


def fold_batch_norm_signs(ops: list[dict], tensors: dict[str, Tensor]) -> list[dict]:
  """Replaces each binary layer -> batch_norm -> sign chain by binary layer -> threshold.

  Only where the BatchNorm's output has no consumer but the sign and its input is an integer
  XNOR-popcount output. `tensors` is updated in place (affine out, thresholds in).
  """
  producers = {op['output']: op for op in ops}
  consumers = Counter(name for op in ops for name in _inputs(op))
  thresholds, folded_norms = {}, set()  # sign output -> its threshold op; folded norm outputs.
  for op in ops:
    norm = producers.get(op['input']) if op['op'] == 'sign' else None
    if norm is None or norm['op'] != 'batch_norm' or consumers[norm['output']] != 1:
      continue
    layer = producers.get(norm['input'])
    if layer is None or layer['op'] not in ('conv', 'dense') or layer['precision'] != 'binary':
      continue
    path = norm['layer']
    affine = [tensors.pop(norm[key]).array for key in ('center', 'multiplier', 'offset')]
    threshold, flip = fold_threshold(*affine, taps=_taps(layer, tensors))
    tensors[f'{path}/threshold'] = Tensor(threshold, 'int32', threshold.shape)
    tensors[f'{path}/flip'] = Tensor(flip, 'bool', flip.shape)
    folded_norms.add(norm['output'])
    thresholds[op['output']] = {
        'op': 'threshold', 'layer': path, 'input': norm['input'],
        'threshold': f'{path}/threshold', 'flip': f'{path}/flip', 'output': op['output']}
  return [thresholds.get(op['output'], op) for op in ops if op['output'] not in folded_norms]


# ------------------------------------------------------------------------------- model -> program


@dataclasses.dataclass(frozen=True)
class _Traced:
  """What one abstract call of the model shows: layer attributes by path, blocks in call order."""

  layers: dict[str, dict[str, Any]]
  blocks: tuple[tuple[str, type], ...]


def _trace(model: nn.Module, image_shape: tuple[int, int, int]) -> _Traced:
  found, blocks = {}, []

  def record(next_fun, args, kwargs, call):
    module = call.module
    if call.method_name == '__call__':
      path = layers.module_path(module)
      if isinstance(module, resnet.Block):
        blocks.append((path, type(module)))
      elif isinstance(module, layers.BinaryConv):
        found[path] = dict(strides=tuple(module.strides), padding=module.padding,
                           groups=module.feature_group_count, use_bias=module.use_bias)
      elif isinstance(module, layers.BinaryDense):
        found[path] = dict(use_bias=module.use_bias)
      elif isinstance(module, nn.BatchNorm):
        found[path] = dict(epsilon=module.epsilon, use_scale=module.use_scale,
                           use_bias=module.use_bias)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), sites.sample_input(image_shape))
  return _Traced(found, tuple(blocks))


def _json_padding(padding: Any) -> Any:
  return padding if isinstance(padding, str) else [list(map(int, p)) for p in padding]


class ProgramBuilder:
  """Emits ops and tensors for layers given by module path; tracks which variables it used.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of the model (numpy or jax arrays).
    traced: the layer attributes.
    precisions: {path: 'binary' | 'binary_weight' | 'float'} of the conv and dense layers.
    mode: 'fp', 'bwn' or 'bnn' (bnn has no ReLU).
  """

  def __init__(self, variables: dict, traced: _Traced, precisions: dict[str, str], mode: str):
    self._variables = {collection: flax.traverse_util.flatten_dict(tree, sep='/')
                       for collection, tree in variables.items()}
    self._unused = {(c, k) for c, tree in self._variables.items() for k in tree}
    self._layers = traced.layers
    self._precisions = precisions
    self._mode = mode
    self._signs: dict[str, str] = {}
    self.ops: list[dict] = []
    self.tensors: dict[str, Tensor] = {}

  def has(self, path: str) -> bool:
    return path in self._layers

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
      fields['kernel'] = self._add_tensor(f'{path}/kernel', pack_kernel(kernel), 'binary',
                                          kernel.shape)
    if self._layers[path]['use_bias']:
      bias = self._variable('params', f'{path}/bias')
      fields['bias'] = self._add_tensor(f'{path}/bias', bias, 'float32', bias.shape)
    return fields

  def _layer_input(self, x: str, path: str) -> str:
    return self.sign(x) if self._precisions[path] == 'binary' else x

  def sign(self, x: str) -> str:
    """Packed sign bits of the float value `x` (one op per value however many layers read it)."""
    if x not in self._signs:
      self._signs[x] = self._emit('sign', input=x)
    return self._signs[x]

  def conv(self, x: str, path: str) -> str:
    attrs = self._layers[path]
    if attrs['groups'] != 1 and self._precisions[path] == 'binary':
      raise NotImplementedError(f'{path}: grouped binary convs are not exported yet.')
    return self._emit('conv', input=self._layer_input(x, path),
                      **self._kernel_and_bias(path, attrs['groups']),
                      strides=list(attrs['strides']), padding=_json_padding(attrs['padding']),
                      groups=attrs['groups'])

  def dense(self, x: str, path: str) -> str:
    return self._emit('dense', input=self._layer_input(x, path), **self._kernel_and_bias(path))

  def batch_norm(self, x: str, path: str) -> str:
    attrs = self._layers[path]
    if not (attrs['use_scale'] and attrs['use_bias']):
      raise NotImplementedError(f'{path}: BatchNorm without scale or bias is not exported.')
    mean = self._variable('batch_stats', f'{path}/mean')
    var = self._variable('batch_stats', f'{path}/var')
    scale = self._variable('params', f'{path}/scale')
    # Flax's order of operations: mul = rsqrt(var + eps) * scale, in float32 under XLA.
    multiplier = np.asarray(jax.lax.rsqrt(jnp.asarray(var) + attrs['epsilon']) * scale)
    names = {key: self._add_tensor(f'{path}/{key}', value, 'float32', value.shape)
             for key, value in (('center', mean), ('multiplier', multiplier),
                                ('offset', self._variable('params', f'{path}/bias')))}
    return self._emit('batch_norm', layer=path, input=x, **names)

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


def resnet_program(builder: ProgramBuilder, model: resnet.ResNet,
                   blocks: tuple[tuple[str, type], ...]) -> None:
  """Emits models/resnet.py's ResNet.__call__ (either stem, basic or bottleneck blocks)."""
  x = builder.conv('input', 'stem_conv')
  x = builder.act(builder.batch_norm(x, 'stem_bn'))
  if model.stem == 'imagenet':
    x = builder.max_pool(x, (3, 3), (2, 2), 'SAME')
  for path, block_cls in blocks:
    num_convs = 3 if issubclass(block_cls, resnet.BottleneckBlock) else 2
    y = x
    for i in range(1, num_convs + 1):
      y = builder.batch_norm(builder.conv(y, f'{path}/conv{i}'), f'{path}/bn{i}')
      if i < num_convs:
        y = builder.act(y)
    shortcut = x
    if builder.has(f'{path}/shortcut_conv'):
      shortcut = builder.batch_norm(builder.conv(x, f'{path}/shortcut_conv'), f'{path}/shortcut_bn')
    x = builder.act(builder.add(y, shortcut))
  builder.dense(builder.global_average_pool(x), 'classifier')


def exportable_model(model_config: Any, *, num_classes: int,
                     image_shape: tuple[int, int, int]) -> resnet.ResNet:
  """`models.create_model(...)`, or NotImplementedError for a model the export cannot walk."""
  model = models.create_model(model_config, num_classes=num_classes, image_shape=image_shape)
  if not isinstance(model, resnet.ResNet):
    raise NotImplementedError(f'Export supports the ResNets of models/resnet.py; '
                              f'{model_config.name} is not supported yet.')
  return model


def build_program(model_config: Any, variables: dict, *, num_classes: int,
                  image_shape: tuple[int, int, int]) -> tuple[list[dict], dict[str, Tensor],
                                                              summary_lib.Summary]:
  """The folded program, its tensors and the model summary of one model's variables.

  Raises:
    NotImplementedError: the model is not a ResNet of models/resnet.py.
    ValueError: a variable of the model is not in the export (the walker missed a layer).
  """
  model = exportable_model(model_config, num_classes=num_classes, image_shape=image_shape)
  summary = summary_lib.summarize(model_config, num_classes=num_classes, image_shape=image_shape,
                                  rules=models.binary_rules(model_config))
  precisions = {r.path: r.precision for r in summary.rows if r.kind != 'batch_norm'}
  traced = _trace(model, image_shape)
  builder = ProgramBuilder(variables, traced, precisions, model_config.mode)
  resnet_program(builder, model, traced.blocks)
  if builder.unused_variables():
    raise ValueError(f'The export misses variables {builder.unused_variables()[:5]}: '
                     'export.resnet_program no longer mirrors models/resnet.py.')
  return fold_batch_norm_signs(builder.ops, builder.tensors), builder.tensors, summary


# ------------------------------------------------------------------------------- files, sizes


def _count(tree: Any) -> int:
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree))


def _directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def write_export(out_dir: str, *, model_config: Any, variables: dict, num_classes: int,
                 image_shape: tuple[int, int, int], source: dict[str, Any],
                 checkpoint_state_bytes: Optional[int] = None) -> dict:
  """Exports `variables` of the model `model_config` describes into `out_dir`; returns the manifest.

  Args:
    out_dir: created if missing; manifest.json and tensors.npz are (over)written.
    model_config: the ConfigDict `config.model` of the run.
    variables: {'params', 'batch_stats'} (float32 latent weights and statistics).
    num_classes, image_shape: as the model was built for training.
    source: where the variables come from (workdir and step, or config).
    checkpoint_state_bytes: the size on disk of the train state they were restored from.
  """
  ops, tensors, summary = build_program(model_config, variables, num_classes=num_classes,
                                        image_shape=image_shape)
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, binary_inference.TENSORS),
           **{name: t.array for name, t in tensors.items()})
  export_bytes = sum(t.array.nbytes for t in tensors.values())
  by_precision = Counter()
  for t in tensors.values():
    by_precision[t.precision] += t.array.nbytes
  float32_bytes = 4 * _count(variables)
  manifest = {
      'format': FORMAT,
      'model': dict(name=model_config.name, mode=model_config.mode, stem=model_config.stem,
                    num_classes=num_classes, image_shape=list(image_shape),
                    binary_include=list(model_config.binary_include),
                    binary_exclude=list(model_config.binary_exclude)),
      'source': source,
      'input': 'input',
      'output': ops[-1]['output'],
      'program': ops,
      'tensors': {name: dict(shape=list(t.shape), stored_shape=list(t.array.shape),
                             dtype=str(t.array.dtype), precision=t.precision,
                             bytes=int(t.array.nbytes))
                  for name, t in tensors.items()},
      'size': dict(export_bytes=int(export_bytes),
                   by_precision={k: int(v) for k, v in sorted(by_precision.items())},
                   float32_model_bytes=int(float32_bytes),
                   compression=float32_bytes / export_bytes,
                   checkpoint_state_bytes=checkpoint_state_bytes,
                   summary_memory_bytes=summary.memory_bytes,
                   summary_compression=summary.compression),
  }
  with open(os.path.join(out_dir, binary_inference.MANIFEST), 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=1)
    f.write('\n')
  return manifest


_GROUPS = {  # (name suffix, precision) -> report row.
    ('kernel', 'binary'): 'binary kernels (1 bit, packed)',
    ('kernel', 'float32'): 'float kernels (float32)',
    ('bias', 'float32'): 'biases (float32)',
    ('center', 'float32'): 'BatchNorm affine (float32)',
    ('multiplier', 'float32'): 'BatchNorm affine (float32)',
    ('offset', 'float32'): 'BatchNorm affine (float32)',
    ('threshold', 'int32'): 'BatchNorm+sign thresholds (int32)',
    ('flip', 'bool'): 'BatchNorm+sign directions (bool)',
}


def size_report(manifest: dict) -> str:
  """The export's bytes by tensor group against the float32 model and the model summary."""
  groups: dict[str, list[int]] = {}
  for name, t in manifest['tensors'].items():
    row = groups.setdefault(_GROUPS[name.rsplit('/', 1)[1], t['precision']], [0, 0, 0])
    row[0] += 1
    row[1] += math.prod(t['shape'])
    row[2] += t['bytes']
  size, model = manifest['size'], manifest['model']
  rows = [('tensors', 'count', 'elements', 'bytes')]
  rows += [(group, str(n), f'{elements:,}', f'{nbytes:,}')
           for group, (n, elements, nbytes) in groups.items()]
  rows += [('export total', '', '', f'{size["export_bytes"]:,}'),
           ('float32 model (params + BatchNorm statistics)', '', '',
            f'{size["float32_model_bytes"]:,}')]
  if size['checkpoint_state_bytes'] is not None:
    rows.append(('checkpoint train state on disk (with optimizer state)', '', '',
                 f'{size["checkpoint_state_bytes"]:,}'))
  shape = 'x'.join(map(str, model['image_shape']))
  mib = lambda key: f'{size[key] / 2**20:.3f} MiB'
  return '\n'.join([
      f'{model["name"]}, mode {model["mode"]}, input {shape}, {model["num_classes"]} classes;'
      f' from {json.dumps(manifest["source"])}',
      *summary_lib._table(rows, left=1),  # pylint: disable=protected-access
      f'export: {mib("export_bytes")}, {size["compression"]:.2f}x smaller than the float32'
      f' model ({mib("float32_model_bytes")})',
      f'model summary (1 bit per binary weight, BatchNorm unfolded): '
      f'{mib("summary_memory_bytes")}, {size["summary_compression"]:.2f}x'])


# ------------------------------------------------------------------------------- sources


def data_shape(data_config: Any) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, image_shape) the model was built for, without reading any image."""
  if data_config.source == 'synthetic':
    info = pipeline.dataset_info(data_config)
    return info.num_classes, tuple(info.image_shape)
  return summary_lib.dataset_shape(data_config)


def restore_variables(workdir: str) -> tuple[int, dict, int]:
  """(step, {'params', 'batch_stats'}, train state bytes on disk) of the newest checkpoint."""
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {directory}: train the run first.')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fallback_sharding=device)))['state']
  finally:
    manager.close()
  variables = jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})
  return step, variables, _directory_bytes(os.path.join(directory, str(step), 'state'))


def export_workdir(workdir: str, out_dir: str) -> dict:
  """Exports the newest checkpoint of the run in `workdir` (its config.json builds the model)."""
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  step, variables, state_bytes = restore_variables(workdir)
  _, image_shape = data_shape(config.data)
  num_classes = variables['params']['classifier']['kernel'].shape[-1]
  return write_export(out_dir, model_config=config.model, variables=variables,
                      num_classes=num_classes, image_shape=image_shape,
                      source=dict(workdir=os.path.abspath(workdir), step=int(step)),
                      checkpoint_state_bytes=state_bytes)


def export_config(config: ml_collections.ConfigDict, out_dir: str,
                  config_name: Optional[str] = None) -> dict:
  """Exports the initialized (untrained) model of `config`: sizes do not depend on training."""
  num_classes, image_shape = data_shape(config.data)
  model = exportable_model(config.model, num_classes=num_classes, image_shape=image_shape)
  init = jax.jit(model.init, static_argnames='train')
  variables = jax.device_get(init(jax.random.PRNGKey(config.seed), jnp.zeros((1, *image_shape)),
                                  train=False))
  return write_export(out_dir, model_config=config.model, variables=dict(variables),
                      num_classes=num_classes, image_shape=image_shape,
                      source=dict(config=config_name, initialized=True, seed=config.seed))


# ------------------------------------------------------------------------------- command line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  workdir, config, out = flags.FLAGS.workdir, flags.FLAGS.config, flags.FLAGS.out
  if (workdir is None) == (config is None):
    raise app.UsageError('Give exactly one of --workdir and --config.')
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO.
  try:
    if workdir is not None:
      manifest = export_workdir(workdir, out)
    else:
      manifest = export_config(config, out, config_flags.get_config_filename(flags.FLAGS['config']))
  except NotImplementedError as e:
    raise SystemExit(f'Not exported: {e}') from None
  print(size_report(manifest))
  print(f'wrote {os.path.join(out, binary_inference.MANIFEST)} and '
        f'{os.path.join(out, binary_inference.TENSORS)}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Run directory: export its newest checkpoint.')
  flags.DEFINE_string('out', None, 'Directory for manifest.json and tensors.npz.', required=True)
  config_flags.DEFINE_config_file(
      'config', None, 'Instead of --workdir: export the initialized model of this config.')
  app.run(main)
