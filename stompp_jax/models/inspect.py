"""One abstract trace of a model: every module call, in call order, with shapes and variables.

    trace = inspect.trace_model(model, image_shape=(32, 32, 3))
    [c.name for c in trace.calls_of(layers.BinaryConv)]     # ['stem_conv', 'stage1_block0/conv1', ...]

`jax.eval_shape` of `model.init` runs the model once without computing anything; Flax's
`nn.intercept_methods` records each module's `__call__` on the way. The site table (sites.py),
the model summary (models/summary.py) and the export (export/program.py) all read this one
record instead of tracing the model themselves.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from stompp_jax import layers


@dataclasses.dataclass(frozen=True)
class Call:
  """One `__call__` of a module.

  Attributes:
    path: the module path, a tuple of names (Flax's `module.path`; the params tree's keys; ()
      for the model itself).
    name: the same path '/'-joined, as the binary-layer rules match it and the tables show it.
    module: the module (read its attributes: strides, padding, epsilon, ...; not its variables).
    input_shape: the first argument's shape without the batch dim.
    output_shape: the output's shape without the batch dim.
    variables: {collection: {'/'-joined name: jax.ShapeDtypeStruct}} of this module and its
      children, as bound at this call.
  """

  path: tuple[str, ...]
  name: str
  module: nn.Module
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  variables: dict[str, dict[str, jax.ShapeDtypeStruct]]

  def kernel_shape(self) -> tuple[int, ...]:
    return tuple(self.variables['params']['kernel'].shape)


@dataclasses.dataclass(frozen=True)
class Trace:
  """Every module call in the order the calls start (a parent before its children).

  Attributes:
    calls: the calls.
    variables: the abstract variables of `model.init` ({'params': ..., 'batch_stats': ...}).
  """

  calls: tuple[Call, ...]
  variables: Any

  def calls_of(self, *types: type) -> tuple[Call, ...]:
    """The calls of modules of the given types, in call order."""
    return tuple(c for c in self.calls if isinstance(c.module, types))

  def layer_calls(self) -> tuple[Call, ...]:
    """The conv, dense and BatchNorm calls: the layers that hold variables in our models."""
    return self.calls_of(layers.BinaryConv, layers.BinaryDense, nn.BatchNorm)


def sample_input(image_shape: tuple[int, ...], batch_size: int = 1) -> jax.ShapeDtypeStruct:
  """An abstract NHWC float32 batch for tracing."""
  return jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, 'shape', ())[1:])


def _abstract(tree: Any) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  return {collection: {name: jax.ShapeDtypeStruct(v.shape, v.dtype) for name, v in
                       flax.traverse_util.flatten_dict(dict(values), sep='/').items()}
          for collection, values in tree.items()}


def trace_model(model: nn.Module, image_shape: tuple[int, ...]) -> Trace:
  """Traces `model.init(key, x)` on an abstract (1, *image_shape) batch (calls with their defaults:
  train=False, ctx=None for the models of the zoo)."""
  started: list[dict] = []

  def record(next_fun, args, kwargs, call):
    if call.method_name != '__call__':
      return next_fun(*args, **kwargs)
    entry = dict(path=tuple(call.module.path), name=layers.module_path(call.module),
                 module=call.module,
                 input_shape=_shape(args[0]) if args else ())
    started.append(entry)
    out = next_fun(*args, **kwargs)
    entry.update(output_shape=_shape(out), variables=_abstract(call.module.variables))
    return out

  with nn.intercept_methods(record):
    variables = jax.eval_shape(model.init, jax.random.key(0), sample_input(image_shape))
  return Trace(tuple(Call(**entry) for entry in started), variables)
