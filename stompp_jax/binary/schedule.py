"""Frozen fraction p(site, step) of the progressive freezing schedule (docs/method.md,
"Schedule").

Sites are numbered 0..L-1 from input to output. Training steps t run 0..T-1. The progression
occupies the span [span_start, span_end] (fractions of T); after it every site is fully
frozen (p = 1), before it none is (p = 0). With window_steps = W > 0 the span instead starts at
span_start and lasts W (L + overlap) / (1 + overlap) steps, so every layerwise window is W
steps long whatever the depth (span_end is then unused); the span must fit in the run.

Window edges are computed in steps (float64, static); a window is over, p = 1 exactly, from
the first integer step at or after its end, so no float rounding leaves a site at p < 1.

  layerwise: site i freezes inside its own window, windows in input-to-output order.
  reverse:   the same windows in output-to-input order (ablation).
  global:    every site follows one p over the whole span (ablation).

Inside a window, p = shape(x) for the window-local progress x in [0, 1].
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from stompp_jax.choices import check_choice
from stompp_jax.errors import SetupError

ORDERS = ('layerwise', 'global', 'reverse')
SHAPES = ('linear', 'quadratic', 'cubic', 'cosine', 'flipped_quadratic')
_EPS = 1e-6  # Steps: window edges within this of an integer step are that step.


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Static (hashable) description of a freezing schedule.

  Attributes:
    total_steps: T, the number of training steps.
    order: one of ORDERS.
    shape: one of SHAPES; the p(x) curve inside a window.
    span_start: fraction of T where the progression starts, in [0, 1].
    span_end: fraction of T where it ends (every site frozen), in [span_start, 1].
    window_overlap: in [0, 1); consecutive layerwise windows overlap by this fraction of a
      window [ours].
    window_steps: steps per layerwise window (> 0), or 0 to derive windows from the span.
  """

  total_steps: int
  order: str = 'layerwise'
  shape: str = 'cubic'
  span_start: float = 0.0
  span_end: float = 0.8
  window_overlap: float = 0.0
  window_steps: int = 0

  def __post_init__(self):
    check_choice('binary.order', self.order, ORDERS)
    check_choice('binary.shape', self.shape, SHAPES)
    if self.total_steps < 1:
      raise SetupError(f'total_steps must be >= 1, got {self.total_steps}: train for at least one step.')
    if not 0.0 <= self.span_start <= self.span_end <= 1.0:
      raise SetupError(
          f'Schedule span [{self.span_start}, {self.span_end}] is not inside [0, 1] with start <= end:'
          ' set binary.span_start and binary.span_end to fractions of training.')
    if not 0.0 <= self.window_overlap < 1.0:
      raise SetupError(f'binary.window_overlap={self.window_overlap} is not in [0, 1): set it to'
                       ' the fraction of a layerwise window that neighbours overlap (0 = none).')
    if self.window_steps < 0:
      raise SetupError(f'binary.window_steps={self.window_steps} is negative: set it to the steps'
                       ' per layerwise window, or 0 to derive the windows from the span.')


def apply_shape(shape: str, x: jax.Array) -> jax.Array:
  """Maps progress x in [0, 1] to a frozen fraction in [0, 1]; shape(0)=0, shape(1)=1.

  `shape`: one of SHAPES (ScheduleConfig checks binary.shape).
  """
  if shape == 'linear':
    return x
  if shape == 'quadratic':
    return x * x
  if shape == 'cubic':
    return x * x * x
  if shape == 'cosine':
    return 0.5 * (1.0 - jnp.cos(jnp.pi * x))
  return 1.0 - (1.0 - x) * (1.0 - x)  # flipped_quadratic


def span_steps(cfg: ScheduleConfig, num_sites: int) -> tuple[float, float]:
  """(first, last) step of the progression of `num_sites` sites (float64, static).

  Raises SetupError when window_steps > 0 makes the span end after the run.
  """
  first = cfg.span_start * cfg.total_steps
  if not cfg.window_steps:
    return first, cfg.span_end * cfg.total_steps
  last = first + cfg.window_steps * (num_sites + cfg.window_overlap) / (1.0 + cfg.window_overlap)
  if math.ceil(last - _EPS) > cfg.total_steps:
    raise SetupError(
        f'binary.window_steps={cfg.window_steps} for {num_sites} sites ends the freezing at step'
        f' {math.ceil(last - _EPS)}, after the run ({cfg.total_steps} steps): lower'
        ' binary.window_steps or binary.span_start, or train longer.')
  return first, last


def window_steps_of(site: int, num_sites: int, cfg: ScheduleConfig) -> tuple[float, float]:
  """(first, last) step of the window of `site` (float64, static); global: the whole span."""
  if not 0 <= site < num_sites:
    raise ValueError(f'site {site} is outside [0, {num_sites}).')
  first, last = span_steps(cfg, num_sites)
  if cfg.order == 'global':
    return first, last
  position = site if cfg.order == 'layerwise' else num_sites - 1 - site
  # Windows of length w start every s, with s * (L - 1) + w = span and w = s * (1 + overlap).
  stride = (last - first) / (num_sites + cfg.window_overlap)
  return first + position * stride, first + position * stride + stride * (1.0 + cfg.window_overlap)


def frozen_fraction(step: jax.Array, site: int, num_sites: int, cfg: ScheduleConfig) -> jax.Array:
  """Fraction p of the site's entries that are frozen at `step`.

  Args:
    step: int scalar (may be traced), the training step, 0-based.
    site: static int in [0, num_sites), 0 = closest to the input.
    num_sites: static int L, the number of binarized sites of the model.
    cfg: the schedule.

  Returns:
    float32 scalar in [0, 1]; exactly 0 before the window, exactly 1 from the first integer
    step at or after its end.
  """
  first, last = window_steps_of(site, num_sites, cfg)
  step = jnp.asarray(step)
  over = step >= math.ceil(last - _EPS)
  if last - first <= _EPS:
    return over.astype(jnp.float32)
  local = jnp.clip((step.astype(jnp.float32) - first) / (last - first), 0.0, 1.0)
  return jnp.where(over, jnp.float32(1.0), apply_shape(cfg.shape, local)).astype(jnp.float32)
