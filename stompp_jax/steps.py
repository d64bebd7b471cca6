"""The jitted train and eval steps (pure functions of state and batch), and the eval loop."""

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import optax

from stompp_jax import metrics as metrics_lib
from stompp_jax import state as state_lib
from stompp_jax.binary import context as bctx
from stompp_jax.binary import site_tree


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross entropy in float32. logits (B, K), labels int (B,) -> (B,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def all_finite(*trees: Any) -> jax.Array:
  """bool scalar: every leaf of every tree is free of NaN and infinities."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def site_diagnostics(old_params, new_params, grads, sites) -> dict[str, jax.Array]:
  """Per-site values of one step, each (L,) in site order, from the sites' latent kernels.

  Args:
    old_params, new_params: the params trees before and after the update.
    grads: the gradient tree of this step (same structure).
    sites: the site tree (binary/site_tree.py) of those trees.

  Returns:
    'sign_flip_ratio': fraction of kernel entries whose sign (sign(0) = +1) the update changed;
    'in_clip_fraction': fraction of updated latent entries with |w| <= 1 (where the clipped
    identity passes gradient); 'grad_norm': L2 norm of the kernel's gradient.
  """
  flips, in_clip, grad_norms = [], [], []
  for old, new, grad in zip(*(site_tree.in_site_order(sites, t)
                              for t in (old_params, new_params, grads))):
    flips.append(jnp.mean((old >= 0) != (new >= 0)))
    in_clip.append(jnp.mean(jnp.abs(new) <= 1))
    grad_norms.append(jnp.sqrt(jnp.sum(jnp.square(grad.astype(jnp.float32)))))
  return {'sign_flip_ratio': jnp.stack(flips), 'in_clip_fraction': jnp.stack(in_clip),
          'grad_norm': jnp.stack(grad_norms)}


def train_step(state: state_lib.TrainState, batch: dict[str, jax.Array], *, model,
               binarization: bctx.BinarizationConfig, sites: Any,
               tx: optax.GradientTransformationExtraArgs, diagnostics: bool) -> tuple[state_lib.TrainState, metrics_lib.TrainMetrics,
                                           dict[str, jax.Array]]:
  """One optimizer step on a global batch.

  Args:
    state: the train state.
    batch: {'image': (B, H, W, C) float, 'label': int32 (B,)}.
    model: the Flax model.
    binarization: static binarization settings with the site table.
    sites: the site tree of the params (binary/site_tree.py; all None for method fp).
    tx: the optimizer; its update gets the step's BinarizationContext.
    diagnostics: also return per-site sign flips, in-clip fractions and gradient norms.

  Returns:
    (new state, averaged metrics, per-site (L,) values of this step). A step whose loss,
    gradients or new BatchNorm statistics are not finite changes nothing but the step counter
    and reports nonfinite = 1 (a NaN can reach the statistics alone: a branch the loss does not
    use, or a value the loss masks out).
  """
  ctx = bctx.with_kernel_masks(  # Each kernel mask once, for the forward pass and the optimizer.
      bctx.BinarizationContext(step=state.step, key=state.mask_key, config=binarization),
      [kernel.shape for kernel in site_tree.in_site_order(sites, state.params)])

  def loss_fn(params):
    logits, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        ctx=ctx, mutable=['batch_stats', 'binary_stats'])
    return cross_entropy(logits, batch['label']).mean(), (logits, new_vars)

  (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params, binarization_context=ctx)
  params = optax.apply_updates(state.params, updates)
  new_batch_stats = new_vars.get('batch_stats', {})  # {} for a model without BatchNorm.
  finite = all_finite(loss, grads, new_batch_stats)
  keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      batch_stats=keep_if_finite(new_batch_stats, state.batch_stats),
      opt_state=keep_if_finite(opt_state, state.opt_state))
  averaged = metrics_lib.TrainMetrics.single_from_model_output(
      loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      nonfinite=1.0 - finite.astype(jnp.float32))
  per_site = {}
  if binarization.sites:
    stats = new_vars['binary_stats']
    per_site['frozen_fraction'] = jnp.stack(
        [functools.reduce(operator.getitem, path, stats)['frozen_fraction']
         for path in binarization.sites])
  if diagnostics and binarization.sites:
    per_site.update(site_diagnostics(state.params, new_state.params, grads, sites))
  return new_state, averaged, per_site


def eval_step(state: state_lib.TrainState, batch: dict[str, jax.Array], *, model,
              binarization: bctx.BinarizationConfig, fully_binary: bool) -> metrics_lib.EvalMetrics:
  """Loss and accuracy of one eval batch, padded examples masked out.

  Args:
    state: the train state (BatchNorm uses running statistics).
    batch: {'image': (B, H, W, C), 'label': (B,), 'mask': (B,) 1 for real examples}.
    fully_binary: every mask = 1 (the deployed network); else the masks of the current step.
  """
  ctx = bctx.BinarizationContext(step=state.step, key=state.mask_key, config=binarization,
                                 fully_binary=fully_binary)
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['image'], train=False, ctx=ctx)
  return metrics_lib.EvalMetrics.single_from_model_output(
      loss=cross_entropy(logits, batch['label']),
      accuracy=(jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32),
      mask=batch['mask'].astype(bool))


def evaluate(state: state_lib.TrainState, eval_fns: dict[str, Any],
             eval_batches: Any) -> dict[str, float]:
  """Runs every compiled eval step over the batches `eval_batches()` yields.

  Args:
    state: the train state.
    eval_fns: {name: (state, batch with mask) -> metrics} (`eval_step`s, jitted).
    eval_batches: () -> an iterable of global eval batches.

  Returns:
    {'{name}_loss', '{name}_accuracy'} for every name, over all batches.
  """
  totals = {name: None for name in eval_fns}
  for batch in eval_batches():
    for name, fn in eval_fns.items():
      m = fn(state, batch)
      totals[name] = m if totals[name] is None else totals[name].merge(m)
  results = {}
  for name, total in totals.items():
    for key, value in total.compute().items():
      results[f'{name}_{key}'] = float(value)
  return results
