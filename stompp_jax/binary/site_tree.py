"""Which parameters are binary kernels: a params-shaped tree of site indices.

The site tree has the structure of the model's params tree: the site index (an int, forward
order) at each binary kernel and None at every other leaf, like an optax mask or big_vision's
mask pytrees. `experiment.build` makes it once from the model's trace (`sites.site_tree`);
the optimizer transforms (binary/optim.py), the train step and its diagnostics read it. A
tree of another structure is an error, never a silent pass-through.

    tree = site_tree.from_paths(params, [('conv1', 'kernel'), ('conv2', 'kernel')])
    site_tree.map_sites(lambda update, site: ..., tree, updates)
    site_tree.in_site_order(tree, params)      # [conv1 kernel, conv2 kernel]
"""

from typing import Any, Callable, Sequence

import jax


def _is_none(x: Any) -> bool:
  return x is None


def _names(key_path) -> tuple[str, ...]:
  """A params key path (dict keys) as a tuple of names."""
  if not all(isinstance(k, jax.tree_util.DictKey) for k in key_path):
    raise ValueError(f'{jax.tree_util.keystr(key_path)} is not a path of nested dicts: the params'
                     ' tree must be nested dicts, as Flax makes it.')
  return tuple(str(k.key) for k in key_path)


def from_paths(params: Any, kernel_paths: Sequence[tuple[str, ...]]) -> Any:
  """The site tree of `params`: index i at `kernel_paths[i]`, None elsewhere.

  Args:
    params: the params tree (arrays or jax.ShapeDtypeStructs in nested dicts).
    kernel_paths: each site's kernel path, e.g. ('stage1_block0', 'conv1', 'kernel').

  Raises:
    ValueError: a path names no leaf of `params`, or names one twice.
  """
  index = {tuple(path): i for i, path in enumerate(kernel_paths)}
  if len(index) != len(kernel_paths):
    raise ValueError(f'A kernel path is listed twice: {list(kernel_paths)}.')
  tree = jax.tree_util.tree_map_with_path(lambda path, _: index.pop(_names(path), None), params)
  if index:
    raise ValueError(f'No parameter at {", ".join("/".join(p) for p in index)}: the site paths'
                     ' do not belong to this params tree.')
  return tree


def check_structure(site_tree: Any, tree: Any, what: str = 'params') -> None:
  """Raises ValueError unless `tree` has the structure of the params tree of `site_tree`."""
  expected = jax.tree.structure(site_tree, is_leaf=_is_none)
  actual = jax.tree.structure(tree)
  if expected != actual:
    expected_paths = {_names(p) for p, _ in
                      jax.tree_util.tree_flatten_with_path(site_tree, is_leaf=_is_none)[0]}
    actual_paths = {tuple(str(getattr(k, 'key', k)) for k in p)
                    for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    differ = sorted('/'.join(p) for p in expected_paths ^ actual_paths)[:5]
    raise ValueError(f'The {what} tree does not have the structure of the site tree (paths in'
                     f' only one of them: {", ".join(differ) or "none; the node types differ"}).')


def num_sites(site_tree: Any) -> int:
  return sum(site is not None for site in jax.tree.leaves(site_tree, is_leaf=_is_none))


def map_sites(fn: Callable[..., jax.Array], site_tree: Any, tree: Any, *rest: Any) -> Any:
  """`tree` with fn(leaf, site, *leaves of `rest`) at every site; other leaves unchanged.

  Raises:
    ValueError: `tree` or one of `rest` has another structure than the site tree.
  """
  for other in (tree, *rest):
    check_structure(site_tree, other)
  return jax.tree.map(lambda site, x, *r: x if site is None else fn(x, site, *r),
                      site_tree, tree, *rest, is_leaf=_is_none)


def in_site_order(site_tree: Any, tree: Any) -> list[Any]:
  """The leaves of `tree` at the sites, in site order (site 0 first)."""
  check_structure(site_tree, tree)
  pairs = [(site, x) for site, x in zip(jax.tree.leaves(site_tree, is_leaf=_is_none),
                                         jax.tree.leaves(tree)) if site is not None]
  return [x for _, x in sorted(pairs, key=lambda pair: pair[0])]
