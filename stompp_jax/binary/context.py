"""What a binary layer needs to know at call time, and the one function that makes its masks.

`BinarizationConfig` is static (hashable; part of the jit cache key): method, schedule and the
ordered table of binarized sites. `BinarizationContext` adds the traced parts: the step, the
mask key and, inside a train step, the kernel masks of the step. Layers (forward pass) and the
optimizer (frozen-update masking) both get their masks from `site_frozen_mask`, so the two can
never disagree; `with_kernel_masks` computes each kernel mask once per step for both.

Compute dtype (bfloat16 models): a kernel is binarized as the optimizer holds it (the float32
latent weight, so its sign, its clip and its gradient window |w| <= 1 are those of the latent
value), and the result is then cast to the compute dtype (`binarize_site_kernel`; +-1 and the
clipped values in [-1, 1] round the same either way); an input is binarized in the dtype it
arrives in. The zoo's layers and `layers.ByRules` follow this one rule.

Cost, three static switches (config fields `binary.masks_by`, `binary.residuals` and
`binary.committed_backward`) that change how masks and gradients are made and kept, never what
they are. Each config field also takes 'auto', the choice of `PLATFORM_CHOICES` for the
platform of the run's devices (`for_platform`): measured on CPU (docs/performance.md) and with
the TPU compiler (docs/preflight.md); GPUs get the TPU's choices, unmeasured.
- `masks_by`: 'cond': a site whose fraction p is 0 or 1 (not started, or fully frozen; in a
  layerwise schedule all sites but one or two) hashes nothing: a per-site `jax.lax.cond` on
  0 < p < 1 picks a constant mask instead. 'select': every site hashes its scores and compares
  them with p, no branch (XLA fuses the hash into the mask's consumers). The same masks bit for
  bit: scores lie in [0, 1), so score < p is all False at p = 0 and all True at p = 1. The
  scalar part of every site's scores (key and stream words, masks.stream_words) is computed
  once per step for all sites (`with_kernel_masks`), so a site's mask costs only its
  per-element loop. 'auto': cond on CPU (less hashing); select elsewhere (on TPU a branch's
  mask is a buffer in HBM: ResNet-50 on v4 needs 1.045x fp's HBM with select, 1.080x with cond).
- `residuals`: 'packed' keeps the step's kernel masks (from the forward pass to the optimizer)
  and the binarizers' residuals bit-packed, eight to a byte (binarize.py on why packing also
  keeps XLA:CPU from holding float copies); 'bool' keeps one bool each. 'auto': packed on CPU;
  bool elsewhere (compiled for a TPU, the packing's extra passes cost more HBM traffic than the
  smaller residuals save).
- `committed_backward`: 'skip': a StoMPP site at p = 1 (every entry frozen: its binarizers pass
  no gradient) skips its convolution's weight and, in a BNN, input gradient
  (binary/committed.py; the other sites' gradients then come from that module's convolutions,
  equal up to float32 summation order); 'full' computes them as XLA does. 'auto': skip on CPU,
  where it was measured; full elsewhere.
"""

import dataclasses
import functools
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stompp_jax.binary import binarize
from stompp_jax.binary import masks
from stompp_jax.binary import schedule
from stompp_jax.choices import check_at_least
from stompp_jax.choices import check_choice
from stompp_jax.errors import SetupError

METHODS = ('fp', 'ste', 'stompp', 'stompp_ste')
PROGRESSIVE_METHODS = ('stompp', 'stompp_ste')  # The methods that freeze sites on a schedule.
# field -> (CPU's choice, every other platform's choice): the field's two values, and what its
# 'auto' picks.
PLATFORM_CHOICES = {'masks_by': ('cond', 'select'), 'residuals': ('packed', 'bool'),
                    'committed_backward': ('skip', 'full')}
MASKS_BY = PLATFORM_CHOICES['masks_by']


def for_platform(field: str, value: str, platform: str) -> str:
  """The value of the config's `binary.<field>` (one of PLATFORM_CHOICES, or 'auto') for a run
  whose devices are of `platform` ('cpu', 'gpu', 'tpu'): 'auto' is the platform's choice."""
  check_choice(f'binary.{field}', value, ('auto', *PLATFORM_CHOICES[field]))
  if value != 'auto':
    return value
  cpu, other = PLATFORM_CHOICES[field]
  return cpu if platform == 'cpu' else other


@dataclasses.dataclass(frozen=True)
class BinaryRules:
  """Regex rules on '/'-joined module paths that choose the binary layers.

  A layer is binary iff its path matches some `include` pattern (re.search) and no `exclude`
  pattern.
  """

  include: tuple[str, ...] = ('.*',)
  exclude: tuple[str, ...] = ()

  def __post_init__(self):
    for pattern in self.include + self.exclude:
      try:
        re.compile(pattern)
      except re.error as e:
        raise SetupError(f'Binary-layer rule {pattern!r} is not a valid regex ({e}): fix model.binary_include/exclude.') from None

  def is_binary(self, path: str) -> bool:
    return (any(re.search(p, path) for p in self.include)
            and not any(re.search(p, path) for p in self.exclude))


@dataclasses.dataclass(frozen=True)
class BinarizationConfig:
  """Static binarization settings of one model and run.

  Attributes:
    method: one of METHODS.
    schedule: the freezing schedule (used by stompp and stompp_ste).
    sites: module paths (tuples of names, as Flax's `module.path`) of the binary layers in
      forward order; index = site number (sites.py reads them from the model's trace).
    frozen_grad: surrogate on frozen entries for stompp_ste ('ste_clipped' | 'ste_identity').
    refresh_every: soft-refresh period r; 0 = never.
    per_example_activation_masks: input masks cover the batch dim too (else shared).
    masks_by: 'cond' (per-site `jax.lax.cond`: sites at p = 0 or 1 hash nothing) or 'select'
      (every site hashes, no branch); the same masks either way (module docstring).
    residuals: 'packed' or 'bool': how the step keeps its kernel masks and the binarizers'
      residuals (module docstring).
    committed_backward: 'skip' or 'full': whether a committed StoMPP site's convolution
      gradients are skipped (module docstring).
  """

  method: str
  schedule: schedule.ScheduleConfig
  sites: tuple[tuple[str, ...], ...] = ()
  frozen_grad: str = 'ste_clipped'
  refresh_every: int = 100
  per_example_activation_masks: bool = False
  masks_by: str = 'cond'
  residuals: str = 'packed'
  committed_backward: str = 'skip'

  def __post_init__(self):
    check_choice('binary.method', self.method, METHODS)
    for field, choices in PLATFORM_CHOICES.items():
      check_choice(f'binary.{field}', getattr(self, field), choices)
    check_choice('binary.frozen_grad', self.frozen_grad, binarize.FROZEN_GRADS[1:])
    check_at_least('binary.refresh_every', self.refresh_every, 0)

  @property
  def num_sites(self) -> int:
    return len(self.sites)

  @functools.cached_property
  def _site_of_path(self) -> dict[tuple[str, ...], int]:
    return {path: site for site, path in enumerate(self.sites)}

  def site_index(self, module_path: Sequence[str]) -> Optional[int]:
    """The site number of the layer at `module_path` (Flax's `module.path`), None when that
    layer is not binary: the one answer to "is this layer binary?" at call time."""
    if self.method == 'fp':
      return None
    return self._site_of_path.get(tuple(module_path))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BinarizationContext:
  """Call-time argument of binary layers.

  Attributes:
    step: int32 scalar, the training step (traced).
    key: PRNG key from which every mask key derives (traced).
    config: static settings.
    fully_binary: static; True makes every mask 1 (the deployed network, used for eval).
    kernel_masks: None, or each site's kernel mask of this step (tuple, site order; kept from
      the forward pass to the optimizer), bool or, with `config.residuals` 'packed',
      `binarize.pack_bits` of it (uint8, an eighth of the memory); made by `with_kernel_masks`;
      `site_frozen_mask` reads them instead of hashing again.
    mask_words: None, or uint32 (sites, 2, 7): every site's kernel and input stream words of
      this step (masks.stream_words), made by `with_kernel_masks`; else made where needed.
  """

  step: jax.Array
  key: jax.Array
  config: BinarizationConfig = dataclasses.field(metadata=dict(static=True))
  fully_binary: bool = dataclasses.field(default=False, metadata=dict(static=True))
  kernel_masks: Optional[tuple[jax.Array, ...]] = None
  mask_words: Optional[jax.Array] = None


def site_fraction(ctx: BinarizationContext, site: int) -> jax.Array:
  """Scheduled frozen fraction of `site` at the context's step (float32 scalar)."""
  if ctx.fully_binary or ctx.config.method == 'ste':
    return jnp.ones((), jnp.float32)
  return schedule.frozen_fraction(ctx.step, site, ctx.config.num_sites, ctx.config.schedule)


def _mask_words(ctx: BinarizationContext) -> jax.Array:
  """uint32 (sites, 2, 7): the stream words of every site's kernel and input at the step."""
  if ctx.mask_words is not None:
    return ctx.mask_words
  return masks.stream_words(masks.all_site_keys(ctx.key, ctx.config.num_sites), ctx.step,
                            ctx.config.refresh_every)


def _frozen_mask(ctx: BinarizationContext, site: int, tensor: str, shape: tuple[int, ...],
                 packed: bool) -> jax.Array:
  """The mask of `tensor` of `site` at the step (bool of `shape`, or `binarize.pack_bits` of it
  when `packed`), hashed under `ctx.config.masks_by`."""
  if tensor not in masks.TENSORS:
    raise ValueError(f'Unknown tensor {tensor!r}: use one of {", ".join(masks.TENSORS)}.')
  fraction = site_fraction(ctx, site)  # Raises ValueError for a site outside the table.
  # This site's words, sliced out here: the hashing below is then the same computation for
  # every site of the same shape, which XLA compiles once and reuses.
  words = _mask_words(ctx)[site, masks.TENSORS.index(tensor)]
  finish = binarize.pack_bits if packed else (lambda mask: mask)
  hashed = lambda: finish(masks.frozen_mask_from_words(words, fraction, shape,
                                                       ctx.config.refresh_every))
  if ctx.config.masks_by == 'select':
    return hashed()
  if packed:  # Padding bits differ from pack_bits' zeros; unpack_bits drops them.
    constant = lambda: jnp.full(binarize.packed_shape(shape),
                                jnp.where(fraction >= 1, np.uint8(255), np.uint8(0)))
  else:
    constant = lambda: jnp.full(shape, fraction >= 1)
  return jax.lax.cond((fraction > 0) & (fraction < 1), hashed, constant)


def site_committed(ctx: BinarizationContext, site: int) -> Optional[jax.Array]:
  """bool scalar (traced): every entry of `site` frozen at the step, so its binarizers pass no
  gradient; None where no gradient may be skipped (not StoMPP, fully binary, or
  committed_backward 'full'). binary/committed.py skips on it."""
  if (ctx.fully_binary or ctx.config.method != 'stompp'
      or ctx.config.committed_backward != 'skip'):
    return None
  return site_fraction(ctx, site) >= 1


def site_frozen_mask(ctx: BinarizationContext, site: int, tensor: str,
                     shape: tuple[int, ...]) -> jax.Array:
  """Boolean frozen mask of `tensor` ('kernel' | 'input') of `site`, of `shape`."""
  if ctx.fully_binary or ctx.config.method == 'ste':
    return jnp.ones(shape, bool)
  if tensor == 'kernel' and ctx.kernel_masks is not None:
    kept = ctx.kernel_masks[site]
    packed = ctx.config.residuals == 'packed'
    if kept.shape != (binarize.packed_shape(shape) if packed else tuple(shape)):
      raise ValueError(f'The kept kernel mask of site {site} has shape {kept.shape}, not'
                       f' that of a {ctx.config.residuals} mask of shape {tuple(shape)}.')
    return binarize.unpack_bits(kept, tuple(shape)) if packed else kept
  return _frozen_mask(ctx, site, tensor, tuple(shape), packed=False)


def with_kernel_masks(ctx: BinarizationContext,
                      kernel_shapes: Sequence[tuple[int, ...]]) -> BinarizationContext:
  """`ctx` holding every site's kernel mask of its step, computed once here, and every site's
  stream words (`mask_words`, for the input masks of the forward pass).

  Args:
    ctx: the step's context (without kernel masks).
    kernel_shapes: the kernel shape of each site, in site order.

  Returns:
    The same context with `kernel_masks` and `mask_words` set (unchanged for fp, ste and fully
    binary, whose masks are constants).
  """
  if ctx.fully_binary or ctx.config.method in ('fp', 'ste'):
    return ctx
  if len(kernel_shapes) != ctx.config.num_sites:
    raise ValueError(f'{len(kernel_shapes)} kernel shapes for {ctx.config.num_sites} sites.')
  ctx = dataclasses.replace(ctx, mask_words=_mask_words(ctx))
  packed = ctx.config.residuals == 'packed'
  kernel_masks = tuple(_frozen_mask(ctx, site, 'kernel', tuple(shape), packed)
                       for site, shape in enumerate(kernel_shapes))
  return dataclasses.replace(ctx, kernel_masks=kernel_masks)


def binarize_site_tensor(x: jax.Array, ctx: BinarizationContext, site: int,
                         tensor: str) -> jax.Array:
  """Applies the configured method to a kernel or an input (batch-first) of a binary site.

  Args:
    x: the latent kernel (any shape) or the layer input (batch, ...).
    ctx: the call-time context.
    site: the site index.
    tensor: 'kernel' or 'input'.

  Returns:
    Same shape and dtype as `x`.
  """
  method = ctx.config.method
  if method == 'fp':
    return x
  if method == 'ste' and not ctx.fully_binary:
    return binarize.ste_sign(x, grad='identity' if tensor == 'kernel' else 'clipped',
                             residual=ctx.config.residuals)
  shape = x.shape
  if tensor == 'input' and not ctx.config.per_example_activation_masks:
    shape = x.shape[1:]
  frozen = site_frozen_mask(ctx, site, tensor, shape)
  frozen_grad = ctx.config.frozen_grad if method == 'stompp_ste' else 'none'
  return binarize.masked_sign(x, frozen, frozen_grad=frozen_grad,
                             residual=ctx.config.residuals)


def binarize_site_kernel(kernel: jax.Array, ctx: BinarizationContext, site: int,
                         dtype: Any) -> jax.Array:
  """The kernel of `site` as a layer computes with it: the latent kernel (float32) binarized,
  then cast to the compute `dtype` (the module docstring's rule for bfloat16)."""
  return binarize_site_tensor(kernel, ctx, site, 'kernel').astype(dtype)
