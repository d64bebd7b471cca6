"""Model summary as larq users know it: params by precision, memory and MACs, per layer and total.

    python -m stompp_jax.models.summary --config=configs/default.py \
        --config.model.name=resnet18 --config.data.name=imagenet2012

prints the table of `render(summarize(...))` for the configured model, mode and binary rules.
Bad input (a flag, an extra argument, the config) prints one line `Error: ...` and exits
with status 2.

Everything comes from the model itself: its one abstract trace (models/inspect.py) records
every conv, dense and BatchNorm call with its output shape and its variables, in forward order; the rows must add up to the whole variable tree (checked). What is counted:

- 1-bit params: the kernels of the layers the rules make binary, in modes bwn and bnn (none in fp).
- 32-bit params: every other parameter (float kernels, biases, BatchNorm scale and bias).
- 32-bit statistics: BatchNorm running mean and variance (not trainable; larq counts them as
  params too; they are listed apart here so that the trainable total matches published counts).
- Memory: the variables stored for inference, 1 bit per 1-bit param and 32 bits per other param
  or statistic; activations are not counted and BatchNorm is not folded.
- MACs per example: out_h * out_w * kh * kw * (in / groups) * out for a conv, in * out for a
  dense; biases, BatchNorm, pooling and residual additions count 0. They are split by what
  multiplies: binary MACs (1-bit kernel and 1-bit input: binary layers in bnn mode, XNOR-popcount),
  binary-weight MACs (1-bit kernel, real input: binary layers in bwn mode, additions only; larq
  counts these as 32-bit MACs) and float MACs (all others, in the compute dtype).
"""

import dataclasses
import math
from typing import Any

from absl import flags
import flax.linen as nn
import jax
from ml_collections import config_flags

from stompp_jax import errors
from stompp_jax import flag_errors
from stompp_jax import layers
from stompp_jax import models
from stompp_jax import sites
from stompp_jax import tables
from stompp_jax.binary import context as bctx
from stompp_jax.data import pipeline
from stompp_jax.data import sources
from stompp_jax.models import inspect

@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One conv, dense or BatchNorm call.

  Attributes:
    path: '/'-joined module path.
    kind: 'conv', 'dense' or 'batch_norm'.
    precision: 'binary' = 1-bit kernel and input, 'binary_weight' = 1-bit kernel only,
      'float' = neither (BatchNorm is always 'float').
    output_shape: per example (no batch dim).
    binary_params, float_params, float_stats: counts (see the module docstring).
    binary_macs, binary_weight_macs, float_macs: multiply-accumulates per example.
  """

  path: str
  kind: str
  precision: str
  output_shape: tuple[int, ...]
  binary_params: int = 0
  float_params: int = 0
  float_stats: int = 0
  binary_macs: int = 0
  binary_weight_macs: int = 0
  float_macs: int = 0

  @property
  def memory_bits(self) -> int:
    return self.binary_params + 32 * (self.float_params + self.float_stats)


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per-layer rows in forward order and their totals."""

  model: str
  mode: str
  image_shape: tuple[int, int, int]
  num_classes: int
  rules: bctx.BinaryRules
  rows: tuple[LayerRow, ...]

  def total(self, field: str) -> int:
    """Sum of an int field of the rows (e.g. 'binary_params') or of `memory_bits`."""
    return sum(getattr(r, field) for r in self.rows)

  @property
  def trainable_params(self) -> int:
    return self.total('binary_params') + self.total('float_params')

  @property
  def macs(self) -> int:
    return self.total('binary_macs') + self.total('binary_weight_macs') + self.total('float_macs')

  @property
  def memory_bytes(self) -> float:
    return self.total('memory_bits') / 8

  @property
  def float32_memory_bytes(self) -> float:
    """The same variables, all float32."""
    return 4 * (self.trainable_params + self.total('float_stats'))

  @property
  def compression(self) -> float:
    """How many times smaller than the all-float32 model."""
    return self.float32_memory_bytes / self.memory_bytes


def count_values(tree: Any) -> int:
  """How many numbers the arrays of `tree` hold (arrays or jax.ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _layer_row(call: inspect.Call, mode: str, binary: bool) -> LayerRow:
  params = call.variables.get('params', {})
  if isinstance(call.module, nn.BatchNorm):
    return LayerRow(call.name, 'batch_norm', 'float', call.output_shape,
                    float_params=count_values(params),
                    float_stats=count_values(call.variables.get('batch_stats', {})))
  precision = ('binary' if mode == 'bnn' else 'binary_weight') if binary else 'float'
  kernel_size = math.prod(call.kernel_shape())
  binary_params = kernel_size if binary else 0
  macs = math.prod(call.output_shape[:-1]) * kernel_size
  return LayerRow(call.name, 'conv' if isinstance(call.module, layers.BinaryConv) else 'dense',
                  precision, call.output_shape, binary_params=binary_params,
                  float_params=count_values(params) - binary_params,
                  **{f'{precision}_macs': macs})


def summarize_trace(trace: inspect.Trace, *, model_name: str, mode: str,
                    rules: bctx.BinaryRules) -> Summary:
  """Summary of a model from its abstract trace (`inspect.trace_model`).

  Args:
    trace: the trace; its first call (the model) gives the image shape and the class count.
    model_name, mode: `config.model.name` and `.mode`; the mode decides what the rules binarize.
    rules: the binary-layer rules (e.g. `models.binary_rules(model_config)`).

  Returns:
    Rows for every conv, dense and BatchNorm call in forward order.

  Raises:
    ValueError: the rows do not account for every variable of the model (a layer type this
      summary does not know holds variables).
  """
  # The site table a binary run of this model would have: the one answer to "is it binary".
  site_paths = {s.path for s in sites.discover_sites(trace, rules)} if mode != 'fp' else set()
  rows = [_layer_row(call, mode, call.path in site_paths) for call in trace.layer_calls()]
  counted = sum(r.binary_params + r.float_params + r.float_stats for r in rows)
  total = count_values(trace.variables)
  if counted != total:
    raise ValueError(f'The summary rows hold {counted} of the {total} variables'
                     f' of {model_name}: a layer type other than BinaryConv, BinaryDense and '
                     'BatchNorm holds variables; teach summary.py to count it.')
  model_call = trace.calls[0]
  return Summary(model_name, mode, tuple(model_call.input_shape), model_call.output_shape[-1],
                 rules, tuple(rows))


def summarize(model_config: Any, *, num_classes: int, image_shape: tuple[int, int, int],
              rules: bctx.BinaryRules) -> Summary:
  """`summarize_trace` of the model `model_config` (the ConfigDict `config.model`) builds."""
  model = models.create_model(model_config, num_classes=num_classes, image_shape=image_shape)
  return summarize_trace(inspect.trace_model(model, image_shape), model_name=model_config.name,
                         mode=model_config.mode, rules=rules)


def _precision(row: LayerRow) -> str:
  return '-' if row.kind == 'batch_norm' else row.precision.replace('_', '-')


def _size(num_bytes: float) -> str:
  if num_bytes < 2**20:
    return f'{num_bytes / 2**10:,.2f} KiB'
  return f'{num_bytes / 2**20:,.2f} MiB'


def render(summary: Summary) -> str:
  """The summary as a text table of layers followed by the totals."""
  s = summary
  layer_lines = tables.table(
      [('layer', 'precision', 'output', '1-bit params', '32-bit params', '32-bit stats',
        'memory KiB', 'binary MACs', 'bin-weight MACs', 'float MACs')]
      + [(r.path, _precision(r), 'x'.join(map(str, r.output_shape)), f'{r.binary_params:,}',
          f'{r.float_params:,}', f'{r.float_stats:,}', f'{r.memory_bits / 8 / 1024:,.2f}',
          f'{r.binary_macs:,}', f'{r.binary_weight_macs:,}', f'{r.float_macs:,}')
         for r in s.rows], left=3)

  def share(field: str) -> str:
    return f'{100 * s.total(field) / max(s.macs, 1):.1f}%'

  total_lines = tables.table([
      ('trainable params', f'{s.trainable_params:,}', ''),
      ('  1-bit', f'{s.total("binary_params"):,}', ''),
      ('  32-bit', f'{s.total("float_params"):,}', ''),
      ('BatchNorm statistics (32-bit)', f'{s.total("float_stats"):,}', ''),
      ('model size', _size(s.memory_bytes), ''),
      ('float-32 equivalent', _size(s.float32_memory_bytes), ''),
      ('compression vs float-32', f'{s.compression:.2f}x', ''),
      ('MACs per example', f'{s.macs:,}', ''),
      ('  binary (1-bit x 1-bit)', f'{s.total("binary_macs"):,}', share('binary_macs')),
      ('  binary-weight (1-bit x float)', f'{s.total("binary_weight_macs"):,}',
       share('binary_weight_macs')),
      ('  float', f'{s.total("float_macs"):,}', share('float_macs')),
  ], left=1)
  rule = '-' * len(layer_lines[0])
  title = (f'{s.model}, mode {s.mode}, input {"x".join(map(str, s.image_shape))}, '
           f'{s.num_classes} classes; binary rules include {s.rules.include} '
           f'exclude {s.rules.exclude}')
  return '\n'.join([title, rule, layer_lines[0], rule, *layer_lines[1:], rule, *total_lines])


def _main(argv):
  del argv  # Only the program's name: flag_errors.parse_flags refuses any other argument.
  config = _CONFIG.value
  try:
    models.check_model_config(config.model)
    rules = models.binary_rules(config.model)
    sources.check_data_config(config.data)
    num_classes, image_shape = pipeline.input_shape(config.data)
  except errors.SetupError as e:
    errors.fail(str(e), errors.EXIT_BAD_INPUT)
  print(render(summarize(config.model, num_classes=num_classes, image_shape=image_shape,
                         rules=rules)))


if __name__ == '__main__':
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/default.py.')
  flags.mark_flags_as_required(['config'])
  flag_errors.run(_main, 'python -m stompp_jax.models.summary')
