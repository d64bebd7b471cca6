"""The papers' findings at a CPU budget (issue 15): both BNN block readings, fixed steps per site.

    python benchmarks/study.py --plan                         # the runs and their time estimate
    STOMPP_DATA_DIR=/path/to/cifar10_jpeg python benchmarks/study.py    # run (resumable)
    python benchmarks/study.py --analyze                      # tables, plots, verdicts
    python benchmarks/study.py --analyze --doc=docs/results.md    # and the block in the docs
    bash benchmarks/run_study.sh [--commit]                   # the whole study, nohup + nice

Cells (CIFAR-10 JPEG copy; every accuracy is the deployed, fully binary network's):
  main   --models x {ste, stompp, stompp_ste} (models after the first: --deep_methods) x
         model.bnn_shortcut {real, binarized}, BNN, layerwise;
  order  the first model, BNN STE-free StoMPP, global and reverse order, both readings
         (layerwise is the main group's run);
  floor  every model and reading: every kernel and input frozen from step 0 (StoMPP with an
         empty span at 0): what the float stem, BatchNorms, shortcuts and classifier learn alone;
  bwn    the first model, BWN StoMPP, layerwise and reverse (order insensitivity; the block
         reading does not apply to BWN: its block inputs are never binarized).
Seeds: --seeds per model (default resnet20:3,resnet56:3), --ablation_seeds for order/bwn,
--floor_seeds for the floor; runs go seed-major, so a study cut short has every cell's seed 0.

Budget: every binary site gets --steps_per_site window steps (binary.window_steps) whatever
the depth, the progression starts at step 0 and fills 1 - --tail of the run; the rest trains the
fully binary network. So a run of L sites has ceil(L W / (1 - tail)) steps. Every eval logs the
accuracy as trained (running BatchNorm statistics) and recalibrated (statistics re-estimated on
--recalibrate training batches, stompp_jax/recalibrate.py).

Resume: a run whose summary (--summaries/NAME.json, committed) exists is skipped; an unfinished
run resumes from its checkpoint under --out (git-ignored). `--only=NAME,...` runs those runs in that order;
`--names` prints the plan's run names (run_study.sh loops over them).

--data=synthetic with --models=tiny_resnet is a seconds-long smoke test (tests/test_study.py).
"""

import argparse
import collections
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402

READINGS = ('real', 'binarized')  # models/resnet.py BNN_SHORTCUTS (imported lazily with JAX).
MAIN_METHODS = ('ste', 'stompp', 'stompp_ste')
ORDERS = ('layerwise', 'global', 'reverse')
GROUPS = ('main', 'order', 'floor', 'bwn')
EVAL_SIZE = {'npz': 10_000, 'synthetic': 64}
NUM_CLASSES = {'npz': 10, 'synthetic': 4}  # CIFAR-10; the smoke test's synthetic classes.
# For --plan when no run of a model has finished (else the median wall time of the finished runs
# of that model and budget): seconds per train step at batch 64 and compile seconds, measured by
# this study on the idle 2-core VM (the train rows' images_per_second, medians: ResNet-20 72-83
# images/s, ResNet-56 20.5; the ResNet-56 train step compiled in 194 s).
STEP_SECONDS = {'resnet20': 0.85, 'resnet56': 3.1, 'tiny_resnet': 0.01}
COMPILE_SECONDS = {'resnet20': 60.0, 'resnet56': 200.0, 'tiny_resnet': 10.0}
DOC_BEGIN = '<!-- study: begin (written by python benchmarks/study.py --analyze --doc=FILE) -->'
DOC_END = '<!-- study: end -->'


def num_sites(model: str, data: str) -> int:
  """Binary sites of `model` under the default rules (traced, as train.py does)."""
  from stompp_jax import models, sites  # pylint: disable=g-import-not-at-top  (JAX)
  from stompp_jax.models import inspect  # pylint: disable=g-import-not-at-top
  config = default.get_config().model
  config.name = model
  shape = (16, 16, 3) if data == 'synthetic' else (32, 32, 3)
  net = models.create_model(config, num_classes=10, image_shape=shape)
  return len(sites.discover_sites(inspect.trace_model(net, shape), models.binary_rules(config)))


def run_name(run: dict) -> str:
  return (f"{run['model']}_{run['mode']}_{run['bnn_shortcut']}_{run['method']}_{run['order']}"
          f"_s{run['seed']}")


def plan_runs(args: argparse.Namespace) -> list[dict]:
  """The study's runs, seed-major: dicts with name, group, model, mode, bnn_shortcut, method,
  order, seed (method 'floor' = every site frozen from step 0)."""
  first = args.models[0]
  max_seed = max([*args.seeds.values(), args.ablation_seeds, args.floor_seeds])
  runs = []
  for seed in range(max_seed):
    specs = []
    if 'main' in args.groups:
      for model in args.models:
        if seed < args.seeds[model]:
          methods = args.methods if model == first else args.deep_methods
          specs += [('main', model, 'bnn', r, m, 'layerwise') for r in READINGS for m in methods]
    if 'order' in args.groups and seed < args.ablation_seeds:
      specs += [('order', first, 'bnn', r, 'stompp', o) for r in READINGS for o in ORDERS[1:]]
    if 'floor' in args.groups and seed < args.floor_seeds:
      specs += [('floor', model, 'bnn', r, 'floor', 'layerwise') for model in args.models
                for r in READINGS]
    if 'bwn' in args.groups and seed < args.ablation_seeds:
      specs += [('bwn', first, 'bwn', 'real', 'stompp', o) for o in ('layerwise', 'reverse')]
    for group, model, mode, reading, method, order in specs:
      run = dict(group=group, model=model, mode=mode, bnn_shortcut=reading, method=method,
                 order=order, seed=seed)
      runs.append({'name': run_name(run), **run})
  return runs


def total_steps(sites: int, args: argparse.Namespace) -> int:
  return math.ceil(sites * args.steps_per_site / (1.0 - args.tail))


def make_config(run: dict, sites: int, args: argparse.Namespace):
  """The config of one run: the study's recipe with the run's cell and seed."""
  config = default.get_config()
  config.seed = run['seed']
  config.model.name = run['model']
  config.model.mode = run['mode']
  config.model.bnn_shortcut = run['bnn_shortcut']
  floor = run['method'] == 'floor'
  config.binary.method = 'stompp' if floor else run['method']
  config.binary.order = run['order']
  config.binary.refresh_every = args.refresh
  config.binary.span_start = 0.0
  config.binary.span_end = 0.0 if floor else 1.0 - args.tail  # Unused under window_steps.
  config.binary.window_steps = 0 if floor else args.steps_per_site
  config.data.name = 'cifar10'
  if args.data == 'synthetic':
    config.data.source = 'synthetic'
    config.data.synthetic_image_shape = (16, 16, 3)
    config.data.synthetic_num_classes = NUM_CLASSES['synthetic']
    config.data.synthetic_train_size = 256
    config.data.synthetic_eval_size = EVAL_SIZE['synthetic']
  else:
    config.data.source = 'npz'
    config.data.dir = args.data_dir  # '' = $STOMPP_DATA_DIR.
  steps = total_steps(sites, args)
  config.train.batch_size = args.batch
  config.train.eval_batch_size = args.eval_batch
  config.train.num_steps = steps
  config.train.log_every = max(1, steps // 60)
  config.train.eval_every = max(1, steps // max(args.evals, 1))
  config.train.checkpoint_every = max(1, steps // 4)
  config.train.recalibrate_bn_batches = args.recalibrate
  config.mesh.num_devices = 1
  return config


def estimate_seconds(run: dict, sites: int, args: argparse.Namespace,
                     finished: list[dict]) -> tuple[float, str]:
  """Wall seconds of one run and where the number comes from: --step_seconds if it names the
  model, else the median wall time of the `finished` summaries of the same model, steps and
  batch, else STEP_SECONDS. From step times: train steps, compile, and every eval (3 forward
  passes over the eval split, each about a third of a train step per image) with its
  recalibration."""
  steps = total_steps(sites, args)
  if run['model'] not in args.step_seconds:
    walls = [s['wall_seconds'] for s in finished
             if (s['model'], s['steps'], s['batch']) == (run['model'], steps, args.batch)]
    if walls:
      return statistics.median(walls), f'median of {len(walls)} finished'
  step = args.step_seconds.get(run['model'], STEP_SECONDS.get(run['model'], 1.0))
  step *= args.batch / 64
  per_image_forward = step / args.batch / 3
  evals = max(args.evals, 1) * (3 * EVAL_SIZE[args.data] + args.recalibrate * args.batch)
  source = '--step_seconds' if run['model'] in args.step_seconds else 'STEP_SECONDS'
  return (steps * step + COMPILE_SECONDS.get(run['model'], 60.0)
          + evals * per_image_forward), source


def summary_path(args, name: str) -> str:
  return os.path.join(args.summaries, f'{name}.json')


def summarize_run(run: dict, sites: int, workdir: str, args, wall: float) -> dict:
  """The small JSON summary of a finished run: its cell, config, accuracies and curves."""
  from stompp_jax import analysis  # pylint: disable=g-import-not-at-top
  loaded = analysis.load_run(workdir)
  train_rows, eval_rows = analysis.split_rows(loaded, 'train'), analysis.split_rows(loaded, 'eval')
  final = eval_rows[-1]
  pick = lambda row, keys: {k: round(row[k], 6) for k in keys if k in row}
  eval_keys = ('eval_fully_binary_accuracy', 'eval_fully_binary_recalibrated_accuracy',
               'eval_accuracy', 'eval_fully_binary_loss', 'eval_fully_binary_recalibrated_loss')
  return {
      **run, 'sites': sites, 'steps_per_site': 0 if run['method'] == 'floor' else args.steps_per_site,
      'steps': loaded['config']['train']['num_steps'], 'batch': args.batch, 'data': args.data,
      'as_trained': final.get('eval_fully_binary_accuracy'),
      'recalibrated': final.get('eval_fully_binary_recalibrated_accuracy'),
      'final': pick(final, eval_keys),
      'curves': {'train': [pick(r, ('step', 'loss', 'accuracy')) for r in train_rows],
                 'eval': [pick(r, ('step', *eval_keys)) for r in eval_rows]},
      'config': {'binary': loaded['config']['binary'], 'train': loaded['config']['train'],
                 'model': loaded['config']['model']},
      'wall_seconds': round(wall, 1), 'machine': args.machine or describe_machine(),
  }


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


def execute(runs: list[dict], sites: dict, args: argparse.Namespace) -> list[str]:
  """Trains every run without a summary (resuming it) and writes its summary; returns the
  names of the runs that failed."""
  from stompp_jax import main as cli  # pylint: disable=g-import-not-at-top
  if cli.cpu_only():
    cli.keep_freed_memory()  # As the CLI does, before JAX starts its threads (docs/results.md).
  from stompp_jax import train  # pylint: disable=g-import-not-at-top  (JAX starts here)
  os.makedirs(args.summaries, exist_ok=True)
  failed = []
  for i, run in enumerate(runs):
    tag = f'[{i + 1}/{len(runs)}] {run["name"]}'
    if os.path.exists(summary_path(args, run['name'])):
      print(f'{tag}: done, skipped', flush=True)
      continue
    workdir = os.path.join(args.out, run['name'])
    config = make_config(run, sites[run['model']], args)
    print(f'{tag}: training ({config.train.num_steps} steps)', flush=True)
    start = time.time()
    try:
      final = train.train_and_evaluate(config, workdir)
    except Exception:  # pylint: disable=broad-except  (one failed run must not stop the study)
      traceback.print_exc()
      failed.append(run['name'])
      continue
    if final.get('preempted'):
      print(f'{tag}: stopped at step {final["step"]} (SIGTERM); the same command resumes it',
            flush=True)
      break
    summary = summarize_run(run, sites[run['model']], workdir, args, time.time() - start)
    with open(summary_path(args, run['name']), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=1)
    print(f'{tag}: as trained {_pct(summary["as_trained"])}%, recalibrated '
          f'{_pct(summary["recalibrated"])}% ({time.time() - start:.0f} s)', flush=True)
  return failed


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


def cell_key(s: dict) -> tuple:
  return (s['group'], s['model'], s['mode'], s['bnn_shortcut'], s['method'], s['order'])


def by_seed(summaries: list[dict], metric: str, **cell) -> dict[int, float]:
  """{seed: accuracy} of the runs matching `cell` (model, mode, bnn_shortcut, method, order)."""
  return {s['seed']: s[metric] for s in summaries
          if s.get(metric) is not None and all(s[k] == v for k, v in cell.items())}


def mean_spread(values) -> str:
  values = list(values)
  if not values:
    return '-'
  if len(values) == 1:
    return f'{100 * values[0]:.2f}'  # One seed has no spread: printing ± 0.00 would claim one.
  return f'{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}'


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[str, str]:
  """Whether a > b: 'reproduces' if a beats b in every common seed (2 or more seeds), 'does
  not' if b beats a in every one, else 'cannot tell at this budget'; and the evidence."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return 'not run', 'no common seed'
  diffs = [100 * (a[s] - b[s]) for s in seeds]
  evidence = (f'{statistics.mean(diffs):+.2f} points (seeds: '
              + ', '.join(f'{d:+.2f}' for d in diffs) + ')')
  if len(seeds) >= 2 and all(d > 0 for d in diffs):
    return 'reproduces', evidence
  if len(seeds) >= 2 and all(d < 0 for d in diffs):
    return 'does not', evidence
  return 'cannot tell at this budget', evidence


def grows(shallow: dict[int, float], deep: dict[int, float]) -> tuple[str, str]:
  """Whether per-seed gains grow from the shallow to the deep model: every deep gain above
  every shallow one (2+ seeds each) reproduces, every one below does not."""
  if len(shallow) < 1 or len(deep) < 1:
    return 'not run', 'missing gains'
  evidence = (f'gain {statistics.mean(shallow.values()) * 100:+.2f} -> '
              f'{statistics.mean(deep.values()) * 100:+.2f} points')
  if min(len(shallow), len(deep)) >= 2:
    if min(deep.values()) > max(shallow.values()):
      return 'reproduces', evidence
    if max(deep.values()) < min(shallow.values()):
      return 'does not', evidence
  return 'cannot tell at this budget', evidence


def insensitive(a: dict[int, float], b: dict[int, float], tolerance: float) -> tuple[str, str]:
  """Whether a and b are equal within `tolerance` (fraction): 'reproduces' if they are in every
  common seed (2 or more), 'does not' if a - b is beyond it with one sign in every seed, else
  'cannot tell at this budget'; and the evidence."""
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return 'not run', 'no common seed'
  diffs = [a[s] - b[s] for s in seeds]
  evidence = (f'{100 * statistics.mean(diffs):+.2f} points (seeds: '
              + ', '.join(f'{100 * d:+.2f}' for d in diffs) + ')')
  if len(seeds) >= 2 and all(abs(d) <= tolerance for d in diffs):
    return 'reproduces', evidence
  if (len(seeds) >= 2 and all(abs(d) > tolerance for d in diffs)
      and len({d > 0 for d in diffs}) == 1):
    return 'does not', evidence
  return 'cannot tell at this budget', evidence


def findings(summaries: list[dict], metric: str,
             planned: list[dict] | None = None) -> list[tuple[str, str | None, tuple[str, str]]]:
  """(finding, reading or None where the reading does not apply, (verdict, evidence)) for each
  of the papers' findings whose cells are all `planned` (runs or summaries; default: the
  summaries), models shallow first as planned."""
  planned = summaries if planned is None else planned
  models = list(dict.fromkeys(r['model'] for r in planned if r['group'] == 'main'))
  kinds = {(r['model'], r['mode'], r['bnn_shortcut'], r['method'], r['order']) for r in planned}
  found = []

  def cell(model, reading, method, order='layerwise', mode='bnn'):
    # (model, mode, reading, method, order) names one cell: no two groups share one.
    return by_seed(summaries, metric, model=model, mode=mode, bnn_shortcut=reading,
                   method=method, order=order)

  def add(finding, reading, cells, judge):
    """Judges the cells ((model, reading, method, order, mode) tuples) if all are planned."""
    if all((m, mode, r, method, order) in kinds for m, r, method, order, mode in cells):
      found.append((finding, reading, judge(*(cell(*c) for c in cells))))

  for reading in READINGS:
    bnn = lambda model, method, order='layerwise': (model, reading, method, order, 'bnn')  # pylint: disable=cell-var-from-loop
    for model in models:
      add(f'StoMPP beats STE, {model}', reading,
          [bnn(model, 'stompp'), bnn(model, 'ste')], compare)
      add(f'StoMPP+STE beats StoMPP, {model}', reading,
          [bnn(model, 'stompp_ste'), bnn(model, 'stompp')], compare)
      add(f'STE is above the floor, {model}', reading,
          [bnn(model, 'ste'), bnn(model, 'floor')], compare)
    if len(models) > 1:
      shallow, deep = models[0], models[-1]
      add(f"StoMPP's gain over STE grows with depth, {shallow} -> {deep}", reading,
          [bnn(m, method) for m in (shallow, deep) for method in ('stompp', 'ste')],
          lambda a, b, c, d: grows(_differences(a, b), _differences(c, d)))
      add(f'STE falls with depth, {shallow} -> {deep}', reading,
          [bnn(shallow, 'ste'), bnn(deep, 'ste')], compare)
    if models:
      first = models[0]
      add(f'layerwise beats reverse, {first}', reading,
          [bnn(first, 'stompp'), bnn(first, 'stompp', 'reverse')], compare)
      add(f'reverse collapses (the floor beats it), {first}', reading,
          [bnn(first, 'floor'), bnn(first, 'stompp', 'reverse')], compare)
      add(f'layerwise beats global, {first}', reading,
          [bnn(first, 'stompp'), bnn(first, 'stompp', 'global')], compare)
  for model in dict.fromkeys(r['model'] for r in planned if r['group'] == 'bwn'):
    add(f'BWN is order-insensitive (layerwise = reverse within 1 point), {model}', None,
        [(model, 'real', 'stompp', order, 'bwn') for order in ('layerwise', 'reverse')],
        lambda a, b: insensitive(a, b, 0.01))
  return found


def _differences(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
  """{seed: a - b} over the common seeds."""
  return {seed: a[seed] - b[seed] for seed in set(a) & set(b)}


def verdicts(summaries: list[dict], metric: str, planned: list[dict] | None = None) -> list[str]:
  """One line per finding and reading: '- finding [reading]: **verdict** (evidence)'."""
  return [f'- {finding}{f" [{reading}]" if reading else ""}: **{verdict}** ({evidence})'
          for finding, reading, (verdict, evidence) in findings(summaries, metric, planned)]


def results_markdown(summaries: list[dict], planned: list[dict] | None = None) -> str:
  """The cell table (mean ± std over seeds) and the verdicts, as trained and recalibrated."""
  cells = collections.defaultdict(list)
  for s in summaries:
    cells[cell_key(s)].append(s)
  lines = ['Fully binary test accuracy, %: mean ± sample standard deviation over seeds (a cell'
           ' of one seed: its value, no spread), as trained (running BatchNorm statistics) and'
           ' recalibrated (re-estimated on the fully binary network). `steps/site` = window'
           ' steps per binary site (0: the floor, frozen from step 0).', '',
           '| group | model | mode | bnn_shortcut | method | order | sites | steps/site | steps |'
           ' seeds | as trained | recalibrated | wall s (median) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for key in sorted(cells, key=lambda k: (GROUPS.index(k[0]), *k[1:])):
    runs = cells[key]
    group, model, mode, reading, method, order = key
    lines.append(
        f'| {group} | {model} | {mode} | {reading} | {method} | {order} | {runs[0]["sites"]} |'
        f' {runs[0]["steps_per_site"]} | {runs[0]["steps"]} | {len(runs)} |'
        f' {mean_spread(r["as_trained"] for r in runs if r["as_trained"] is not None)} |'
        f' {mean_spread(r["recalibrated"] for r in runs if r["recalibrated"] is not None)} |'
        f' {statistics.median(r["wall_seconds"] for r in runs):.0f} |')
  for metric, title in (('as_trained', 'as trained'), ('recalibrated', 'recalibrated')):
    lines += ['', f'Verdicts, accuracies {title} ("reproduces" = in every seed, 2 or more):', '']
    lines += verdicts(summaries, metric, planned)
  return '\n'.join(lines) + '\n'


DOC_ROWS = (  # (label, mode, method, order): the rows of the docs' table, per model.
    ('floor (every site frozen from step 0)', 'bnn', 'floor', 'layerwise'),
    ('STE', 'bnn', 'ste', 'layerwise'),
    ('StoMPP layerwise', 'bnn', 'stompp', 'layerwise'),
    ('StoMPP+STE', 'bnn', 'stompp_ste', 'layerwise'),
    ('StoMPP global', 'bnn', 'stompp', 'global'),
    ('StoMPP reverse', 'bnn', 'stompp', 'reverse'),
)


def _cell_text(summaries: list[dict], planned: list[dict], **cell) -> str:
  """'as trained (recalibrated)' of one cell, mean ± std over its seeds, and how many of the
  planned seeds it has when not all."""
  match = lambda r: all(r[k] == v for k, v in cell.items())
  runs = [s for s in summaries if match(s) and s['as_trained'] is not None]
  wanted = sum(map(match, planned))
  if not runs:
    return 'not run yet' if wanted else 'not planned'
  text = (f'{mean_spread(r["as_trained"] for r in runs)}'
          f' ({mean_spread(r["recalibrated"] for r in runs if r["recalibrated"] is not None)})')
  return text + (f', {len(runs)} of {wanted} seeds' if len(runs) < wanted else '')


def _finding_text(as_trained: tuple[str, str], recalibrated: tuple[str, str]) -> str:
  (verdict, evidence), (verdict_r, evidence_r) = as_trained, recalibrated
  if verdict == 'not run':
    return 'not run yet'
  if verdict == verdict_r:
    return f'{verdict}: {evidence}; recalibrated {evidence_r}'
  return f'{verdict} as trained: {evidence}; {verdict_r} recalibrated: {evidence_r}'


def doc_block(summaries: list[dict], planned: list[dict]) -> str:
  """The block of docs/results.md: the status, a table per model (readings as columns,
  'as trained (recalibrated)') and the findings table (a verdict per finding and reading)."""
  names = {r['name'] for r in planned}
  summaries = [s for s in summaries if s['name'] in names]
  left = [r['name'] for r in planned if r['name'] not in {s['name'] for s in summaries}]
  hours = sum(s['wall_seconds'] for s in summaries) / 3600
  lines = [f'**Status: {len(summaries)} of {len(planned)} runs done** ({hours:.1f} hours: the'
           " finished runs' wall times summed)."
           + (f' Not yet run: {", ".join(left)}.' if left else ''), '']
  order = {r['model']: i for i, r in reversed(list(enumerate(planned)))}
  for model in sorted({r['model'] for r in planned}, key=order.get):
    ran = [s for s in summaries if s['model'] == model and s['method'] != 'floor']
    title = (f'{model} ({ran[0]["sites"]} sites, {ran[0]["steps_per_site"]} steps/site,'
             f' {ran[0]["steps"]} steps x {ran[0]["batch"]})' if ran else model)
    lines += [f'| {title} | `bnn_shortcut=real` | `bnn_shortcut=binarized` |', '|---|---|---|']
    for label, mode, method, kind in DOC_ROWS:
      cells = [_cell_text(summaries, planned, model=model, mode=mode, bnn_shortcut=reading,
                          method=method, order=kind) for reading in READINGS]
      if cells != ['not planned'] * len(READINGS):
        lines.append(f'| {label} | {" | ".join(cells)} |')
    bwn = [_cell_text(summaries, planned, model=model, mode='bwn', method='stompp', order=kind)
           for kind in ('layerwise', 'reverse')]
    if bwn != ['not planned'] * 2:
      lines.append(f'| BWN StoMPP layerwise / reverse | {" / ".join(bwn)} | (not applicable) |')
    lines.append('')
  trained = findings(summaries, 'as_trained', planned)
  recalibrated = findings(summaries, 'recalibrated', planned)
  rows = collections.OrderedDict()
  for (finding, reading, result), (_, _, result_r) in zip(trained, recalibrated):
    rows.setdefault(finding, {})[reading] = _finding_text(result, result_r)
  lines += ['| finding | `real` | `binarized` |', '|---|---|---|']
  for finding, by_reading in rows.items():
    cells = ([by_reading[None], '(not applicable)'] if None in by_reading
             else [by_reading.get(reading, '-') for reading in READINGS])
    lines.append(f'| {finding} | {" | ".join(cells)} |')
  return '\n'.join(lines + ['', *_recalibration_lines(summaries), '',
                             *_reading_lines(summaries, planned)]) + '\n'


def _recalibration_lines(summaries: list[dict]) -> list[str]:
  """What re-estimating the BatchNorm statistics changed, per mode and method (the export's
  --recalibrate_bn_batches default is decided from it)."""
  changes = collections.defaultdict(list)
  for s in summaries:
    if s['as_trained'] is not None and s['recalibrated'] is not None:
      changes[(s['mode'], s['method'])].append(100 * (s['recalibrated'] - s['as_trained']))
  return ['Recalibrated minus as trained, points, over the finished runs: ' + '; '.join(
      f'{mode.upper()} {method} {statistics.mean(d):+.2f} ({len(d)} runs, {min(d):+.2f} to'
      f' {max(d):+.2f})' for (mode, method), d in sorted(changes.items())) + '.']


def _reading_lines(summaries: list[dict], planned: list[dict]) -> list[str]:
  """`real` minus `binarized` per model and main-group method, as trained (the
  model.bnn_shortcut default is decided from it)."""
  parts = []
  for model, method in dict.fromkeys((r['model'], r['method']) for r in planned
                                     if r['group'] in ('main', 'floor')):
    real, binarized = (by_seed(summaries, 'as_trained', model=model, mode='bnn', bnn_shortcut=r,
                               method=method, order='layerwise') for r in READINGS)
    if set(real) & set(binarized):
      parts.append(f'{model} {method} {compare(real, binarized)[1]}')
  return ['`bnn_shortcut=real` minus `binarized`, as trained: '
          + ('; '.join(parts) if parts else 'no common seed yet') + '.']


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


def write_doc_block(path: str, block: str):
  """Replaces the text between DOC_BEGIN and DOC_END in `path` (atomically)."""
  head, tail = read_doc(path)
  temporary = f'{path}.tmp'
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(head + block + tail)
  os.replace(temporary, path)


def write_plots(summaries: list[dict], out: str) -> list[str]:
  """accuracy_vs_depth.png (per reading, methods and floor, both metrics) and order.png, each
  with a line at chance."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  chance = 100 / NUM_CLASSES[summaries[0]['data']]
  written = []
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, reading in zip(axes, READINGS):
    for method in (*MAIN_METHODS, 'floor'):
      for metric, style in (('as_trained', '-'), ('recalibrated', '--')):
        points = collections.defaultdict(list)
        for s in summaries:
          if (s['bnn_shortcut'] == reading and s['method'] == method and s['mode'] == 'bnn'
              and s['order'] == 'layerwise' and s[metric] is not None):
            points[s['sites']].append(100 * s[metric])
        if points:
          x = sorted(points)
          ax.errorbar(x, [statistics.mean(points[k]) for k in x],
                      yerr=[statistics.stdev(points[k]) if len(points[k]) > 1 else 0 for k in x],
                      linestyle=style, marker='o', capsize=3, label=f'{method} ({metric})')
    ax.axhline(chance, color='gray', linestyle=':', label='chance')
    ax.set_title(f'BNN, bnn_shortcut={reading}')
    ax.set_xlabel('binary sites')
    ax.legend(fontsize=6)
  axes[0].set_ylabel('fully binary test accuracy, %')
  written.append(os.path.join(out, 'accuracy_vs_depth.png'))
  fig.savefig(written[-1], dpi=100, bbox_inches='tight')
  plt.close(fig)
  first = min(summaries, key=lambda s: s['sites'])['model']  # The ablations' model.
  labels = collections.defaultdict(list)
  for s in summaries:
    if s['model'] == first and s['method'] in ('stompp', 'floor') and s['as_trained'] is not None:
      method = 'floor' if s['method'] == 'floor' else s['order']
      labels[f"{s['mode']} {s['bnn_shortcut']}\n{method}"].append(100 * s['as_trained'])
  if labels:
    fig, ax = plt.subplots(figsize=(max(6, len(labels)), 4))
    names = sorted(labels)
    ax.bar(range(len(names)), [statistics.mean(labels[n]) for n in names],
           yerr=[statistics.stdev(labels[n]) if len(labels[n]) > 1 else 0 for n in names],
           capsize=3)
    ax.axhline(chance, color='gray', linestyle=':', label='chance')
    ax.legend(fontsize=7)
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_ylabel('fully binary test accuracy, % (as trained)')
    ax.set_title(f'{first}: order ablation, BWN and the floor (StoMPP)')
    written.append(os.path.join(out, 'order.png'))
    fig.savefig(written[-1], dpi=100, bbox_inches='tight')
    plt.close(fig)
  return written


def analyze(args) -> str:
  """Writes --summaries/results.md and --summaries/plots/; returns the markdown."""
  if args.doc:
    read_doc(args.doc)  # A bad --doc fails before anything is written.
  summaries, planned = load_summaries(args.summaries), plan_runs(args)
  text = results_markdown(summaries, planned)
  os.makedirs(args.summaries, exist_ok=True)
  with open(os.path.join(args.summaries, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  if summaries:
    write_plots(summaries, os.path.join(args.summaries, 'plots'))
  if args.doc:
    write_doc_block(args.doc, doc_block(summaries, planned))
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
      _fail(f'{what} {item!r} is not NAME:NUMBER: write e.g. resnet20:3,resnet56:2')
  return out


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='runs/study15', help='Run directories (git-ignored).')
  parser.add_argument('--summaries', default='docs/results/study',
                      help='One JSON summary per finished run (committed), results.md, plots/.')
  parser.add_argument('--models', default='resnet20,resnet56',
                      help='Comma-separated, shallow first; the first also gets the ablations.')
  parser.add_argument('--seeds', default='resnet20:3,resnet56:3',
                      help='Seeds of the main group per model, NAME:N,...')
  parser.add_argument('--methods', default=','.join(MAIN_METHODS),
                      help='Main-group methods of the first model.')
  parser.add_argument('--deep_methods', default='ste,stompp',
                      help='Main-group methods of the other models (cut to fit the budget).')
  parser.add_argument('--ablation_seeds', type=int, default=3, help='Seeds of order and bwn.')
  parser.add_argument('--floor_seeds', type=int, default=3, help='Seeds of the floor.')
  parser.add_argument('--groups', default=','.join(GROUPS), help=f'Comma-separated of {GROUPS}.')
  parser.add_argument('--steps_per_site', type=int, default=6,
                      help='binary.window_steps (6: the CPU study; the GPU script uses 40).')
  parser.add_argument('--tail', type=float, default=0.2,
                      help='Fraction of the run after the progression (fully binary training).')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--eval_batch', type=int, default=500)
  parser.add_argument('--evals', type=int, default=1, help='Evaluations per run (last at the end).')
  parser.add_argument('--recalibrate', type=int, default=20,
                      help='train.recalibrate_bn_batches of every run.')
  parser.add_argument('--refresh', type=int, default=10, help='Soft refresh period in steps.')
  parser.add_argument('--data', default='npz', choices=('npz', 'synthetic'))
  parser.add_argument('--data_dir', default='', help="npz directory; '' = $STOMPP_DATA_DIR.")
  parser.add_argument('--machine', default='', help='Machine description for the summaries.')
  parser.add_argument('--step_seconds', default='',
                      help='Measured s/step at batch 64 for --plan, NAME:S,... (else STEP_SECONDS).')
  parser.add_argument('--compile_cache', default=os.path.join('~', '.cache', 'stompp_jax', 'jax_cache'),
                      help="Persistent JAX compilation cache ('' = none); seeds share compiles.")
  parser.add_argument('--only', default='', help='Run only these runs, in this order (comma-separated names).')
  parser.add_argument('--plan', action='store_true', help='Print the runs and the time estimate.')
  parser.add_argument('--names', action='store_true', help='Print the run names, one a line.')
  parser.add_argument('--analyze', action='store_true', help='Only write results.md and plots.')
  parser.add_argument('--doc', default='',
                      help='With --analyze: also rewrite the block of this file between the'
                      ' study markers (docs/results.md): status, tables, findings.')
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  args.groups = [g for g in args.groups.split(',') if g]
  args.methods = [m for m in args.methods.split(',') if m]
  args.deep_methods = [m for m in args.deep_methods.split(',') if m]
  args.seeds = _mapping(args.seeds, '--seeds', int)
  args.step_seconds = _mapping(args.step_seconds, '--step_seconds', float)
  args.only = [n for n in args.only.split(',') if n]
  if not args.models:
    _fail('--models is empty: name at least one model, e.g. --models=resnet20')
  unknown = set(args.groups) - set(GROUPS)
  if unknown:
    _fail(f'unknown --groups {sorted(unknown)}: choose from {", ".join(GROUPS)}')
  bad = set(args.methods + args.deep_methods) - set(MAIN_METHODS)
  if bad:
    _fail(f'unknown methods {sorted(bad)}: choose from {", ".join(MAIN_METHODS)}')
  for model in args.models:
    args.seeds.setdefault(model, 1)
  if args.steps_per_site < 1 or not 0.0 <= args.tail < 1.0:
    _fail(f'--steps_per_site={args.steps_per_site} and --tail={args.tail}: use >= 1 and [0, 1)')
  return args


def print_plan(runs: list[dict], sites: dict, args: argparse.Namespace):
  """One line per run (steps, sites, estimate, done or not) and the hours still to run."""
  finished = load_summaries(args.summaries)
  done = {s['name'] for s in finished}
  total = 0.0
  for run in runs:
    seconds, source = estimate_seconds(run, sites[run['model']], args, finished)
    total += 0.0 if run['name'] in done else seconds
    print(f"{run['name']} ({run['group']}{', done' if run['name'] in done else ''}): "
          f"{total_steps(sites[run['model']], args)} steps x {args.batch}, "
          f"{sites[run['model']]} sites x {args.steps_per_site} steps, ~{seconds / 60:.0f} min"
          f" ({source})")
  print(f'{len(runs)} runs, {len(done & {r["name"] for r in runs})} done, ~{total / 3600:.1f}'
        ' hours of this machine still to run (2 cores in use by one process)')


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.analyze:
    print(analyze(args), flush=True)
    return 0
  runs = plan_runs(args)
  names = {r['name'] for r in runs}
  missing = [n for n in args.only if n not in names]
  if missing:
    _fail(f'--only names {missing} are not runs of this plan: list them with --names')
  if args.only:
    by_name = {r['name']: r for r in runs}
    runs = [by_name[name] for name in dict.fromkeys(args.only)]  # In the order given.
  if args.names:
    print('\n'.join(r['name'] for r in runs))
    return 0
  sites = {model: num_sites(model, args.data) for model in args.models}
  if args.plan:
    print_plan(runs, sites, args)
    return 0
  if args.compile_cache:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(args.compile_cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  failed = execute(runs, sites, args)
  if failed:
    print(f'Failed runs: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
