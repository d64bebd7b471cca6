"""Quickstart throughput on the CPU: train and eval img/s, CPU and system time, page faults.

    STOMPP_DATA_DIR=/work/shared/data/cifar10_jpeg python benchmarks/cpu_throughput.py --variants=plain,cli,jemalloc --rounds=2 --steps=24

Each run is the real CLI (`python -m stompp_jax.main --config=configs/quickstart.py`) in its own
process and a fresh workdir, `--steps` train steps (progress line every half) and an eval of
`--eval_steps` batches, under one variant's environment (VARIANTS below). Rounds alternate the
variants (the order rotating), so a machine's changing load hits them alike. Per run: train
img/s of the last progress window (the CLI's own number), eval img/s (examples of every eval
function over the time between the CLI's `Evaluating` and `eval at` lines), and from the kernel
(`getrusage` of the finished child) the process's user and system CPU seconds and minor page faults, whole run
(compile included). The persistent compilation cache is off, so every run compiles alike.
`--json=PATH` writes every run.
"""

import argparse
import datetime
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBS = '/usr/lib/x86_64-linux-gnu'
# name: (environment changes, what it is). Any malloc variable of the user's own makes the CLI
# leave malloc alone (stompp_jax/allocator.py, keep_freed_memory): 'plain' sets glibc's own default.
VARIANTS = {
    'plain': ({'MALLOC_MMAP_MAX_': '65536'}, 'the CLI with glibc malloc as glibc sets it (the old default)'),
    'cli': ({}, 'the CLI as shipped: on CPU, malloc keeps freed memory (allocator.keep_freed_memory)'),
    'xla_cpu_defaults': ({'STOMPP_JAX_CPU_COMPILER_OPTIONS': 'xla'},
                         "the CLI with XLA's default CPU options (convolutions in YNNPACK),"
                         ' instead of stompp_jax/compiler.py\'s'),
    'jemalloc': ({'LD_PRELOAD': f'{LIBS}/libjemalloc.so.2'},
                 'jemalloc through LD_PRELOAD (Debian libjemalloc2)'),
    'tcmalloc': ({'LD_PRELOAD': f'{LIBS}/libtcmalloc_minimal.so.4'},
                 'tcmalloc through LD_PRELOAD (Debian libtcmalloc-minimal4)'),
}
_LOG_TIME = re.compile(r'^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+)')


def quickstart_command(workdir: str, steps: int, eval_steps: int, config: str) -> list[str]:
  return [sys.executable, '-m', 'stompp_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--config.train.num_steps={steps}', f'--config.train.log_every={max(steps // 2, 1)}',
          f'--config.train.eval_steps={eval_steps}', f'--config.train.checkpoint_every={steps}']


def _seconds(line: str) -> float:
  stamp = _LOG_TIME.match(line).group(2)
  t = datetime.datetime.strptime(stamp, '%H:%M:%S.%f')
  return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def parse_log(stderr: str) -> dict:
  """The last progress line's img/s, the eval's seconds and its number of eval functions."""
  lines = stderr.splitlines()
  progress = [float(m.group(1)) for m in (re.search(r'\| ([\d.]+) img/s \|', l) for l in lines) if m]
  start = next((l for l in lines if 'Evaluating at step' in l), None)
  end = next((l for l in lines if '] eval at step' in l), None)
  result = {'train_img_per_s': progress[-1] if progress else None}
  if start and end:
    result['eval_seconds'] = _seconds(end) - _seconds(start)
    result['eval_functions'] = end.count('accuracy')
  return result


def run_once(variant: str, args) -> dict:
  changes, _ = VARIANTS[variant]
  env = {**os.environ, 'JAX_ENABLE_COMPILATION_CACHE': 'false', 'PYTHONPATH': ROOT, **changes}
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    proc = subprocess.run(quickstart_command(workdir, args.steps, args.eval_steps, args.config),
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise RuntimeError(f'{variant}: exit {proc.returncode}\n{proc.stderr[-3000:]}')
  result = {'variant': variant, 'wall_seconds': wall, **parse_log(proc.stderr),
            'user_seconds': after.ru_utime - before.ru_utime,
            'system_seconds': after.ru_stime - before.ru_stime,
            'minor_faults': after.ru_minflt - before.ru_minflt,
            'closing_line': proc.stdout.strip().splitlines()[-1]}
  if 'eval_seconds' in result and args.eval_examples:
    result['eval_img_per_s'] = (result['eval_functions'] * args.eval_examples
                                / result['eval_seconds'])
  return result


def summarize(runs: list[dict], variants: list[str]) -> str:
  """A markdown table: per variant, medians over rounds, and ratios to the first variant."""
  keys = ('train_img_per_s', 'eval_img_per_s', 'user_seconds', 'system_seconds', 'minor_faults',
          'wall_seconds')
  medians = {}
  for variant in variants:
    mine = [r for r in runs if r['variant'] == variant]
    medians[variant] = {k: statistics.median(r[k] for r in mine) if all(r.get(k) is not None for r in mine) else None
                        for k in keys}
  lines = ['| variant | train img/s | eval img/s | user s | system s | minor faults | wall s |'
           ' train img/s / first (paired) |', '|---|---|---|---|---|---|---|---|']
  first = variants[0]
  for variant in variants:
    m = medians[variant]
    pairs = [a['train_img_per_s'] / b['train_img_per_s']
             for a, b in zip([r for r in runs if r['variant'] == variant],
                             [r for r in runs if r['variant'] == first])]
    cells = ['-' if m[k] is None else (f'{m[k]:.0f}' if k == 'minor_faults' else f'{m[k]:.1f}')
             for k in keys]
    lines.append(f'| {variant} | ' + ' | '.join(cells) + f' | {statistics.median(pairs):.3f} |')
  return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's arguments, --variants as a checked list (an unknown one exits with 2)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variants', default='plain,cli', help=f'Of: {", ".join(VARIANTS)}.')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--steps', type=int, default=24, help='Train steps per run.')
  parser.add_argument('--eval_steps', type=int, default=2, help='Eval batches (512 images).')
  parser.add_argument('--eval_examples', type=int, default=1024,
                      help='Real examples per eval function (for eval img/s; 0 = skip).')
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--json', default='')
  args = parser.parse_args(argv)
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    print(f'Error: unknown variant(s) {", ".join(unknown)}: use {", ".join(VARIANTS)}.',
          file=sys.stderr)
    sys.exit(2)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  variants = args.variants
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()}, {args.config}, {args.steps}'
        f' steps, eval {args.eval_steps} batches', flush=True)
  runs = []
  for rnd in range(args.rounds):
    for variant in variants[rnd % len(variants):] + variants[:rnd % len(variants)]:
      result = run_once(variant, args)
      result.update(round=rnd, load_average=os.getloadavg())
      runs.append(result)
      print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v)
                        for k, v in result.items() if k != 'closing_line'}), flush=True)
  for variant in variants:
    print(f'{variant}: {VARIANTS[variant][1]}')
  print(summarize(runs, variants))
  print(f'load average after {os.getloadavg()}', flush=True)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(runs, f, indent=2)


if __name__ == '__main__':
  main()
