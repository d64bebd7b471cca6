"""Steady-state train-step time, compile time and memory of fp / ste / stompp / stompp_ste.

    python benchmarks/step_time.py --models=resnet18:32,resnet50:4 --reps=5 --steps=2   # CPU
    python benchmarks/step_time.py --models=resnet18:256,resnet50:128 --dtype=bfloat16   # GPU
    python benchmarks/step_time.py --models=resnet20:128 --reps=15 --steps=1 --pieces   # pieces
    python benchmarks/step_time.py --models=resnet18:32 --methods=fp,ste,stompp,stompp@select \
        --reps=0 --compile_reps=5                                  # compile time and memory only

Models: `name:batch`; resnet50 gets the ImageNet shape (224x224x3, 1000 classes, ImageNet stem),
every other model of the zoo CIFAR-10 shapes (32x32x3, 10 classes, CIFAR stem). Each method's
model, optimizer, initial state and compiled step come from `experiment.build(config)`, as a
run gets them: the project's own `steps.train_step` (forward, backward, the method's optimizer
transforms, masks made inside the step), with configs/default.py, model.mode bnn (fp: mode fp),
synthetic data of the model's shapes and a mesh of one device, on a synthetic global batch,
with the state at step 420 of a 1000-step layerwise schedule (about half the sites fully
frozen, one freezing, the rest still float; at step 400 the freezing site of ResNet-18 and -20
would be at the very start of its window, with no entry frozen yet).

Methods: fp, ste, stompp, stompp_ste, each optionally `@cond` or `@select`: the config's
switch `binary.masks_by` between a per-site `lax.cond` and a plain select for the masks
(binary/context.py; without one, the default for the platform: cond on CPU, select on TPU and
GPU), e.g. stompp@select.

Timing: compile (lower + compile) is timed apart; after --warmup steps per method, --reps
repetitions each run --steps consecutive steps of every method, the methods' order rotating
between repetitions so machine noise hits all alike; `time.perf_counter` around
`block_until_ready`. The table gives the median step time per method and its ratio to fp and
ste three ways: ratio of medians, median of per-repetition ratios (paired; robust to slow drifts
of the machine's load) and ratio of minima (least disturbed steps on a shared machine).

Compile time on a loaded machine: --compile_reps=N compiles every method N more times, the
methods interleaved and their order rotating; `compile s` is then the median over those N and
`compile / fp` the median of the per-repetition ratios (paired); the same for the compiles'
CPU time (this process, all threads) is printed below the table, being less disturbed by other
jobs than wall-clock. --reps=0 skips the step timing.

HLO: the compiled step's instructions, fusions and conditionals per method (`hlo_counts`), to
tell where compile time goes.

Memory: `step MB` is XLA's own account of the compiled step (arguments + outputs + temporaries
- donated aliases, from `compiled.memory_analysis()`), per method, on any backend. The device's
peak (`memory_stats()['peak_bytes_in_use']`, GPU/TPU) and the process's RSS high-water mark
(CPU) are process-wide (every method of the run together) and printed once.

--pieces: where the binarization's time goes, per model, in ms per train step (median over
--reps, each --steps calls, every call blocked on): the masks of all sites alone (kernel and
input, `context.site_frozen_mask`), the STE binarizers alone, `masked_sign` with given masks,
the StoMPP binarizers with their masks (`context.binarize_site_tensor`), each forward +
backward over every site's kernel and input, and the binary convs alone (forward + backward),
on the sites of the model's stompp build at the same step.

Targets (issue 16), for ste, stompp and stompp_ste against fp: step time <= 1.05 (paired
ratio), compile time <= 1.3x, XLA step memory <= 1.10x. `--json=PATH` writes every measurement.
"""

import argparse
import functools
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from stompp_jax import compiler  # noqa: E402
from stompp_jax import experiment  # noqa: E402
from stompp_jax.binary import binarize  # noqa: E402
from stompp_jax.binary import context  # noqa: E402

METHODS = ('fp', 'ste', 'stompp', 'stompp_ste')
TOTAL_STEPS = 1000
START_FRACTION = 0.42  # Inside a site's window for the 16- and 18-site CIFAR ResNets.
TARGETS = {'step': 1.05, 'compile': 1.3, 'memory': 1.10}  # x fp, for every binary method.
IMAGENET_MODELS = ('resnet50',)


def dataset_of(name: str) -> str:
  """The dataset whose shapes the benchmark gives `name` (the data's table holds them)."""
  return 'imagenet2012' if name in IMAGENET_MODELS else 'cifar10'


def make_config(name: str, method: str, dtype: str, batch_size: int = 32):
  """configs/default.py for `name` and `method` on synthetic data of the model's shapes."""
  config = default.get_config()
  config.model.name = name
  config.model.mode = 'fp' if method == 'fp' else 'bnn'
  config.model.dtype = dtype
  config.binary.method = method
  config.data.name = dataset_of(name)
  config.data.source = 'synthetic'
  config.train.num_steps = TOTAL_STEPS
  config.train.batch_size = batch_size
  config.train.eval_batch_size = batch_size
  config.mesh.num_devices = 1
  return config


def split_method(spec: str) -> tuple[str, str]:
  """'stompp@select' -> ('stompp', 'select'); no '@' -> the config's default ('auto': cond on
  CPU, select on TPU and GPU)."""
  method, _, masks_by = spec.partition('@')
  if method not in METHODS or (masks_by and masks_by not in context.MASKS_BY):
    raise ValueError(f'Unknown method {spec!r}: use one of {", ".join(METHODS)}, optionally'
                     f' @{"|@".join(context.MASKS_BY)}.')
  return method, masks_by or 'auto'


def bench_config(name: str, spec: str, dtype: str, batch_size: int, seed: int = 0):
  """make_config for a method spec ('stompp@select': binary.masks_by set) and seed."""
  method, masks_by = split_method(spec)
  config = make_config(name, method, dtype, batch_size)
  config.seed = seed
  config.binary.masks_by = masks_by
  return config


class Bench:
  """One (model, method): its compiled train step (from experiment.build), state and batch."""

  def __init__(self, name: str, spec: str, batch_size: int, dtype: str, seed: int = 0):
    self.method = spec
    exp = experiment.build(bench_config(name, spec, dtype, batch_size, seed))
    self.exp = exp
    self.num_sites = len(exp.net.sites)
    state = jax.jit(exp.init_state, out_shardings=exp.state_shardings)()
    self.state = state.replace(step=jnp.asarray(int(START_FRACTION * TOTAL_STEPS), jnp.int32))
    rng = np.random.default_rng(seed)
    image_shape, num_classes = exp.data.image_shape, exp.data.num_classes
    self.batch = jax.device_put({
        'image': rng.standard_normal((batch_size, *image_shape), np.float32),
        'label': rng.integers(0, num_classes, batch_size).astype(np.int32)}, exp.batch_sharding)
    start = time.perf_counter()
    self.compiled = exp.compile_train_step()
    self.compile_seconds = time.perf_counter() - start
    self.step_bytes = _step_bytes(self.compiled)
    self.hlo = hlo_counts(self.compiled.as_text())
    self.times = []
    self.compile_times = []
    self.compile_cpu_times = []

  def recompile(self) -> None:
    """Compiles the train step again (a fresh lowering: no cache) and records the seconds,
    wall-clock and this process's CPU time (all threads; less disturbed by other jobs)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    self.exp.compile_train_step()
    self.compile_times.append(time.perf_counter() - start)
    self.compile_cpu_times.append(time.process_time() - cpu_start)

  def run(self, num_steps: int) -> float:
    """Runs `num_steps` steps; returns seconds per step."""
    start = time.perf_counter()
    for _ in range(num_steps):
      self.state, _, _ = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / num_steps


_HLO_OP = re.compile(r'^\s*(ROOT )?%\S+ = .*? ([a-z][a-z0-9-]*)\(')


def hlo_counts(hlo_text: str) -> dict[str, int]:
  """Of a compiled module's HLO text: its instructions (every computation, fused ones
  included), fusions (one generated kernel each on the CPU, so a proxy of LLVM's work at compile)
  and conditionals."""
  ops = [m.group(2) for m in map(_HLO_OP.match, hlo_text.splitlines()) if m]
  return {'instructions': len(ops), 'fusions': ops.count('fusion'),
          'conditionals': ops.count('conditional')}


def _step_bytes(compiled) -> int | None:
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return None


def process_memory() -> dict[str, float]:
  """Process-wide peaks in MB: device peak (where reported) and host RSS high-water mark."""
  result = {'rss_peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    result['device_peak_mb'] = stats['peak_bytes_in_use'] / 2**20
  return result


def benchmark_model(name: str, batch_size: int, methods, args) -> dict:
  """Compiles every method, then times them interleaved; returns the measurements."""
  benches = {}
  for method in methods:
    print(f'  compiling {name} {method} ...', flush=True)
    benches[method] = Bench(name, method, batch_size, args.dtype)
    print(f'    compiled in {benches[method].compile_seconds:.1f} s', flush=True)
    for _ in range(args.warmup):
      benches[method].run(1)
  for rep in range(args.compile_reps):
    order = methods[rep % len(methods):] + methods[:rep % len(methods)]
    for method in order:
      print(f'  recompiling {name} {method} ({rep + 1}/{args.compile_reps}) ...', flush=True)
      benches[method].recompile()
  for rep in range(args.reps):
    order = methods[rep % len(methods):] + methods[:rep % len(methods)]
    for method in order:
      benches[method].times.append(benches[method].run(args.steps))
  return {method: dict(compile_seconds=(statistics.median(b.compile_times) if b.compile_times
                                        else b.compile_seconds),
                       first_compile_seconds=b.compile_seconds, compile_times=b.compile_times,
                       compile_cpu_times=b.compile_cpu_times,
                       step_bytes=b.step_bytes, times=b.times,
                       median=statistics.median(b.times) if b.times else None,
                       sites=b.num_sites, hlo=b.hlo)
          for method, b in benches.items()}


def compile_ratio(results: dict, method: str, reference: str = 'fp',
                  times: str = 'compile_times') -> float:
  """compile / reference: the median of per-repetition ratios with --compile_reps (wall-clock,
  or `times='compile_cpu_times'`: CPU time), else the ratio of the single compiles."""
  r, ref = results[method], results[reference]
  if r[times] and ref[times]:
    return statistics.median(a / b for a, b in zip(r[times], ref[times]))
  return r['compile_seconds'] / ref['compile_seconds']


def _median_ms(fns: dict[str, Callable[[], Any]], reps: int, calls: int) -> dict[str, float]:
  """{name: median ms per call of fn()} over `reps` rounds of `calls` calls, after one warm-up."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(fn())  # Independent calls could overlap on the CPU: block each.
      times[name].append((time.perf_counter() - start) / calls * 1e3)
  return {name: statistics.median(t) for name, t in times.items()}


def time_pieces(exp: experiment.Experiment, batch_size: int, step: int, reps: int,
                calls: int) -> dict[str, float]:
  """ms per train step of the binarization's pieces on the sites of a stompp build `exp`:
  masks, binarizers (forward + backward), binary convs (forward + backward); --pieces."""
  site_calls = {c.path: c for c in exp.net.trace.calls}
  convs = [s for s in exp.net.sites if s.kind == 'conv']
  rng = np.random.default_rng(0)
  kernels = [jnp.asarray(rng.normal(size=s.kernel_shape), jnp.float32) for s in exp.net.sites]
  inputs = [jnp.asarray(rng.normal(size=(batch_size, *s.input_shape)), jnp.float32)
            for s in exp.net.sites]
  key, step = jax.random.key(0), jnp.int32(step)
  make_ctx = lambda step, key: context.BinarizationContext(step=step, key=key,
                                                           config=exp.binarization)

  @compiler.jit
  def masks_only(step, key):
    ctx = make_ctx(step, key)
    return [(context.site_frozen_mask(ctx, i, 'kernel', s.kernel_shape),
             context.site_frozen_mask(ctx, i, 'input', s.input_shape))
            for i, s in enumerate(exp.net.sites)]

  def binarized_sum(kind, kernels, inputs, step, key):
    ctx = make_ctx(step, key)
    total = 0.0
    for i, (k, x) in enumerate(zip(kernels, inputs)):
      if kind == 'ste':
        bk, bx = binarize.ste_sign(k, grad='identity'), binarize.ste_sign(x)
      elif kind == 'given masks':
        bk, bx = binarize.masked_sign(k, k > 0.5), binarize.masked_sign(x, x[0] > 0.5)
      else:
        bk = context.binarize_site_tensor(k, ctx, i, 'kernel')
        bx = context.binarize_site_tensor(x, ctx, i, 'input')
      total = total + jnp.sum(bk) + jnp.sum(bx)
    return total

  grads = {kind: compiler.jit(jax.grad(functools.partial(binarized_sum, kind), argnums=(0, 1)))
           for kind in ('ste', 'given masks', 'stompp')}

  def conv_sum(kernels, inputs):
    total = 0.0
    for i, s in enumerate(exp.net.sites):
      if s.kind == 'conv':
        module = site_calls[s.path].module
        y = jax.lax.conv_general_dilated(
            inputs[i], kernels[i], tuple(module.strides), module.padding,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=module.feature_group_count)
        total = total + jnp.sum(y * y)
    return total

  convs_only = compiler.jit(jax.grad(conv_sum, argnums=(0, 1)))
  return _median_ms({
      'masks of all sites (kernel + input)': lambda: masks_only(step, key),
      'ste binarizers fwd+bwd': lambda: grads['ste'](kernels, inputs, step, key),
      'masked_sign fwd+bwd, masks given': lambda: grads['given masks'](kernels, inputs, step, key),
      'stompp binarizers fwd+bwd incl. masks': lambda: grads['stompp'](kernels, inputs, step, key),
      f'binary convs alone fwd+bwd ({len(convs)} convs)': lambda: convs_only(kernels, inputs),
  }, reps, calls)


def ratio_table(results: dict, reference: str) -> dict[str, tuple[float, float, float]]:
  """{method: (ratio of medians, median of per-repetition ratios, ratio of minima)}.

  On a machine shared with other jobs, noise only adds time: the minima are then the least
  disturbed measurements and their ratio a useful third estimate.
  """
  if reference not in results or not results[reference]['times']:
    return {}
  ref = results[reference]
  return {m: (r['median'] / ref['median'],
              statistics.median(a / b for a, b in zip(r['times'], ref['times'])),
              min(r['times']) / min(ref['times']))
          for m, r in results.items()}


def target_verdicts(results: dict) -> list[str]:
  """One line per binary method: its step (paired), compile and memory ratios to fp vs TARGETS."""
  if 'fp' not in results:
    return []
  paired = ratio_table(results, 'fp')
  fp = results['fp']
  lines = []
  for method, r in results.items():
    if method == 'fp':
      continue
    ratios = {'step': paired[method][1]} if method in paired else {}
    ratios['compile'] = compile_ratio(results, method)
    if r['step_bytes'] and fp['step_bytes']:
      ratios['memory'] = r['step_bytes'] / fp['step_bytes']
    cells = [f'{k} {v:.3f} ({"meets" if v <= TARGETS[k] else "MISSES"} <= {TARGETS[k]})'
             for k, v in ratios.items()]
    lines.append(f'{method} / fp: ' + ', '.join(cells))
  return lines


def format_model(name: str, batch_size: int, results: dict) -> str:
  ratios = {ref: ratio_table(results, ref) for ref in ('fp', 'ste')}
  lines = [f'{name}, batch {batch_size}:',
           '| method | step ms (median) | min | max | img/s | compile s | step MB (XLA) |'
           ' / fp (medians, paired, minima) | / ste (medians, paired, minima) | compile / fp |'
           ' memory / fp |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for method, r in results.items():
    cells = []
    for ref in ('fp', 'ste'):
      pair = ratios[ref].get(method)
      cells.append('-' if pair is None else ', '.join(f'{v:.3f}' for v in pair))
    memory = '-' if r['step_bytes'] is None else f"{r['step_bytes'] / 2**20:.1f}"
    fp = results.get('fp')
    compile_fp = '-' if fp is None else f'{compile_ratio(results, method):.3f}'
    memory_fp = ('-' if fp is None or not (r['step_bytes'] and fp['step_bytes'])
                 else f"{r['step_bytes'] / fp['step_bytes']:.3f}")
    timed = [f"{1e3 * r['median']:.1f}", f"{1e3 * min(r['times']):.1f}",
             f"{1e3 * max(r['times']):.1f}", f"{batch_size / r['median']:.1f}"] if r['times'] else ['-'] * 4
    lines.append(f"| {method} | {' | '.join(timed)} | {r['compile_seconds']:.1f} | {memory} |"
                 f" {cells[0]} | {cells[1]} | {compile_fp} | {memory_fp} |")
  hlo = ', '.join(f"{m} {r['hlo']['instructions']}/{r['hlo']['fusions']}/{r['hlo']['conditionals']}"
                  for m, r in results.items())
  if 'fp' in results and results['fp']['compile_cpu_times']:
    lines.append('compile CPU seconds (median) and / fp (paired): ' + ', '.join(
        f"{m} {statistics.median(r['compile_cpu_times']):.1f} s"
        f" {compile_ratio(results, m, times='compile_cpu_times'):.3f}"
        for m, r in results.items()))
  return '\n'.join(lines + target_verdicts(results)
                   + [f'compiled step HLO (instructions/fusions/conditionals): {hlo}'])


def parse_models(spec: str) -> list[tuple[str, int]]:
  result = []
  for item in filter(None, spec.split(',')):
    name, _, batch = item.partition(':')
    result.append((name, int(batch) if batch else 32))
  return result


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's arguments, --models and --methods as checked lists: every (model,
  method) config passes `experiment.check_config` before anything compiles."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='resnet18:128,resnet50:64', help='name:batch,...')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--reps', type=int, default=7,
                      help='Timed repetitions per method (0: compile and memory only).')
  parser.add_argument('--compile_reps', type=int, default=0,
                      help='Extra compiles per method, interleaved; compile time = their median.')
  parser.add_argument('--steps', type=int, default=5, help='Consecutive steps per repetition.')
  parser.add_argument('--warmup', type=int, default=2, help='Untimed steps per method.')
  parser.add_argument('--pieces', action='store_true',
                      help='Also time masks, binarizers and convs alone (stompp sites).')
  parser.add_argument('--json', default='', help='Also write every measurement here.')
  args = parser.parse_args(argv)
  args.models = parse_models(args.models)
  args.methods = [m for m in args.methods.split(',') if m]
  for name, batch_size in args.models:
    for spec in args.methods:
      experiment.check_config(bench_config(name, spec, args.dtype, batch_size))
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  device = jax.devices()[0]
  backend = jax.default_backend()
  print(f'backend {backend}, device {device.device_kind}, {jax.device_count()} device(s) (one used),'
        f' {os.cpu_count()} CPUs, host {platform.node()}, load average {os.getloadavg()},'
        f' jax {jax.__version__}, dtype {args.dtype}', flush=True)
  everything = {'backend': backend, 'device': device.device_kind, 'dtype': args.dtype,
                'load_before': os.getloadavg(), 'models': {}, 'pieces_ms': {}}
  for name, batch_size in args.models:
    results = benchmark_model(name, batch_size, args.methods, args)
    everything['models'][f'{name}:{batch_size}'] = results
    print(format_model(name, batch_size, results), flush=True)
    if args.pieces:
      pieces = time_pieces(experiment.build(make_config(name, 'stompp', args.dtype, batch_size)),
                           batch_size, int(START_FRACTION * TOTAL_STEPS), args.reps, args.steps)
      everything['pieces_ms'][f'{name}:{batch_size}'] = pieces
      print(f'{name}, batch {batch_size}: pieces, ms per train step (median of {args.reps} x'
            f' {args.steps}):\n' + '\n'.join(f'  {k:<45} {v:8.1f}' for k, v in pieces.items()),
            flush=True)
  everything.update(process_memory(), load_after=os.getloadavg())
  print('process-wide peaks (all methods together): '
        + ', '.join(f'{k} {v:.0f}' for k, v in process_memory().items())
        + f'; load average after {os.getloadavg()}', flush=True)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(everything, f, indent=2)


if __name__ == '__main__':
  main()
