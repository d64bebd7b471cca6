"""The optimizer and learning-rate schedule of a run, from `config.optim` and the method.

The method decides the binary-kernel transforms, not the user: STE-free StoMPP zeroes updates
of frozen kernel entries, the STE baseline clips latent kernels to [-1, 1] (both overridable by
`binary.mask_frozen_updates` / `binary.clip_latent`, docs/method.md [ours]).
"""

import optax

from stompp_jax.binary import optim as binary_optim
from stompp_jax.binary import site_tree
from stompp_jax.choices import check_choice
from stompp_jax.choices import check_number

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine', 'warmup_constant')


def check_optim_config(optim_cfg) -> None:
  """Checks `config.optim`'s names and ranges (one-line SetupErrors)."""
  check_choice('optim.name', optim_cfg.name, OPTIMIZERS)
  check_choice('optim.schedule', optim_cfg.schedule, SCHEDULES)
  check_number('optim.learning_rate', optim_cfg.learning_rate, 0, above_low=True)
  for field in ('momentum', 'b1', 'b2'):
    check_number(f'optim.{field}', optim_cfg[field], 0, 1, below_high=True)
  for field in ('warmup_epochs', 'weight_decay', 'grad_clip_norm'):
    check_number(f'optim.{field}', optim_cfg[field], 0, hint=' (0 = off)')


def learning_rate_schedule(optim_cfg, *, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Learning rate as a function of the step; `optim_cfg` as `check_optim_config` accepts it."""
  peak = optim_cfg.learning_rate
  warmup = int(optim_cfg.warmup_epochs * steps_per_epoch) if optim_cfg.schedule.startswith('warmup') else 0
  warmup = min(warmup, total_steps - 1)
  if optim_cfg.schedule == 'constant':
    return optax.constant_schedule(peak)
  if optim_cfg.schedule == 'cosine':
    return optax.cosine_decay_schedule(peak, total_steps)
  if optim_cfg.schedule == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), total_steps)
  return optax.join_schedules(  # warmup_constant
      [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])


def method_transforms(binary_cfg) -> tuple[bool, bool]:
  """(mask_frozen_updates, clip_latent) for the method, after the user's overrides."""
  mask = binary_cfg.mask_frozen_updates
  clip = binary_cfg.clip_latent
  return (binary_cfg.method == 'stompp' if mask is None else mask,
          binary_cfg.method == 'ste' if clip is None else clip)


def create_optimizer(optim_cfg, binary_cfg, *, lr_schedule: optax.Schedule,
                     sites, kernel_mask) -> optax.GradientTransformationExtraArgs:
  """Builds the optimizer.

  Args:
    optim_cfg: `config.optim`, as `check_optim_config` accepts it.
    binary_cfg: `config.binary` (method and its transform overrides).
    lr_schedule: from `learning_rate_schedule`.
    sites: the site tree of the params (binary/site_tree.py: site index at each binary kernel).
    kernel_mask: pytree of bools like params, True on every conv/dense kernel (weight decay).

  Returns:
    A transformation whose `update` takes `binarization_context=` when frozen updates are
    masked.
  """
  parts = []
  if optim_cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  if optim_cfg.name == 'adamw':
    parts.append(optax.adamw(lr_schedule, b1=optim_cfg.b1, b2=optim_cfg.b2,
                             weight_decay=optim_cfg.weight_decay, mask=kernel_mask))
  else:
    if optim_cfg.weight_decay:
      parts.append(optax.add_decayed_weights(optim_cfg.weight_decay, mask=kernel_mask))
    if optim_cfg.name == 'sgd':
      parts.append(optax.sgd(lr_schedule, momentum=optim_cfg.momentum or None,
                             nesterov=optim_cfg.nesterov))
    else:
      parts.append(optax.adam(lr_schedule, b1=optim_cfg.b1, b2=optim_cfg.b2))
  mask_frozen, clip_latent = method_transforms(binary_cfg)
  has_sites = site_tree.num_sites(sites) > 0
  if mask_frozen and has_sites:
    parts.append(binary_optim.zero_frozen_updates(sites))
  if clip_latent and has_sites:
    parts.append(binary_optim.clip_latent_kernels(sites))
  return optax.chain(*parts)
