"""The site table: which layers of a model are binary, numbered in forward-pass order.

Sites are read from the model's one abstract trace (models/inspect.py): the order in which
binary layers are called, so layerwise schedules work on any model without hand
numbering. `experiment.build` turns the table into the run's site tree (`site_tree`: the
params-shaped tree that the optimizer transforms and the train step read) and the layers' table
(`BinarizationConfig.sites`); the binary-layer rules are read here and nowhere else in a run.
"""

import dataclasses
from typing import Any

import flax.linen as nn

from stompp_jax import layers
from stompp_jax import tables
from stompp_jax.binary import context as bctx
from stompp_jax.binary import site_tree as site_tree_lib
from stompp_jax.models import inspect


@dataclasses.dataclass(frozen=True)
class Site:
  """One binarized layer.

  Attributes:
    path: the module path, a tuple of names (Flax's `module.path`).
    kind: 'conv' or 'dense'.
    kernel_shape: the kernel's shape.
    input_shape: the layer input's shape without the batch dim.
  """

  path: tuple[str, ...]
  kind: str
  kernel_shape: tuple[int, ...]
  input_shape: tuple[int, ...]


def discover_sites(trace: inspect.Trace, rules: bctx.BinaryRules,
                   layer_types: tuple[type, ...] = layers.ZOO_LAYERS) -> tuple[Site, ...]:
  """The binary layers of a model's trace (`inspect.trace_model`), in call order.

  A layer called more than once is one site, at its first call. `layer_types`: the layers that
  can be sites (`layers.site_layers(model)`: the zoo's, or plain ones for `layers.ByRules`).
  """
  found: dict[tuple[str, ...], Site] = {}
  for call in trace.calls_of(*layer_types):
    if rules.is_binary(call.name) and call.path not in found:
      found[call.path] = Site(
          path=call.path,
          kind='conv' if isinstance(call.module, (layers.BinaryConv, nn.Conv)) else 'dense',
          kernel_shape=call.kernel_shape(),
          input_shape=call.input_shape)
  return tuple(found.values())


def site_table(sites: tuple[Site, ...]) -> str:
  """A printable table: index, module path, kernel shape, input shape."""
  rows = [('site', 'module path', 'kernel shape', 'input shape')]
  rows += [(str(i), '/'.join(s.path), 'x'.join(map(str, s.kernel_shape)), 'x'.join(map(str, s.input_shape)))
           for i, s in enumerate(sites)]
  return '\n'.join(tables.table(rows, left=4))


def site_tree(params: Any, sites: tuple[Site, ...]) -> Any:
  """The site tree of `params` (binary/site_tree.py): site i at the kernel of `sites[i]`, None
  at every other leaf. Raises ValueError when a site's kernel is not in `params`."""
  return site_tree_lib.from_paths(params, [(*s.path, 'kernel') for s in sites])
