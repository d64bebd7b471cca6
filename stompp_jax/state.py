"""The train state: everything a checkpoint must hold to continue a run bit for bit."""

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
