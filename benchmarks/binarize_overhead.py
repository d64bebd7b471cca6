"""Overhead of the binarization scaffold on a CIFAR ResNet-20-sized BNN train step (CPU).

    python benchmarks/binarize_overhead.py [--batch 128] [--reps 15] [--steps 1] [--pieces]

One jitted train step (forward + backward + SGD-momentum update; the compile is timed apart) of a
ResNet-20 stack: a full-precision 3x3 stem, 3 stages x 3 blocks x 2 binary 3x3 convs with
16/32/64 channels at 32x32/16x16/8x8, BatchNorm after every conv, identity shortcuts,
full-precision 1x1 stride-2 downsampling shortcuts and a full-precision dense head (docs/method.md,
"What is binarized"). Every binary conv binarizes its input (BNN) and has no ReLU; the fp method
runs the same network with a ReLU after each BatchNorm, as a full-precision ResNet would.

Methods: fp | ste (sign + STE, latent clip after each step) | stompp (masked sign, STE-free,
frozen updates zeroed) | stompp_ste (masked sign + clipped STE on frozen entries). Masks are
generated inside the step from (key, step), at a step in the middle of the layerwise schedule.

Repetitions interleave the methods (rotating their order) so machine noise hits all alike; the
table reports medians over repetitions, and the ratios are also given as the median of the
per-repetition ratios (paired, more robust on a shared machine).

--pieces additionally times, per train step, the mask generation of all sites alone, the
binarizers alone (forward + backward on all kernels and inputs), and the convs alone.
"""

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from stompp_jax import layers  # noqa: E402
from stompp_jax import sites as sites_lib  # noqa: E402
from stompp_jax.binary import binarize  # noqa: E402
from stompp_jax.binary import context  # noqa: E402
from stompp_jax.binary import optim  # noqa: E402
from stompp_jax.binary import schedule  # noqa: E402
from stompp_jax.models import inspect  # noqa: E402

METHODS = context.METHODS  # fp, ste, stompp, stompp_ste
RULES = context.BinaryRules(exclude=('stem', 'shortcut', 'head'))
TOTAL_STEPS = 1000


class Block(nn.Module):
  features: int
  strides: int
  relu: bool

  @nn.compact
  def __call__(self, x, ctx, train):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    act = nn.relu if self.relu else (lambda v: v)
    y = layers.BinaryConv(features=self.features, strides=(self.strides,) * 2, binarize_input=True,
                          name='conv1')(x, ctx)
    y = act(norm(name='bn1')(y))
    y = layers.BinaryConv(features=self.features, binarize_input=True, name='conv2')(y, ctx)
    y = norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = layers.BinaryConv(features=self.features, kernel_size=(1, 1),
                            strides=(self.strides,) * 2, name='shortcut')(x, ctx)
      x = norm(name='shortcut_bn')(x)
    return act(x + y)


class ResNet20(nn.Module):
  relu: bool = False
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, ctx=None, train=True):
    x = layers.BinaryConv(features=16, name='stem')(x, ctx)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name='stem_bn')(x)
    x = nn.relu(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(3):
        strides = 2 if stage > 0 and block == 0 else 1
        x = Block(features, strides, self.relu, name=f'stage{stage + 1}_block{block}')(x, ctx, train)
    return layers.BinaryDense(features=self.num_classes, name='head')(x.mean(axis=(1, 2)), ctx)


def make_config(method, site_paths, refresh_every=100):
  return context.BinarizationConfig(
      method=method, sites=site_paths, rules=RULES, refresh_every=refresh_every,
      schedule=schedule.ScheduleConfig(total_steps=TOTAL_STEPS))


def make_train_step(method, model, site_paths, kernel_sites):
  """A jitted (params, batch_stats, opt_state, step, key, images, labels) -> new state, loss."""
  parts = [optax.sgd(0.1, momentum=0.9)]
  if method == 'stompp':
    parts.append(optim.zero_frozen_updates(kernel_sites))
  elif method == 'ste':
    parts.append(optim.clip_latent_kernels(kernel_sites))
  tx = optax.chain(*parts)
  config = make_config(method, site_paths)

  def train_step(params, batch_stats, opt_state, step, key, images, labels):
    ctx = context.BinarizationContext(step=step, key=key, config=config)

    def loss_fn(params):
      logits, new_state = model.apply({'params': params, 'batch_stats': batch_stats}, images, ctx,
                                      train=True, mutable=['batch_stats', 'binary_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_state['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    extra = {'binarization_context': ctx} if method == 'stompp' else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), batch_stats, opt_state, step + 1, loss

  return tx, jax.jit(train_step, donate_argnums=(0, 1, 2))


def time_calls(fn, state, n):
  """Runs state = fn(*state)[:-1] n times (the last output is the loss); (s per call, state)."""
  start = time.perf_counter()
  for _ in range(n):
    out = fn(*state)
    state = out[:-1]
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / n, state


def benchmark_methods(args, model_for, site_paths, kernel_sites, images, labels):
  key = jax.random.key(0)
  runners, compile_s = {}, {}
  for method in args.methods:
    model = model_for(method)
    variables = model.init(jax.random.key(1), images[:1])
    tx, step_fn = make_train_step(method, model, site_paths, kernel_sites)
    params, batch_stats = variables['params'], variables['batch_stats']
    opt_state = tx.init(params)
    step = jnp.int32(args.step)
    start = time.perf_counter()
    compiled = step_fn.lower(params, batch_stats, opt_state, step, key, images, labels).compile()
    compile_s[method] = time.perf_counter() - start

    def run(params, batch_stats, opt_state, step, compiled=compiled):
      return compiled(params, batch_stats, opt_state, step, key, images, labels)

    _, state = time_calls(run, (params, batch_stats, opt_state, step), 1)  # warm-up
    runners[method] = [run, state]

  times = {m: [] for m in args.methods}
  for rep in range(args.reps):
    order = args.methods[rep % len(args.methods):] + args.methods[:rep % len(args.methods)]
    for method in order:
      run, state = runners[method]
      seconds, state = time_calls(run, state, args.steps)
      runners[method][1] = state
      times[method].append(seconds * 1e3)
  return times, compile_s


def time_pieces(args, site_list, site_paths, images_batch):
  """ms per train step of: masks of all sites; binarizers fwd+bwd; convs fwd+bwd; all sites."""
  config = make_config('stompp', site_paths)
  rng = np.random.default_rng(0)
  kernels = [jnp.asarray(rng.normal(size=s.kernel_shape), jnp.float32) for s in site_list]
  inputs = [jnp.asarray(rng.normal(size=(images_batch, *s.input_shape)), jnp.float32)
            for s in site_list]
  strides = [2 if s.path.endswith('block0/conv1') and not s.path.startswith('stage1') else 1
             for s in site_list]
  key, step = jax.random.key(0), jnp.int32(args.step)

  @jax.jit
  def masks_only(step, key):
    ctx = context.BinarizationContext(step=step, key=key, config=config)
    return [(context.site_frozen_mask(ctx, i, 'kernel', s.kernel_shape),
             context.site_frozen_mask(ctx, i, 'input', s.input_shape))
            for i, s in enumerate(site_list)]

  def binarizer_loss(kind, kernels, inputs, step, key):
    ctx = context.BinarizationContext(step=step, key=key, config=config)
    total = 0.0
    for i, (k, x) in enumerate(zip(kernels, inputs)):
      if kind == 'ste':
        bk, bx = binarize.ste_sign(k, grad='identity'), binarize.ste_sign(x)
      elif kind == 'stompp_given_masks':
        bk = binarize.masked_sign(k, k > 0.5)
        bx = binarize.masked_sign(x, x[0] > 0.5)
      else:
        bk = context.binarize_site_tensor(k, ctx, i, 'kernel')
        bx = context.binarize_site_tensor(x, ctx, i, 'input')
      total = total + jnp.sum(bk) + jnp.sum(bx)
    return total

  binarizers = {kind: jax.jit(jax.grad(functools.partial(binarizer_loss, kind), argnums=(0, 1)))
                for kind in ('ste', 'stompp_given_masks', 'stompp')}

  @jax.jit
  def convs_only(kernels, inputs):
    def loss(kernels, inputs):
      total = 0.0
      for k, x, s in zip(kernels, inputs, strides):
        y = jax.lax.conv_general_dilated(x, k, (s, s), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        total = total + jnp.sum(y * y)
      return total
    return jax.grad(loss, argnums=(0, 1))(kernels, inputs)

  pieces = {'masks of all sites (kernel + input)': lambda: masks_only(step, key),
            'ste binarizers fwd+bwd': lambda: binarizers['ste'](kernels, inputs, step, key),
            'masked_sign fwd+bwd, masks given': lambda: binarizers['stompp_given_masks'](
                kernels, inputs, step, key),
            'stompp binarizers fwd+bwd incl. masks': lambda: binarizers['stompp'](
                kernels, inputs, step, key),
            'binary convs alone fwd+bwd': lambda: convs_only(kernels, inputs)}
  results = {name: [] for name in pieces}
  for fn in pieces.values():
    jax.block_until_ready(fn())
  for _ in range(args.reps):
    for name, fn in pieces.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        jax.block_until_ready(fn())  # independent calls could overlap on CPU: block each
      results[name].append((time.perf_counter() - start) / args.steps * 1e3)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--reps', type=int, default=15, help='interleaved repetitions')
  parser.add_argument('--steps', type=int, default=1, help='train steps per repetition')
  parser.add_argument('--step', type=int, default=None,
                      help=f'schedule step (of {TOTAL_STEPS}); default: the middle of the middle '
                      'site\'s window, so that site is partly frozen')
  parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
  parser.add_argument('--pieces', action='store_true', help='also time masks/binarizers/convs')
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, args.batch), jnp.int32)
  site_list = sites_lib.discover_sites(inspect.trace_model(ResNet20(), (32, 32, 3)), RULES)
  site_paths = tuple(s.path for s in site_list)
  kernel_sites = sites_lib.kernel_sites(site_list)
  model_for = lambda method: ResNet20(relu=(method == 'fp'))

  sched = schedule.ScheduleConfig(total_steps=TOTAL_STEPS)
  if args.step is None:
    num_sites = len(site_list)
    args.step = round(TOTAL_STEPS * sched.span_end * (num_sites // 2 + 0.5) / num_sites)
  fractions = [float(schedule.frozen_fraction(args.step, i, len(site_list), sched))
               for i in range(len(site_list))]
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start')
  print(f'ResNet-20 BNN, batch {args.batch}, {len(site_list)} binary convs; schedule step '
        f'{args.step}/{TOTAL_STEPS} (layerwise cubic, span 0.8): frozen fractions '
        f'{" ".join(f"{p:.2f}" for p in fractions)}')

  times, compile_s = benchmark_methods(args, model_for, site_paths, kernel_sites, images, labels)
  med = {m: statistics.median(t) for m, t in times.items()}
  paired = lambda m, ref: statistics.median(a / b for a, b in zip(times[m], times[ref]))
  print(f'\n{args.reps} interleaved repetitions x {args.steps} steps; ms per train step '
        f'(compile excluded); load average {os.getloadavg()[0]:.1f} at end')
  header = (f'{"method":<11} {"median":>8} {"min":>8} {"max":>8} {"compile s":>9} '
            f'{"/fp":>6} {"/ste":>6} {"/fp pair":>8} {"/ste pair":>9}')
  print(header)
  print('-' * len(header))
  for m in args.methods:
    ratio = lambda ref: f'{med[m] / med[ref]:6.3f}' if ref in med else f'{"-":>6}'
    pair = lambda ref, w: f'{paired(m, ref):{w}.3f}' if ref in med else f'{"-":>{w}}'
    print(f'{m:<11} {med[m]:8.1f} {min(times[m]):8.1f} {max(times[m]):8.1f} {compile_s[m]:9.1f} '
          f'{ratio("fp")} {ratio("ste")} {pair("fp", 8)} {pair("ste", 9)}')
  print('raw ms per repetition:')
  for m in args.methods:
    print(f'  {m:<11} ' + ' '.join(f'{t:.0f}' for t in times[m]))
  if 'stompp' in med and 'ste' in med:
    ratios = sorted(a / b for a, b in zip(times['stompp'], times['ste']))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    ok = paired('stompp', 'ste') <= 1.10
    print(f'target stompp / ste <= 1.10: {"met" if ok else "MISSED"} '
          f'(paired median {paired("stompp", "ste"):.3f}, quartiles {quartiles[0]:.3f} .. '
          f'{quartiles[2]:.3f}; a wide spread means a noisy machine)')

  if args.pieces:
    results = time_pieces(args, site_list, site_paths, args.batch)
    print(f'\npieces, ms per train step (median of {args.reps} x {args.steps}):')
    for name, t in results.items():
      print(f'  {name:<40} {statistics.median(t):8.1f}')


if __name__ == '__main__':
  main()
