"""Steady-state train-step time, compile time and memory of fp / ste / stompp / stompp_ste.

    python benchmarks/step_time.py --models=resnet18:32,resnet50:4 --reps=5 --steps=2   # CPU
    python benchmarks/step_time.py --models=resnet18:256,resnet50:128 --dtype=bfloat16   # GPU

Models: `name:batch`; resnet50 gets the ImageNet shape (224x224x3, 1000 classes, ImageNet stem),
every other model of the zoo CIFAR-10 shapes (32x32x3, 10 classes, CIFAR stem). Each method's
step is the project's own `steps.train_step` (forward, backward, the method's optimizer
transforms, masks made inside the step), built as a run builds it (`experiment.build_model`,
`experiment.binarization_config`, `optimizers.create_optimizer`) from configs/default.py with
model.mode bnn (fp: mode fp), on a synthetic global batch on one device, with the state at 40%
of a 1000-step layerwise schedule (about half the sites fully frozen, one freezing, the rest
still float).

Timing: compile (lower + compile) is timed apart; after --warmup steps per method, --reps
repetitions each run --steps consecutive steps of every method, the methods' order rotating
between repetitions so machine noise hits all alike; `time.perf_counter` around
`block_until_ready`. The table gives the median step time per method and its ratio to fp and
ste three ways: ratio of medians, median of per-repetition ratios (paired; robust to slow drifts
of the machine's load) and ratio of minima (least disturbed steps on a shared machine).

Memory: `step MB` is XLA's own account of the compiled step (arguments + outputs + temporaries
- donated aliases, from `compiled.memory_analysis()`), per method, on any backend. The device's
peak (`memory_stats()['peak_bytes_in_use']`, GPU/TPU) and the process's RSS high-water mark
(CPU) are process-wide (every method of the run together) and printed once.

Targets (issue 16), for ste, stompp and stompp_ste against fp: step time <= 1.05 (paired
ratio), compile time <= 1.3x, XLA step memory <= 1.10x. `--json=PATH` writes every measurement.
"""

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from stompp_jax import experiment  # noqa: E402
from stompp_jax import optimizers  # noqa: E402
from stompp_jax import sites as sites_lib  # noqa: E402
from stompp_jax import state as state_lib  # noqa: E402
from stompp_jax import steps  # noqa: E402

METHODS = ('fp', 'ste', 'stompp', 'stompp_ste')
TOTAL_STEPS = 1000
START_FRACTION = 0.4
TARGETS = {'step': 1.05, 'compile': 1.3, 'memory': 1.10}  # x fp, for every binary method.
IMAGENET_MODELS = ('resnet50',)


def model_shape(name: str) -> tuple[str, tuple[int, int, int], int]:
  """(dataset name, image shape, classes) the benchmark uses for `name`."""
  if name in IMAGENET_MODELS:
    return 'imagenet2012', (224, 224, 3), 1000
  return 'cifar10', (32, 32, 3), 10


def make_config(name: str, method: str, dtype: str):
  config = default.get_config()
  config.model.name = name
  config.model.mode = 'fp' if method == 'fp' else 'bnn'
  config.model.dtype = dtype
  config.binary.method = method
  config.data.name = model_shape(name)[0]
  config.train.num_steps = TOTAL_STEPS
  return config


def build_run(config, image_shape, num_classes, seed: int = 0):
  """(model, binarization config, optimizer, initial state, site count) as a run builds them."""
  net = experiment.build_model(config, num_classes=num_classes, image_shape=image_shape)
  binarization = experiment.binarization_config(config, net.sites, TOTAL_STEPS)
  sample = jnp.zeros((1, *image_shape), jnp.float32)
  abstract_params = jax.eval_shape(
      lambda: net.model.init(jax.random.PRNGKey(0), sample, train=False))['params']
  lr = optimizers.learning_rate_schedule(config.optim, total_steps=TOTAL_STEPS, steps_per_epoch=100)
  tx = optimizers.create_optimizer(config.optim, config.binary, lr_schedule=lr,
                                   kernel_sites=sites_lib.kernel_sites(net.sites),
                                   kernel_mask=experiment.kernel_mask(abstract_params))
  state = jax.jit(functools.partial(state_lib.create_train_state, net.model, tx, seed, sample))()
  return net.model, binarization, tx, state, len(net.sites)


class Bench:
  """One (model, method): its compiled train step, state and batch."""

  def __init__(self, name: str, method: str, batch_size: int, dtype: str, seed: int = 0):
    self.method = method
    _, image_shape, num_classes = model_shape(name)
    model, binarization, tx, state, self.num_sites = build_run(
        make_config(name, method, dtype), image_shape, num_classes, seed)
    self.state = state.replace(step=jnp.asarray(int(START_FRACTION * TOTAL_STEPS), jnp.int32))
    rng = np.random.default_rng(seed)
    self.batch = {
        'image': jnp.asarray(rng.standard_normal((batch_size, *image_shape), np.float32)),
        'label': jnp.asarray(rng.integers(0, num_classes, batch_size).astype(np.int32))}
    step_fn = jax.jit(functools.partial(steps.train_step, model=model, binarization=binarization,
                                        tx=tx, diagnostics=False), donate_argnums=0)
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.step_bytes = _step_bytes(self.compiled)
    self.times = []

  def run(self, num_steps: int) -> float:
    """Runs `num_steps` steps; returns seconds per step."""
    start = time.perf_counter()
    for _ in range(num_steps):
      self.state, _, _ = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / num_steps


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
  for rep in range(args.reps):
    order = methods[rep % len(methods):] + methods[:rep % len(methods)]
    for method in order:
      benches[method].times.append(benches[method].run(args.steps))
  return {method: dict(compile_seconds=b.compile_seconds, step_bytes=b.step_bytes, times=b.times,
                       median=statistics.median(b.times), sites=b.num_sites)
          for method, b in benches.items()}


def ratio_table(results: dict, reference: str) -> dict[str, tuple[float, float, float]]:
  """{method: (ratio of medians, median of per-repetition ratios, ratio of minima)}.

  On a machine shared with other jobs, noise only adds time: the minima are then the least
  disturbed measurements and their ratio a useful third estimate.
  """
  if reference not in results:
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
    ratios = {'step': paired[method][1], 'compile': r['compile_seconds'] / fp['compile_seconds']}
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
           ' / fp (medians, paired, minima) | / ste (medians, paired, minima) |',
           '|---|---|---|---|---|---|---|---|---|']
  for method, r in results.items():
    cells = []
    for ref in ('fp', 'ste'):
      pair = ratios[ref].get(method)
      cells.append('-' if pair is None else ', '.join(f'{v:.3f}' for v in pair))
    memory = '-' if r['step_bytes'] is None else f"{r['step_bytes'] / 2**20:.0f}"
    lines.append(f"| {method} | {1e3 * r['median']:.1f} | {1e3 * min(r['times']):.1f} |"
                 f" {1e3 * max(r['times']):.1f} | {batch_size / r['median']:.1f} |"
                 f" {r['compile_seconds']:.1f} | {memory} | {cells[0]} | {cells[1]} |")
  return '\n'.join(lines + target_verdicts(results))


def parse_models(spec: str) -> list[tuple[str, int]]:
  result = []
  for item in filter(None, spec.split(',')):
    name, _, batch = item.partition(':')
    result.append((name, int(batch) if batch else 32))
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default='resnet18:128,resnet50:64', help='name:batch,...')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--reps', type=int, default=7, help='Timed repetitions per method.')
  parser.add_argument('--steps', type=int, default=5, help='Consecutive steps per repetition.')
  parser.add_argument('--warmup', type=int, default=2, help='Untimed steps per method.')
  parser.add_argument('--json', default='', help='Also write every measurement here.')
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(',') if m]
  device = jax.devices()[0]
  backend = jax.default_backend()
  print(f'backend {backend}, device {device.device_kind}, {jax.device_count()} device(s) (one used),'
        f' {os.cpu_count()} CPUs, host {platform.node()}, load average {os.getloadavg()},'
        f' jax {jax.__version__}, dtype {args.dtype}', flush=True)
  everything = {'backend': backend, 'device': device.device_kind, 'dtype': args.dtype,
                'load_before': os.getloadavg(), 'models': {}}
  for name, batch_size in parse_models(args.models):
    results = benchmark_model(name, batch_size, methods, args)
    everything['models'][f'{name}:{batch_size}'] = results
    print(format_model(name, batch_size, results), flush=True)
  everything.update(process_memory(), load_after=os.getloadavg())
  print('process-wide peaks (all methods together): '
        + ', '.join(f'{k} {v:.0f}' for k, v in process_memory().items())
        + f'; load average after {os.getloadavg()}', flush=True)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(everything, f, indent=2)


if __name__ == '__main__':
  main()
