"""Freezing schedule against docs/method.md ("Schedule").

Layerwise: the span [start, end] of training is split into L equal windows, site i's p goes
0 -> 1 along the shape inside window i, is 0 before it and 1 after. Reverse: the same windows from
output to input. Global: every site follows shape(progress through the whole span).

The cases use T = 1000 steps, L = 4 sites and the default span [0, 0.8], so the windows are the
integer steps [0, 200], [200, 400], [400, 600], [600, 800]. Expected values use the shapes written
out below; float32 arithmetic of step / T is exact to ~1e-7, hence ATOL.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stompp_jax.binary import schedule

ATOL = 1e-6
T, L = 1000, 4

SHAPE_FORMULAS = {
    'linear': lambda x: x,
    'quadratic': lambda x: x ** 2,
    'cubic': lambda x: x ** 3,
    'cosine': lambda x: 0.5 * (1 - math.cos(math.pi * x)),
    'flipped_quadratic': lambda x: 1 - (1 - x) ** 2,
}
# p at the middle of a window, by hand: 1/2, 1/4, 1/8, (1 - cos(pi/2)) / 2, 1 - 1/4.
SHAPE_AT_HALF = {'linear': 0.5, 'quadratic': 0.25, 'cubic': 0.125, 'cosine': 0.5,
                 'flipped_quadratic': 0.75}


def _p(step, site, cfg, num_sites=L):
  return float(schedule.frozen_fraction(jnp.asarray(step, jnp.int32), site, num_sites, cfg))


def _window(site, order):
  """(first, last) step of the site's window for T=1000, L=4, span [0, 0.8]."""
  if order == 'global':
    return 0, 800
  position = site if order == 'layerwise' else L - 1 - site
  return 200 * position, 200 * (position + 1)


def test_the_shapes_at_half_are_the_hand_values():
  for shape, value in SHAPE_AT_HALF.items():
    assert SHAPE_FORMULAS[shape](0.5) == pytest.approx(value)
    np.testing.assert_allclose(schedule.apply_shape(shape, jnp.float32(0.5)), value, atol=ATOL)


@pytest.mark.parametrize('shape', schedule.SHAPES)
def test_shape_curves(shape):
  x = np.linspace(0, 1, 21)
  np.testing.assert_allclose(schedule.apply_shape(shape, jnp.asarray(x, jnp.float32)),
                             [SHAPE_FORMULAS[shape](v) for v in x], atol=ATOL)


@pytest.mark.parametrize('order', schedule.ORDERS)
@pytest.mark.parametrize('shape', schedule.SHAPES)
def test_values_at_every_window_edge(order, shape):
  cfg = schedule.ScheduleConfig(total_steps=T, order=order, shape=shape)
  for site in range(L):
    first, last = _window(site, order)
    length = last - first
    expected = {first: 0.0, last: 1.0, 800: 1.0, T - 1: 1.0,
                first + length // 4: SHAPE_FORMULAS[shape](0.25),
                first + length // 2: SHAPE_AT_HALF[shape],
                first + 3 * length // 4: SHAPE_FORMULAS[shape](0.75)}
    if first > 0:
      expected[0] = 0.0
      expected[first - 1] = 0.0  # exactly 0 one step before the window
    expected[last + 1] = 1.0     # exactly 1 one step after it
    for step, p in expected.items():
      got = _p(step, site, cfg)
      if p in (0.0, 1.0) and step not in (first, last):
        assert got == p, (site, step, got)
      else:
        assert got == pytest.approx(p, abs=ATOL), (site, step, got)


@pytest.mark.parametrize('shape', schedule.SHAPES)
def test_layerwise_one_site_at_a_time_input_first(shape):
  cfg = schedule.ScheduleConfig(total_steps=T, shape=shape)
  for step in range(0, T, 7):
    p = [_p(step, site, cfg) for site in range(L)]
    partial = [i for i in range(L) if 0 < p[i] < 1]
    assert len(partial) <= 1, (step, p)
    assert p == sorted(p, reverse=True), (step, p)  # earlier sites are at least as frozen


def test_reverse_freezes_output_first():
  cfg = schedule.ScheduleConfig(total_steps=T, order='reverse', shape='linear')
  assert [_p(100, site, cfg) for site in range(L)] == pytest.approx([0, 0, 0, 0.5], abs=ATOL)
  assert [_p(500, site, cfg) for site in range(L)] == pytest.approx([0, 0.5, 1, 1], abs=ATOL)


def test_global_all_sites_follow_one_curve():
  cfg = schedule.ScheduleConfig(total_steps=T, order='global', shape='quadratic')
  for step, x in [(0, 0.0), (200, 0.25), (400, 0.5), (600, 0.75), (800, 1.0), (900, 1.0)]:
    assert [_p(step, site, cfg) for site in range(L)] == pytest.approx([x * x] * L, abs=ATOL)


@pytest.mark.parametrize('order', schedule.ORDERS)
@pytest.mark.parametrize('shape', schedule.SHAPES)
def test_monotone_in_step(order, shape):
  cfg = schedule.ScheduleConfig(total_steps=T, order=order, shape=shape)
  steps = jnp.arange(T)
  for site in range(L):
    p = np.asarray(jax.vmap(lambda t: schedule.frozen_fraction(t, site, L, cfg))(steps))
    assert p[0] == 0 and p[-1] == 1
    assert np.all(np.diff(p) >= 0), site


def test_span_start_shifts_the_windows():
  # span [0.1, 0.9] of T=1000: windows [100, 300], [300, 500], [500, 700], [700, 900].
  cfg = schedule.ScheduleConfig(total_steps=T, shape='linear', span_start=0.1, span_end=0.9)
  for site in range(L):
    first = 100 + 200 * site
    assert _p(first - 1, site, cfg) == 0.0
    assert _p(first, site, cfg) == pytest.approx(0.0, abs=ATOL)
    assert _p(first + 50, site, cfg) == pytest.approx(0.25, abs=ATOL)
    assert _p(first + 200, site, cfg) == pytest.approx(1.0, abs=ATOL)
    assert _p(first + 201, site, cfg) == 1.0
  # Before the span nothing is frozen, also for the global order.
  glob = schedule.ScheduleConfig(total_steps=T, order='global', span_start=0.1, span_end=0.9)
  assert _p(50, 0, glob) == 0.0 and _p(950, 3, glob) == 1.0


def test_window_overlap():
  # L=3, overlap 0.5: stride s = 1/(L + 0.5), window w = 1.5 s, so with T=700 and span [0, 1]
  # the windows are [0, 300], [200, 500], [400, 700].
  cfg = schedule.ScheduleConfig(total_steps=700, shape='linear', span_end=1.0, window_overlap=0.5)
  for site in range(3):
    first = 200 * site
    if first:
      assert _p(first - 1, site, cfg, 3) == 0.0
    assert _p(first, site, cfg, 3) == pytest.approx(0.0, abs=ATOL)
    assert _p(first + 150, site, cfg, 3) == pytest.approx(0.5, abs=ATOL)
    assert _p(first + 300, site, cfg, 3) == pytest.approx(1.0, abs=ATOL)
  assert _p(699, 2, cfg, 3) == pytest.approx(299 / 300, abs=ATOL)
  # In an overlap two sites progress at once.
  assert 0 < _p(250, 0, cfg, 3) < 1 and 0 < _p(250, 1, cfg, 3) < 1


def test_empty_span_is_a_step_function():
  cfg = schedule.ScheduleConfig(total_steps=T, shape='linear', span_start=0.5, span_end=0.5)
  for site in range(L):
    assert _p(499, site, cfg) == 0.0
    assert _p(500, site, cfg) == 1.0


def test_single_site_uses_the_whole_span():
  cfg = schedule.ScheduleConfig(total_steps=T, shape='cubic')
  assert _p(400, 0, cfg, num_sites=1) == pytest.approx(0.125, abs=ATOL)


def test_traced_step_under_jit_matches_eager():
  cfg = schedule.ScheduleConfig(total_steps=T, shape='cosine')
  jitted = jax.jit(lambda t: schedule.frozen_fraction(t, 2, L, cfg))
  for step in (0, 399, 400, 450, 500, 600, 999):
    # XLA may fuse and round differently from eager dispatch: equal to float32 accuracy.
    assert float(jitted(step)) == pytest.approx(_p(step, 2, cfg), abs=ATOL)
    assert jitted(step).dtype == jnp.float32


@pytest.mark.parametrize('kwargs, match', [
    (dict(order='forward'), 'layerwise'),
    (dict(shape='exp'), 'cubic'),
    (dict(total_steps=0), 'total_steps'),
    (dict(span_start=0.5, span_end=0.4), 'span'),
    (dict(span_end=1.2), 'span'),
    (dict(window_overlap=1.0), 'window_overlap'),
])
def test_invalid_configs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedule.ScheduleConfig(**{'total_steps': T, **kwargs})


def test_site_out_of_range_raises():
  with pytest.raises(ValueError, match='site 4'):
    _p(0, 4, schedule.ScheduleConfig(total_steps=T))


@pytest.mark.parametrize('num_sites', [18, 54, 7, 3])
@pytest.mark.parametrize('order', schedule.ORDERS)
def test_every_site_is_exactly_frozen_after_the_span(num_sites, order):
  # Before the fix, 54 sites left the last one at p = 0.9999982 for ever (float rounding of
  # the span's end); the end of a window is now decided in integer steps.
  for total in (100, 300, 1000):
    cfg = schedule.ScheduleConfig(total_steps=total, order=order)
    end = math.ceil(0.8 * total)
    for site in range(num_sites):
      assert _p(end, site, cfg, num_sites) == 1.0, (total, site)
      assert _p(total - 1, site, cfg, num_sites) == 1.0, (total, site)


def test_window_steps_fix_the_steps_per_site_whatever_the_depth():
  # W = 20 steps per site after a warm-up of 0.1 x 1000 steps: site i freezes in
  # [100 + 20 i, 120 + 20 i], for 4 sites and for 30.
  for num_sites in (4, 30):
    cfg = schedule.ScheduleConfig(total_steps=1000, shape='linear', span_start=0.1,
                                  window_steps=20)
    assert schedule.span_steps(cfg, num_sites) == (100, 100 + 20 * num_sites)
    for site in (0, num_sites - 1):
      first = 100 + 20 * site
      assert _p(first - 1, site, cfg, num_sites) == 0.0
      assert _p(first + 10, site, cfg, num_sites) == pytest.approx(0.5, abs=ATOL)
      assert _p(first + 20, site, cfg, num_sites) == 1.0
  # Reverse and global use the same span; an overlap keeps W steps per window.
  rev = schedule.ScheduleConfig(total_steps=1000, order='reverse', shape='linear', window_steps=20)
  assert _p(10, 3, rev) == pytest.approx(0.5, abs=ATOL) and _p(10, 2, rev) == 0.0
  glob = schedule.ScheduleConfig(total_steps=1000, order='global', shape='linear', window_steps=20)
  assert _p(40, 0, glob) == pytest.approx(0.5, abs=ATOL) and _p(80, 3, glob) == 1.0
  over = schedule.ScheduleConfig(total_steps=1000, shape='linear', window_steps=30,
                                 window_overlap=0.5)
  assert schedule.window_steps_of(1, L, over) == (20, 50)


def test_window_steps_that_do_not_fit_the_run_are_refused():
  cfg = schedule.ScheduleConfig(total_steps=100, window_steps=30, span_start=0.1)
  with pytest.raises(ValueError, match='window_steps=30 for 4 sites ends the freezing at step 130'):
    _p(0, 0, cfg)
  with pytest.raises(ValueError, match='window_steps'):
    schedule.ScheduleConfig(total_steps=100, window_steps=-1)
