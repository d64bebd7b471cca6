"""The site table: which layers of a model are binary, numbered in forward-pass order.

Sites are found by tracing the model once (abstractly, with `jax.eval_shape`) and recording the
order in which binary layers are called, so layerwise schedules work on any model without hand
numbering.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from stompp_jax import layers
from stompp_jax.binary import context as bctx


@dataclasses.dataclass(frozen=True)
class Site:
  """One binarized layer.

  Attributes:
    path: '/'-joined module path.
    kind: 'conv' or 'dense'.
    kernel_shape: the kernel's shape.
    input_shape: the layer input's shape without the batch dim.
  """

  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  input_shape: tuple[int, ...]


def discover_sites(init_fn: Callable[..., Any], rules: bctx.BinaryRules, *args,
                   **kwargs) -> tuple[Site, ...]:
  """Traces `init_fn(*args, **kwargs)` (e.g. `model.init`) and lists its binary layers in call order.

  `args` may be arrays or jax.ShapeDtypeStructs; `kwargs` are static (e.g. train=False).
  """
  found: dict[str, Site] = {}

  def record(next_fun, call_args, call_kwargs, call):
    out = next_fun(*call_args, **call_kwargs)
    module = call.module
    if call.method_name == '__call__' and isinstance(module, (layers.BinaryConv, layers.BinaryDense)):
      path = layers.module_path(module)
      if rules.is_binary(path) and path not in found:
        found[path] = Site(
            path=path,
            kind='conv' if isinstance(module, layers.BinaryConv) else 'dense',
            kernel_shape=tuple(module.variables['params']['kernel'].shape),
            input_shape=tuple(call_args[0].shape[1:]))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(init_fn, **kwargs), *args)
  return tuple(found.values())


def site_table(sites: tuple[Site, ...]) -> str:
  """A printable table: index, module path, kernel shape, input shape."""
  rows = [('site', 'module path', 'kernel shape', 'input shape')]
  rows += [(str(i), s.path, 'x'.join(map(str, s.kernel_shape)), 'x'.join(map(str, s.input_shape)))
           for i, s in enumerate(sites)]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def kernel_sites(sites: tuple[Site, ...]) -> dict[tuple[str, ...], int]:
  """{param path (*module path, 'kernel'): site index} of the params tree, for binary/optim."""
  return {(*s.path.split('/'), 'kernel'): i for i, s in enumerate(sites)}


def sample_input(image_shape: tuple[int, ...], batch_size: int = 1) -> jax.ShapeDtypeStruct:
  """An abstract NHWC batch for tracing."""
  return jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
