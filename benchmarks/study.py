"""The equal-epochs study: does StoMPP's gain over STE grow with depth, and does reverse order
collapse? Decided by rules fixed before the runs (docs/study.md).

    python benchmarks/prepare_cifar16.py --out=~/stompp_data/cifar10_16   # 16x16 CIFAR-10
    python benchmarks/study.py --data_dir=~/stompp_data/cifar10_16 --plan  # runs, time estimate
    python benchmarks/study.py --data_dir=~/stompp_data/cifar10_16         # run (resumable)
    python benchmarks/study.py --analyze [--doc=docs/results.md]           # decisions, tables
    bash benchmarks/run_study.sh --commit --data_dir=...                   # nohup + nice, chunks

Every run: CIFAR-10 (JPEG copy) pooled to 16x16, BNN, --epochs epochs at --batch (equal epochs
at every depth), SGD 0.1 momentum 0.9 (configs/default.py); StoMPP's progression fills the first
--span of the run in one window per site, so window steps per site = floor(span x steps / sites)
(the `window` group instead gives ResNet-20 ResNet-56's window steps). --evals evaluations, each
of the fully binary network as trained and with BatchNorm statistics re-estimated on
--recalibrate training batches.

Groups (each x --readings x seeds; `reading` = model.bnn_shortcut):
  core     {resnet20, resnet56} x {ste, stompp layerwise}
  reverse  resnet56 stompp reverse
  floor    {resnet20, resnet56}: every site frozen from step 0 (the gates' reference)
  window   resnet20 stompp layerwise at resnet56's window steps (descriptive)
Seeds: --seeds (3), plus the extra seeds of the rule in `extra_seed_cells`. Runs go seed-major.

Resume: a run whose summary (--summaries/NAME.json, committed) exists is skipped; an unfinished
run resumes from its checkpoint under --out. A SIGTERM saves a checkpoint and exits with 75
(run_study.sh sends one every --chunk seconds); the summary's wall time sums every chunk.

--data=synthetic with --models=tiny_resnet is a seconds-long smoke test (tests/test_study.py).
"""

import argparse
import collections
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from stompp_jax.errors import EXIT_PREEMPTED  # noqa: E402  (no JAX: it starts in `execute`)

READINGS = ('binarized', 'real')  # models/resnet.py BNN_SHORTCUTS.
# The readings run by default, in the order their runs go within a seed: `real` first since the
# plan's amendment of 2026-12-08 (docs/study.md, "The plan as amended").
DEFAULT_READINGS = ('real', 'binarized')
GROUPS = ('core', 'reverse', 'floor', 'window')
TRAIN_SIZE = {'npz': 50_000, 'synthetic': 256}
EVAL_SIZE = {'npz': 10_000, 'synthetic': 64}
NUM_CLASSES = {'npz': 10, 'synthetic': 4}
IMAGE_SHAPE = (16, 16, 3)
# --plan's fallback when no run of a model has finished: seconds per train step at batch 128 on
# 16x16 images and compile seconds, from the pilot (docs/study.md): ResNet-20 measured (689 img/s),
# ResNet-56 three times that (its three times as many blocks; the pilot's own ResNet-56 figure was
# taken on an overloaded machine).
STEP_SECONDS = {'resnet20': 0.19, 'resnet56': 0.56, 'tiny_resnet': 0.01}
COMPILE_SECONDS = {'resnet20': 35.0, 'resnet56': 100.0, 'tiny_resnet': 10.0}
DOC_BEGIN = '<!-- study: begin (written by python benchmarks/study.py --analyze --doc=FILE) -->'
DOC_END = '<!-- study: end -->'

# ------------------------------------------------------------------ the pre-registered rules
# Written before the first run (docs/study.md states the same); changing one after the runs
# turns every decision it touches into a descriptive result.
PRIMARY, CHECK = 'recalibrated', 'as_trained'  # The decisions' metric; it must agree with CHECK.
GATE_ABOVE_FLOOR = 0.15  # Layerwise at least 15 points above the floor (mean over seeds)...
GATE_TRAIN_LOSS = 1.6  # ...and its final train loss at most 1.6, else "undertrained".
GROWTH_MIN = 0.03  # "Grows": lower bound of the growth > 0 and growth >= 3 points.
COLLAPSE_BELOW, HOLDS_ABOVE = 1 / 3, 1 / 2  # Reverse: r's upper bound < 1/3; lower bound > 1/2.
SEEDS, EXTRA_SEEDS = 3, 2  # +2 seeds once, for a decision still "cannot tell" with gates passed.
# One-sided 95% quantiles of Student's t by degrees of freedom; df above 20 uses df 20's
# (conservative); a fractional Welch df is rounded down.
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
       9: 1.833, 10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746,
       17: 1.740, 18: 1.734, 19: 1.729, 20: 1.725}
DECISIONS = ('depth', 'reverse')
VERDICTS = {'depth': ('grows', 'does not grow'), 'reverse': ('collapses', 'does not collapse')}


def t95(df: float) -> float:
  return T95[min(max(int(df + 1e-9), 1), 20)]  # + 1e-9: a df of 4 computed as 3.9999...


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean with its one-sided 95% bounds (each bound alone at 95%) over `n` values."""
  mean: float
  lower: float
  upper: float
  n: int

  def text(self, scale: float = 100, unit: str = ' points') -> str:
    return (f'{scale * self.mean:+.2f}{unit} (one-sided 95%: > {scale * self.lower:+.2f},'
            f' < {scale * self.upper:+.2f}; n={self.n})')


def one_sample(values: list[float]) -> Estimate | None:
  """Mean and one-sided 95% t bounds of per-seed values (paired differences, ratios)."""
  if len(values) < 2:
    return None
  mean, half = statistics.mean(values), t95(len(values) - 1) * statistics.stdev(values)
  return Estimate(mean, mean - half / math.sqrt(len(values)), mean + half / math.sqrt(len(values)),
                  len(values))


def welch(a: list[float], b: list[float]) -> Estimate | None:
  """mean(a) - mean(b) with one-sided 95% Welch bounds (independent samples: other models)."""
  if len(a) < 2 or len(b) < 2:
    return None
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  se = math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se else 1
  diff = statistics.mean(a) - statistics.mean(b)
  return Estimate(diff, diff - t95(df) * se, diff + t95(df) * se, min(len(a), len(b)))


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
  """a - b over the common seeds (same seed: same init and data order)."""
  return [a[s] - b[s] for s in sorted(set(a) & set(b))]


# ------------------------------------------------------------------------------- the plan


def num_sites(model: str) -> int:
  """Binary sites of `model` under the default rules (traced, as train.py does)."""
  from stompp_jax import models, sites  # pylint: disable=g-import-not-at-top  (JAX)
  from stompp_jax.models import inspect  # pylint: disable=g-import-not-at-top
  config = default.get_config().model
  config.name = model
  net = models.create_model(config, num_classes=10, image_shape=IMAGE_SHAPE)
  return len(sites.discover_sites(inspect.trace_model(net, IMAGE_SHAPE),
                                  models.binary_rules(config)))


def run_name(run: dict) -> str:
  window = '_w' if run['group'] == 'window' else ''
  return (f"{run['model']}_{run['reading']}_{run['method']}_{run['order']}{window}"
          f"_s{run['seed']}")


def cells(args) -> list[tuple]:
  """(group, model, method, order) of every planned cell, in the order runs go within a seed."""
  shallow, deep = args.models[0], args.models[-1]
  out = []
  for group in args.groups:
    if group == 'core':
      out += [('core', m, method, 'layerwise') for m in (deep, shallow)
              for method in ('stompp', 'ste')]
    elif group == 'reverse':
      out.append(('reverse', deep, 'stompp', 'reverse'))
    elif group == 'floor':
      out += [('floor', m, 'floor', 'layerwise') for m in (deep, shallow)]
    elif group == 'window' and shallow != deep:
      out.append(('window', shallow, 'stompp', 'layerwise'))
  return list(dict.fromkeys(out))


def plan_runs(args, summaries: list[dict] | None = None) -> list[dict]:
  """The study's runs, seed-major, readings in --readings order: dicts with name, group,
  model, reading, method, order, seed; with the rule's extra seeds where `summaries` call
  for them."""
  extra = extra_seed_cells(summaries or [], args)
  runs = []
  for seed in range(args.seeds + EXTRA_SEEDS):
    for reading in args.readings:
      for group, model, method, order in cells(args):
        if seed >= args.seeds and (group, model, method, order, reading) not in extra:
          continue
        run = dict(group=group, model=model, reading=reading, method=method, order=order,
                   seed=seed)
        runs.append({'name': run_name(run), **run})
  return runs


@dataclasses.dataclass(frozen=True)
class Budget:
  steps: int
  window_steps: int  # 0 for the floor.


def budget(run: dict, sites: dict[str, int], args) -> Budget:
  """Equal epochs at every depth; the progression fills --span of the run, one window a site."""
  steps = max(1, math.ceil(args.epochs * (TRAIN_SIZE[args.data] // args.batch)))
  if run['method'] == 'floor':
    return Budget(steps, 0)
  model = args.models[-1] if run['group'] == 'window' else run['model']
  return Budget(steps, max(1, int(args.span * steps / sites[model])))


def make_config(run: dict, sites: dict[str, int], args):
  """The config of one run: configs/default.py with the study's recipe, cell and seed."""
  config = default.get_config()
  plan = budget(run, sites, args)
  config.seed = run['seed']
  config.model.name = run['model']
  config.model.mode = 'bnn'
  config.model.bnn_shortcut = run['reading']
  floor = run['method'] == 'floor'
  config.binary.method = 'stompp' if floor else run['method']
  config.binary.order = run['order']
  config.binary.span_start = 0.0
  config.binary.span_end = 0.0 if floor else args.span  # Windows come from window_steps.
  config.binary.window_steps = plan.window_steps
  config.data.name = 'cifar10'
  if args.data == 'synthetic':
    config.data.source = 'synthetic'
    config.data.synthetic_image_shape = IMAGE_SHAPE
    config.data.synthetic_num_classes = NUM_CLASSES['synthetic']
    config.data.synthetic_train_size = TRAIN_SIZE['synthetic']
    config.data.synthetic_eval_size = EVAL_SIZE['synthetic']
  else:
    config.data.source = 'npz'
    config.data.dir = os.path.expanduser(args.data_dir)  # '' = $STOMPP_DATA_DIR.
  config.train.batch_size = args.batch
  config.train.eval_batch_size = args.eval_batch
  config.train.num_steps = plan.steps
  config.train.log_every = max(1, plan.steps // 100)
  config.train.eval_every = max(1, plan.steps // max(args.evals, 1))
  config.train.checkpoint_every = max(1, plan.steps // 10)
  config.train.recalibrate_bn_batches = args.recalibrate
  config.mesh.num_devices = 1
  return config


def estimate_seconds(run: dict, sites: dict, args, finished: list[dict]) -> tuple[float, str]:
  """Wall seconds of one run: the median of finished runs of the model and budget, else
  STEP_SECONDS (--step_seconds) x steps, plus compile and the evals (3 forward passes of the
  eval split per eval, a third of a train step per image, and the recalibration batches)."""
  plan = budget(run, sites, args)
  walls = [s['wall_seconds'] for s in finished
           if (s['model'], s['steps'], s['batch']) == (run['model'], plan.steps, args.batch)]
  if walls and run['model'] not in args.step_seconds:
    return statistics.median(walls), f'median of {len(walls)} finished'
  step = args.step_seconds.get(run['model'], STEP_SECONDS.get(run['model'], 1.0)) * args.batch / 128
  evals = max(args.evals, 1) * (3 * EVAL_SIZE[args.data] + args.recalibrate * args.batch)
  source = '--step_seconds' if run['model'] in args.step_seconds else 'STEP_SECONDS'
  return (plan.steps * step + COMPILE_SECONDS.get(run['model'], 60.0)
          + evals * step / args.batch / 3), source


# ------------------------------------------------------------------------------ running


def summary_path(args, name: str) -> str:
  return os.path.join(args.summaries, f'{name}.json')


def describe_machine() -> str:
  """The OS, CPU model and core count (wall times are only comparable on one of them)."""
  cpu = ''
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
  except OSError:
    pass  # Not Linux: platform.processor() below.
  cpu = cpu or platform.processor() or 'unknown CPU'
  return f'{platform.platform()}, {cpu}, {os.cpu_count()} cores'


def summarize_run(run: dict, sites: dict, workdir: str, args, wall: dict) -> dict:
  """The small JSON summary of a finished run: cell, budget, accuracies, train loss, curves."""
  from stompp_jax import analysis  # pylint: disable=g-import-not-at-top
  loaded = analysis.load_run(workdir)
  train_rows, eval_rows = analysis.split_rows(loaded, 'train'), analysis.split_rows(loaded, 'eval')
  final = eval_rows[-1]
  pick = lambda row, keys: {k: round(row[k], 6) for k in keys if k in row}
  eval_keys = ('eval_fully_binary_accuracy', 'eval_fully_binary_recalibrated_accuracy',
               'eval_accuracy', 'eval_fully_binary_loss', 'eval_fully_binary_recalibrated_loss')
  tail = train_rows[-max(1, len(train_rows) // 20):]  # The last 5% of the logged steps.
  plan = budget(run, sites, args)
  return {
      **run, 'sites': sites[run['model']], 'window_steps': plan.window_steps,
      'steps': plan.steps, 'epochs': args.epochs, 'batch': args.batch, 'data': args.data,
      'image_shape': list(IMAGE_SHAPE),
      'as_trained': final.get('eval_fully_binary_accuracy'),
      'recalibrated': final.get('eval_fully_binary_recalibrated_accuracy'),
      'final_train_loss': round(statistics.mean(r['loss'] for r in tail), 6),
      'final': pick(final, eval_keys),
      'curves': {'train': [pick(r, ('step', 'loss', 'accuracy')) for r in train_rows],
                 'eval': [pick(r, ('step', *eval_keys)) for r in eval_rows]},
      'config': {'binary': loaded['config']['binary'], 'train': loaded['config']['train'],
                 'model': loaded['config']['model']},
      'wall_seconds': round(wall['seconds'], 1), 'chunks': wall['chunks'],
      # Chunks killed without their SIGTERM: their seconds are missing from wall_seconds.
      'lost_chunks': wall['lost_chunks'],
      'machine': args.machine or describe_machine(), 'code_commit': code_commit(),
  }


def code_commit() -> str:
  """The git commit of the code this runs ('' outside a git checkout)."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''


def _wall_file(workdir: str) -> str:
  return os.path.join(workdir, 'study_wall.json')


def _read_wall(workdir: str) -> dict:
  try:
    with open(_wall_file(workdir), encoding='utf-8') as f:
      return {'lost_chunks': 0, **json.load(f)}
  except FileNotFoundError:
    return {'seconds': 0.0, 'chunks': 0, 'lost_chunks': 0}


def _write_wall(workdir: str, wall: dict) -> dict:
  with open(_wall_file(workdir) + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(wall, f)
  os.replace(_wall_file(workdir) + '.tmp', _wall_file(workdir))
  return wall


def start_chunk(workdir: str) -> dict:
  """Marks a chunk of the run as started. A chunk still marked open from before was killed
  without its SIGTERM (a machine's end): its seconds are lost, and counted as a lost chunk so
  the summary says its wall time is a lower bound."""
  os.makedirs(workdir, exist_ok=True)
  wall = _read_wall(workdir)
  lost = wall['lost_chunks'] + (1 if wall.get('open') else 0)
  return _write_wall(workdir, {'seconds': wall['seconds'], 'chunks': wall['chunks'],
                               'lost_chunks': lost, 'open': True})


def add_wall(workdir: str, seconds: float) -> dict:
  """Adds one chunk's wall seconds to the run's running total (kept beside its checkpoints)."""
  wall = _read_wall(workdir)
  return _write_wall(workdir, {'seconds': wall['seconds'] + seconds, 'chunks': wall['chunks'] + 1,
                               'lost_chunks': wall['lost_chunks']})


def execute(runs: list[dict], sites: dict, args) -> int:
  """Trains every run without a summary (resuming it) and writes its summary. Returns 0, 1 if
  a run failed, or EXIT_PREEMPTED when a SIGTERM stopped a run (its checkpoint is saved)."""
  from stompp_jax import allocator  # pylint: disable=g-import-not-at-top
  if allocator.cpu_only():
    allocator.keep_freed_memory()  # As the CLI does, before JAX starts its threads.
  import logging as python_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from stompp_jax import train  # pylint: disable=g-import-not-at-top  (JAX starts here)
  logging.set_verbosity(logging.INFO)  # The trainer's progress lines (step, img/s, evals)...
  package = os.path.dirname(os.path.abspath(train.__file__))
  python_logging.getLogger('absl').addFilter(  # ...and no other library's INFO, as the CLI.
      lambda record: record.levelno >= python_logging.WARNING or record.pathname.startswith(package))
  os.makedirs(args.summaries, exist_ok=True)
  status = 0
  for i, run in enumerate(runs):
    tag = f'[{i + 1}/{len(runs)}] {run["name"]}'
    if os.path.exists(summary_path(args, run['name'])):
      print(f'{tag}: done, skipped', flush=True)
      continue
    workdir = os.path.join(args.out, run['name'])
    config = make_config(run, sites, args)
    print(f'{tag}: training ({config.train.num_steps} steps, window steps per site'
          f' {config.binary.window_steps})', flush=True)
    start_chunk(workdir)
    start = time.time()
    try:
      final = train.train_and_evaluate(config, workdir)
    except Exception:  # pylint: disable=broad-except  (one failed run must not stop the study)
      traceback.print_exc()
      status = 1
      continue
    wall = add_wall(workdir, time.time() - start)
    if final.get('preempted'):
      print(f'{tag}: stopped at step {final["step"]} (SIGTERM) after {wall["seconds"]:.0f} s in'
            f' {wall["chunks"]} chunks; the same command resumes it', flush=True)
      return EXIT_PREEMPTED
    summary = summarize_run(run, sites, workdir, args, wall)
    with open(summary_path(args, run['name']) + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=1)
    os.replace(summary_path(args, run['name']) + '.tmp', summary_path(args, run['name']))
    print(f'{tag}: as trained {_pct(summary["as_trained"])}%, recalibrated '
          f'{_pct(summary["recalibrated"])}%, train loss {summary["final_train_loss"]:.3f}'
          f' ({wall["seconds"]:.0f} s)', flush=True)
  return status


# ------------------------------------------------------------------------------- analysis


def load_summaries(directory: str) -> list[dict]:
  rows = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    if name.endswith('.json'):
      with open(os.path.join(directory, name), encoding='utf-8') as f:
        rows.append(json.load(f))
  return rows


def _pct(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def by_seed(summaries: list[dict], metric: str, **cell) -> dict[int, float]:
  """{seed: value} of the runs matching `cell` (group, model, reading, method, order)."""
  return {s['seed']: s[metric] for s in summaries
          if s.get(metric) is not None and all(s[k] == v for k, v in cell.items())}


def _layerwise(model, reading):
  return dict(group='core', model=model, reading=reading, method='stompp', order='layerwise')


def _cell(group, model, reading, method, order='layerwise'):
  return dict(group=group, model=model, reading=reading, method=method, order=order)


@dataclasses.dataclass(frozen=True)
class Gate:
  """A model's gate: passed, or failed on cells that have every seed (`failed_for_good`: no
  further run can pass it), and the values as one line."""
  passed: bool
  failed_for_good: bool
  text: str


def gate(summaries: list[dict], model: str, reading: str, metric: str, seeds: int) -> Gate:
  """Whether layerwise StoMPP at `model` trained: >= 15 points above the floor (mean over
  seeds) and final train loss <= 1.6 (mean); `seeds`: the seeds a complete cell has."""
  layerwise = by_seed(summaries, metric, **_layerwise(model, reading))
  floor = by_seed(summaries, metric, **_cell('floor', model, reading, 'floor'))
  above = one_sample(paired(layerwise, floor))
  losses = list(by_seed(summaries, 'final_train_loss', **_layerwise(model, reading)).values())
  loss = statistics.mean(losses) if losses else None
  loss_fails = len(losses) >= seeds and loss > GATE_TRAIN_LOSS
  if above is None:
    text = f'{model}: not enough runs for the gate' + (
        f' (train loss {loss:.3f}, gate <= {GATE_TRAIN_LOSS}, over {len(losses)} seeds)'
        if loss_fails else '')
    return Gate(False, loss_fails, text)
  above_fails = min(len(layerwise), len(floor)) >= seeds and above.mean < GATE_ABOVE_FLOOR
  passed = above.mean >= GATE_ABOVE_FLOOR and loss <= GATE_TRAIN_LOSS
  return Gate(passed, loss_fails or above_fails, (
      f'{model} layerwise - floor {100 * above.mean:+.2f} points (gate >= '
      f'{100 * GATE_ABOVE_FLOOR:.0f}), train loss {loss:.3f} (gate <= {GATE_TRAIN_LOSS})'))


def depth_estimate(summaries, args, reading, metric) -> Estimate | None:
  """Gain = layerwise - STE per seed (paired); growth = mean gain at the deep model minus at
  the shallow one (Welch)."""
  gains = [paired(by_seed(summaries, metric, **_layerwise(m, reading)),
                  by_seed(summaries, metric, **_cell('core', m, reading, 'ste')))
           for m in (args.models[-1], args.models[0])]
  return welch(*gains)


def reverse_estimate(summaries, args, reading, metric) -> Estimate | None:
  """r = (reverse - floor) / (layerwise - floor) per seed at the deep model."""
  deep = args.models[-1]
  rev, floor, lw = (by_seed(summaries, metric, **c) for c in (
      _cell('reverse', deep, reading, 'stompp', 'reverse'), _cell('floor', deep, reading, 'floor'),
      _layerwise(deep, reading)))
  ratios = [(rev[s] - floor[s]) / (lw[s] - floor[s]) for s in sorted(set(rev) & set(floor) & set(lw))
            if lw[s] != floor[s]]
  return one_sample(ratios)


def rule(decision: str, estimate: Estimate | None) -> str:
  """The pre-registered verdict of one estimate: VERDICTS[decision] or 'cannot tell'."""
  positive, negative = VERDICTS[decision]
  if estimate is None:
    return 'cannot tell'
  if decision == 'depth':
    if estimate.lower > 0 and estimate.mean >= GROWTH_MIN:
      return positive
    return negative if estimate.upper < GROWTH_MIN else 'cannot tell'
  if estimate.upper < COLLAPSE_BELOW:
    return positive
  return negative if estimate.lower > HOLDS_ABOVE else 'cannot tell'


@dataclasses.dataclass(frozen=True)
class Decision:
  decision: str  # 'depth' or 'reverse'.
  reading: str
  verdict: str  # VERDICTS[decision], 'cannot tell', 'undertrained' or 'not run'.
  estimates: dict  # {metric: Estimate or None}.
  gates: list  # The gate lines.
  gates_passed: bool


def decide(summaries: list[dict], args, decision: str, reading: str) -> Decision:
  """One confirmatory decision: gates first, then the rule on PRIMARY, agreeing with CHECK."""
  estimator = depth_estimate if decision == 'depth' else reverse_estimate
  estimates = {m: estimator(summaries, args, reading, m) for m in (PRIMARY, CHECK)}
  models = args.models if decision == 'depth' else args.models[-1:]
  gates = [gate(summaries, m, reading, PRIMARY, args.seeds) for m in dict.fromkeys(models)]
  passed = all(g.passed for g in gates)
  if any(g.failed_for_good for g in gates) or (estimates[PRIMARY] is not None and not passed):
    verdict = 'undertrained'
  elif estimates[PRIMARY] is None:
    verdict = 'not run'
  else:
    primary, check = (rule(decision, estimates[m]) for m in (PRIMARY, CHECK))
    verdict = primary if primary == check else 'cannot tell'
  return Decision(decision, reading, verdict, estimates, [g.text for g in gates], passed)


def decision_cells(decision: str, args) -> list[tuple]:
  """(group, model, method, order) of the cells a decision reads."""
  shallow, deep = args.models[0], args.models[-1]
  if decision == 'depth':
    return [('core', m, method, 'layerwise') for m in (deep, shallow) for method in ('stompp', 'ste')
            ] + [('floor', m, 'floor', 'layerwise') for m in (deep, shallow)]
  return [('core', deep, 'stompp', 'layerwise'), ('reverse', deep, 'stompp', 'reverse'),
          ('floor', deep, 'floor', 'layerwise')]


def extra_seed_cells(summaries: list[dict], args) -> set[tuple]:
  """The rule for more seeds, applied once: a decision whose SEEDS seeds are all in, whose
  gates pass and whose verdict is 'cannot tell' gets EXTRA_SEEDS more seeds on its cells.
  Returns (group, model, method, order, reading) of those cells."""
  out = set()
  for decision in DECISIONS:
    for reading in args.readings:
      wanted = [(c, reading) for c in decision_cells(decision, args) if c in cells(args)]
      if len(wanted) < len(decision_cells(decision, args)):
        continue  # A group of this decision is not planned.
      complete = all(len(by_seed([s for s in summaries if s['seed'] < args.seeds], PRIMARY,
                                 **_cell(g, m, reading, method, order))) == args.seeds
                     for (g, m, method, order), reading in wanted)
      if complete and decide([s for s in summaries if s['seed'] < args.seeds], args, decision,
                             reading).verdict == 'cannot tell':
        out |= {(*c, reading) for c, reading in wanted}
  return out


def decisions_markdown(summaries: list[dict], args) -> list[str]:
  """The table of the confirmatory decisions."""
  lines = ['| decision | reading | verdict | estimate (recalibrated) | as trained | gates |',
           '|---|---|---|---|---|---|']
  for decision in DECISIONS:
    for reading in args.readings:
      d = decide(summaries, args, decision, reading)
      scale, unit = (100, ' points') if decision == 'depth' else (1, '')
      est = {m: (e.text(scale, unit) if e else '-') for m, e in d.estimates.items()}
      what = ("StoMPP's gain over STE grows with depth" if decision == 'depth' else
              f'reverse order collapses at {args.models[-1]} (r = (reverse - floor) /'
              ' (layerwise - floor))')
      lines.append(f'| {what} | {reading} | **{d.verdict}** | {est[PRIMARY]} | {est[CHECK]} |'
                   f' {"; ".join(d.gates)} |')
  return lines


def cell_table(summaries: list[dict]) -> list[str]:
  """Every cell: mean ± std over seeds, as trained and recalibrated, train loss, wall."""
  groups = collections.defaultdict(list)
  for s in summaries:
    groups[(GROUPS.index(s['group']), s['model'], s['reading'], s['method'], s['order'])].append(s)
  lines = ['| group | model | reading | method | order | window steps | steps | seeds |'
           ' as trained | recalibrated | train loss | wall s (median) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  spread = lambda v: (f'{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v):.2f}'
                      if len(v) > 1 else (f'{100 * v[0]:.2f}' if v else '-'))
  for key in sorted(groups):
    runs = groups[key]
    get = lambda m: [r[m] for r in runs if r[m] is not None]  # pylint: disable=cell-var-from-loop
    lines.append(f'| {GROUPS[key[0]]} | {" | ".join(key[1:])} | {runs[0]["window_steps"]} |'
                 f' {runs[0]["steps"]} | {len(runs)} | {spread(get("as_trained"))} |'
                 f' {spread(get("recalibrated"))} |'
                 f' {statistics.mean(get("final_train_loss")):.3f} |'
                 f' {statistics.median(get("wall_seconds")):.0f} |')
  return lines


def descriptive_lines(summaries: list[dict], args) -> list[str]:
  """Estimates that decide nothing: StoMPP - STE per model, the window check, real minus
  binarized, recalibrated minus as trained."""
  lines = []
  for reading in args.readings:
    for model in args.models:
      e = one_sample(paired(by_seed(summaries, PRIMARY, **_layerwise(model, reading)),
                            by_seed(summaries, PRIMARY, **_cell('core', model, reading, 'ste'))))
      if e:
        lines.append(f'- StoMPP - STE, {model}, {reading}: {e.text()}')
    shallow = args.models[0]
    e = one_sample(paired(by_seed(summaries, PRIMARY, **_cell('window', shallow, reading, 'stompp')),
                          by_seed(summaries, PRIMARY, **_layerwise(shallow, reading))))
    if e:
      lines.append(f"- {shallow} at {args.models[-1]}'s window steps - at its own, {reading}:"
                   f' {e.text()}')
  if len(args.readings) > 1:
    for model in args.models:
      for method in ('stompp', 'ste'):
        e = one_sample(paired(*(by_seed(summaries, PRIMARY, **_cell('core', model, r, method))
                                for r in ('real', 'binarized'))))
        if e:
          lines.append(f'- real - binarized, {model} {method}: {e.text()}')
  changes = collections.defaultdict(list)
  for s in summaries:
    if s['as_trained'] is not None and s['recalibrated'] is not None:
      changes[s['method']].append(s['recalibrated'] - s['as_trained'])
  for method, values in sorted(changes.items()):
    e = one_sample(values)
    if e:
      lines.append(f'- recalibrated - as trained, {method} (all cells): {e.text()}')
  return lines


def machines_line(summaries: list[dict]) -> str:
  """Which CPUs ran how many runs (the summaries' `machine`, without the OS)."""
  counts = collections.Counter(s['machine'].split(', ', 1)[-1] for s in summaries)
  runs = '; '.join(f'{n} on {cpu}' for cpu, n in counts.most_common())
  return f'Runs by machine (wall times compare only within one): {runs or "none yet"}.'


def results_markdown(summaries: list[dict], args) -> str:
  planned = plan_runs(args, summaries)
  done = {s['name'] for s in summaries}
  hours = sum(s['wall_seconds'] for s in summaries) / 3600
  lines = [f'**{len(done & {r["name"] for r in planned})} of {len(planned)} runs done**'
           f' ({hours:.1f} hours of wall time summed).', '', machines_line(summaries), '',
           'Confirmatory decisions (rules: docs/study.md):', '', *decisions_markdown(summaries, args),
           '', 'Cells: fully binary test accuracy, %, mean ± sample std over seeds:', '',
           *cell_table(summaries), '', 'Descriptive (no decision rests on these):', '',
           *descriptive_lines(summaries, args)]
  return '\n'.join(lines) + '\n'


def write_curves(summaries: list[dict], out: str) -> str:
  """curves.png: recalibrated test accuracy over training per cell (mean over seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  models = sorted({s['model'] for s in summaries}, key=lambda m: min(
      s['sites'] for s in summaries if s['model'] == m))
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models):
    series = collections.defaultdict(lambda: collections.defaultdict(list))
    for s in summaries:
      if s['model'] == model:
        label = f"{s['group']} {s['method']} {s['order']} {s['reading']}"
        for row in s['curves']['eval']:
          value = row.get('eval_fully_binary_recalibrated_accuracy')
          if value is not None:
            series[label][row['step']].append(100 * value)
    for label, points in sorted(series.items()):
      steps = sorted(points)
      ax.plot(steps, [statistics.mean(points[t]) for t in steps], marker='o', label=label)
    ax.axhline(100 / NUM_CLASSES[summaries[0]['data']], color='gray', linestyle=':',
               label='chance')
    ax.set_title(model)
    ax.set_xlabel('step')
    ax.legend(fontsize=6)
  axes[0][0].set_ylabel('fully binary test accuracy, % (recalibrated)')
  path = os.path.join(out, 'curves.png')
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return path


def read_doc(path: str) -> tuple[str, str]:
  """The text of `path` up to and including the DOC_BEGIN line, and from DOC_END on."""
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    _fail(f'--doc={path}: {e.strerror}: name an existing markdown file')
  begin, end = text.find(DOC_BEGIN), text.find(DOC_END)
  if begin < 0 or end < begin or text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1:
    _fail(f'--doc={path} needs one line {DOC_BEGIN} and, after it, one line {DOC_END}')
  return text[:begin + len(DOC_BEGIN)] + '\n', text[end:]


def analyze(args) -> str:
  """Writes --summaries/results.md and plots/curves.png (and the --doc block); returns the
  markdown."""
  if args.doc:
    head, tail = read_doc(args.doc)  # A bad --doc fails before anything is written.
  summaries = load_summaries(args.summaries)
  text = results_markdown(summaries, args)
  os.makedirs(args.summaries, exist_ok=True)
  with open(os.path.join(args.summaries, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  if summaries:
    write_curves(summaries, os.path.join(args.summaries, 'plots'))
  if args.doc:
    with open(f'{args.doc}.tmp', 'w', encoding='utf-8') as f:
      f.write(head + text + tail)
    os.replace(f'{args.doc}.tmp', args.doc)
  return text


# ------------------------------------------------------------------------------- command line


def _fail(message: str):
  print(f'Error: {message}', file=sys.stderr)
  sys.exit(2)


def _mapping(text: str, what: str, cast) -> dict:
  """'a:1,b:2' -> {'a': cast('1'), ...}; a one-line error for anything else."""
  out = {}
  for item in filter(None, text.split(',')):
    key, sep, value = item.partition(':')
    try:
      if not sep:
        raise ValueError
      out[key] = cast(value)
    except ValueError:
      _fail(f'{what} {item!r} is not NAME:NUMBER: write e.g. resnet20:0.5,resnet56:1.6')
  return out


def _names(text: str) -> list[str]:
  return [n for n in text.split(',') if n]


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='runs/study', help='Run directories (git-ignored).')
  parser.add_argument('--summaries', default='docs/results/equal_epochs',
                      help='One JSON summary per finished run (committed), results.md, plots/.')
  parser.add_argument('--models', default='resnet20,resnet56', help='Shallow, deep.')
  parser.add_argument('--readings', default=','.join(DEFAULT_READINGS),
                      help=f'model.bnn_shortcut readings of {READINGS}, in the order runs go.')
  parser.add_argument('--groups', default=','.join(GROUPS), help=f'Comma-separated of {GROUPS}.')
  parser.add_argument('--seeds', type=int, default=SEEDS, help='Seeds before the extra-seed rule.')
  parser.add_argument('--epochs', type=float, default=10.0, help='Epochs of every run.')
  parser.add_argument('--span', type=float, default=0.8,
                      help='Fraction of the run the progression fills (the rest: fully binary).')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--eval_batch', type=int, default=500)
  parser.add_argument('--evals', type=int, default=5, help='Evaluations per run (last at the end).')
  parser.add_argument('--recalibrate', type=int, default=20,
                      help='train.recalibrate_bn_batches of every run.')
  parser.add_argument('--data', default='npz', choices=('npz', 'synthetic'))
  parser.add_argument('--data_dir', default='',
                      help="16x16 npz directory (prepare_cifar16.py); '' = $STOMPP_DATA_DIR.")
  parser.add_argument('--machine', default='', help='Machine description for the summaries.')
  parser.add_argument('--step_seconds', default='',
                      help='Measured s/step at batch 128 for --plan, NAME:S,... (else STEP_SECONDS).')
  parser.add_argument('--compile_cache', default=os.path.join('~', '.cache', 'stompp_jax', 'jax_cache'),
                      help="Persistent JAX compilation cache ('' = none); seeds share compiles.")
  parser.add_argument('--only', default='', help='Run only these runs, in this order.')
  parser.add_argument('--plan', action='store_true', help='Print the runs and the time estimate.')
  parser.add_argument('--names', action='store_true', help='Print the unfinished runs\' names.')
  parser.add_argument('--analyze', action='store_true', help='Only write results.md and plots.')
  parser.add_argument('--doc', default='',
                      help='With --analyze: also rewrite the block of this file between the'
                      ' study markers.')
  args = parser.parse_args(argv)
  args.models, args.groups = _names(args.models), _names(args.groups)
  args.readings, args.only = _names(args.readings), _names(args.only)
  args.step_seconds = _mapping(args.step_seconds, '--step_seconds', float)
  if not 1 <= len(args.models) <= 2:
    _fail(f'--models={",".join(args.models)}: name one or two models, shallow first')
  for flag, given, allowed in (('--groups', args.groups, GROUPS),
                               ('--readings', args.readings, READINGS)):
    if not given or set(given) - set(allowed):
      _fail(f'{flag}={",".join(given)}: choose from {", ".join(allowed)}')
  if args.seeds < 1 or args.epochs <= 0 or not 0.0 < args.span <= 1.0 or args.batch < 1:
    _fail(f'--seeds={args.seeds}, --epochs={args.epochs}, --span={args.span},'
          f' --batch={args.batch}: use seeds >= 1, epochs > 0, span in (0, 1], batch >= 1')
  return args


def print_plan(runs: list[dict], sites: dict, args):
  """One line per run (budget, estimate, done or not) and the hours still to run."""
  finished = load_summaries(args.summaries)
  done = {s['name'] for s in finished}
  total = 0.0
  for run in runs:
    seconds, source = estimate_seconds(run, sites, args, finished)
    total += 0.0 if run['name'] in done else seconds
    plan = budget(run, sites, args)
    print(f"{run['name']} ({run['group']}{', done' if run['name'] in done else ''}):"
          f" {plan.steps} steps x {args.batch}, {sites[run['model']]} sites,"
          f" {plan.window_steps} window steps per site, ~{seconds / 60:.0f} min ({source})")
  print(f'{len(runs)} runs, {len(done & {r["name"] for r in runs})} done, ~{total / 3600:.1f}'
        ' hours of this machine still to run (one process on every core)')


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.analyze:
    print(analyze(args), flush=True)
    return 0
  summaries = load_summaries(args.summaries)
  runs = plan_runs(args, summaries)
  by_name = {r['name']: r for r in runs}
  missing = [n for n in args.only if n not in by_name]
  if missing:
    _fail(f'--only names {missing} are not runs of this plan: list them with --names')
  if args.only:
    runs = [by_name[name] for name in dict.fromkeys(args.only)]  # In the order given.
  if args.names:
    done = {s['name'] for s in summaries}
    print('\n'.join(r['name'] for r in runs if r['name'] not in done))
    return 0
  sites = {model: num_sites(model) for model in args.models}
  if args.plan:
    print_plan(runs, sites, args)
    return 0
  if args.compile_cache:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(args.compile_cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return execute(runs, sites, args)


if __name__ == '__main__':
  sys.exit(main())
