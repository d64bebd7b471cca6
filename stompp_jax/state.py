"""The train state: everything a checkpoint must hold to continue a run bit for bit."""

import hashlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Attributes:
    step: int32 scalar, the number of train steps taken.
    params: the model's 'params' collection (latent weights, float32).
    batch_stats: the model's 'batch_stats' collection (BatchNorm running statistics).
    opt_state: the optax state.
    mask_key: uint32 (2,) raw PRNG key; every mask key derives from it by folding in the site
      (masks.site_key), and every mask is a function of that key and the step.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  mask_key: jax.Array


def create_train_state(model, tx: optax.GradientTransformation, seed: int,
                       sample_images: jax.Array) -> TrainState:
  """Initializes parameters from `seed` (call under jit for sharded outputs).

  Args:
    model: a Flax module taking (images, train=..., ctx=...).
    tx: the optimizer.
    seed: the run's seed; init and mask keys are folded from it.
    sample_images: (batch, H, W, C) array (its values are not used).
  """
  root = jax.random.PRNGKey(seed)
  variables = model.init(jax.random.fold_in(root, 0), sample_images, train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      mask_key=jax.random.fold_in(root, 1))


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 values (1-, 2- and 4-byte types widened; 8-byte split in two)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


@jax.jit
def fingerprint_and_finite(tree: Any) -> tuple[jax.Array, jax.Array]:
  """(uint32 fingerprint of the bits of every array in `tree`, bool: all floats finite).

  The fingerprint is a sum mod 2**32 of each element's bits times an odd weight, so it is exact
  whatever the sharding or reduction order, and any single flipped bit changes it. Checkpoints
  store it to detect silent corruption on restore.
  """
  fingerprint, finite = jnp.uint32(0), jnp.bool_(True)
  for leaf in jax.tree.leaves(tree):
    bits = _as_uint32(leaf).ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    fingerprint = fingerprint * jnp.uint32(0x9E3779B1) + jnp.sum(bits * weights, dtype=jnp.uint32)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      finite &= jnp.all(jnp.isfinite(leaf))
  return fingerprint, finite


def signature(abstract_tree: Any) -> str:
  """A short hash of the paths, shapes and dtypes of `abstract_tree`: equal iff a checkpoint of
  one tree restores into the other."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  text = ';'.join(f'{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype}' for path, x in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
