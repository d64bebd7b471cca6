"""Small-scale reproduction study at a CPU budget: CIFAR ResNet BNNs, STE vs StoMPP vs StoMPP+STE.

    STOMPP_DATA_DIR=/path/to/cifar10_jpeg python benchmarks/study.py --out=runs/study \
      --models=resnet20,resnet56 --seeds=2 --steps=300 --groups=main,order,bwn

Runs (each in its own directory under --out, named model_mode_method_order_sSEED):
  main   every --models model, BNN, x {ste, stompp, stompp_ste} x --seeds seeds;
  order  the first model, BNN StoMPP (STE-free) with global and reverse order
         (layerwise is the main group's run) x --ablation_seeds seeds;
  bwn    the first model, BWN with ste and stompp x --ablation_seeds seeds.
Runs are taken seed-major (every seed-0 run first), so a study cut short has the most useful
runs done. Every run uses the same recipe (METHOD.md's matched minimal recipe at a small budget):
SGD momentum 0.9, constant lr 0.1, batch --batch, --steps steps, the whole freezing schedule
compressed into the run (span 0 .. 0.8 of the steps), soft refresh every --refresh steps,
standard CIFAR augmentation, and the full test split evaluated --evals times (the last at the
end). Same seed = same init, masks and data order for every method.

A finished run (done.json) is skipped; an unfinished one resumes from its checkpoint, so the
same command continues an interrupted study. At the end (and with --table_only) the study
writes, from every run under --out:
  --out/results.md       per-run table and the mean over seeds per (model, mode, method, order);
  --out/results.json     the same rows, machine readable;
  --out/plots/*.png      stompp_jax.analysis plots (curves per model, frozen heatmaps,
                         accuracy vs depth).

--data=synthetic with --models=tiny_resnet is a seconds-long smoke test (used by the tests).
Accuracies on the CIFAR-10 JPEG copy are "CIFAR-10 (JPEG copy)", not CIFAR-10.
"""

import argparse
import collections
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import default  # noqa: E402
from stompp_jax import analysis  # noqa: E402
from stompp_jax import workdir as workdir_lib  # noqa: E402

MAIN_METHODS = ('ste', 'stompp', 'stompp_ste')
ABLATION_ORDERS = ('global', 'reverse')
BWN_METHODS = ('ste', 'stompp')
GROUPS = ('main', 'order', 'bwn')
WALL_FILE = 'study_wall_seconds.json'


def run_name(model: str, mode: str, method: str, order: str, seed: int) -> str:
  return f'{model}_{mode}_{method}_{order}_s{seed}'


def plan_runs(models, seeds: int, ablation_seeds: int, groups) -> list[dict]:
  """The study's runs, seed-major: [{'name', 'group', 'model', 'mode', 'method', 'order', 'seed'}]."""
  runs = []
  for seed in range(max(seeds, ablation_seeds)):
    specs = []
    if 'main' in groups and seed < seeds:
      specs += [('main', m, 'bnn', method, 'layerwise') for m in models for method in MAIN_METHODS]
    if 'order' in groups and seed < ablation_seeds:
      specs += [('order', models[0], 'bnn', 'stompp', order) for order in ABLATION_ORDERS]
    if 'bwn' in groups and seed < ablation_seeds:
      specs += [('bwn', models[0], 'bwn', method, 'layerwise') for method in BWN_METHODS]
    for group, model, mode, method, order in specs:
      runs.append(dict(name=run_name(model, mode, method, order, seed), group=group, model=model,
                       mode=mode, method=method, order=order, seed=seed))
  return runs


def make_config(run: dict, args: argparse.Namespace):
  """The config of one run: the study's recipe with the run's model, mode, method, order, seed."""
  config = default.get_config()
  config.seed = run['seed']
  config.model.name = run['model']
  config.model.mode = run['mode']
  config.binary.method = run['method']
  config.binary.order = run['order']
  config.binary.refresh_every = args.refresh
  config.binary.span_end = 0.8
  config.data.name = 'cifar10'
  if args.data == 'synthetic':
    config.data.source = 'synthetic'
    config.data.synthetic_image_shape = (16, 16, 3)
    config.data.synthetic_num_classes = 4
    config.data.synthetic_train_size = 256
    config.data.synthetic_eval_size = 64
  else:
    config.data.source = 'npz'
    config.data.dir = args.data_dir  # '' = $STOMPP_DATA_DIR.
  config.train.batch_size = args.batch
  config.train.eval_batch_size = args.eval_batch
  config.train.num_steps = args.steps
  config.train.log_every = max(1, args.steps // 60)
  config.train.eval_every = max(1, args.steps // max(args.evals, 1))
  config.train.checkpoint_every = max(1, args.steps // 3)
  config.mesh.num_devices = 1
  return config


def execute(runs: list[dict], args: argparse.Namespace) -> list[str]:
  """Trains every unfinished run (resuming it); returns the names of the runs that failed."""
  from stompp_jax import train  # pylint: disable=g-import-not-at-top  (JAX starts here)
  failed = []
  for i, run in enumerate(runs):
    workdir = os.path.join(args.out, run['name'])
    if os.path.exists(os.path.join(workdir, workdir_lib.DONE)):
      print(f'[{i + 1}/{len(runs)}] {run["name"]}: done, skipped', flush=True)
      continue
    print(f'[{i + 1}/{len(runs)}] {run["name"]}: training ({args.steps} steps)', flush=True)
    start = time.time()
    try:
      final = train.train_and_evaluate(make_config(run, args), workdir)
    except Exception:  # pylint: disable=broad-except  (one failed run must not stop the study)
      traceback.print_exc()
      failed.append(run['name'])
      continue
    finally:
      _add_wall_time(workdir, time.time() - start)
    if final.get('preempted'):
      print(f'[{i + 1}/{len(runs)}] {run["name"]}: stopped at step {final["step"]} (SIGTERM);'
            ' checkpoint saved, the same command resumes it', flush=True)
      break
    accuracy = final.get('eval_fully_binary_accuracy', final.get('eval_accuracy'))
    print(f'[{i + 1}/{len(runs)}] {run["name"]}: step {final["step"]}, fully binary eval accuracy '
          f'{100 * accuracy:.2f}% ({time.time() - start:.0f} s)', flush=True)
  return failed


def _add_wall_time(workdir: str, seconds: float) -> None:
  """Accumulates the wall time spent on a run over resumptions (compile and eval included)."""
  if not os.path.isdir(workdir):
    return
  path = os.path.join(workdir, WALL_FILE)
  total = 0.0
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      total = json.load(f)['seconds']
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'seconds': total + seconds}, f)


def collect(out: str) -> list[dict]:
  """One summary row per run directory under `out` (finished or not)."""
  rows = []
  for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
    workdir = os.path.join(out, name)
    if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG)):
      continue
    run = analysis.load_run(workdir)
    config = run['config']
    train_rows, eval_rows = analysis.split_rows(run, 'train'), analysis.split_rows(run, 'eval')
    wall = None
    if os.path.exists(os.path.join(workdir, WALL_FILE)):
      with open(os.path.join(workdir, WALL_FILE), encoding='utf-8') as f:
        wall = json.load(f)['seconds']
    rows.append(dict(
        name=name, dir=workdir, model=config['model']['name'], mode=config['model']['mode'],
        method=config['binary']['method'], order=config['binary']['order'], seed=config['seed'],
        steps=config['train']['num_steps'], batch=config['train']['batch_size'],
        step=train_rows[-1]['step'] if train_rows else 0, done=run['done'] is not None,
        fully_binary_accuracy=analysis.final_accuracy(run),
        masked_accuracy=eval_rows[-1].get('eval_accuracy') if eval_rows else None,
        eval_step=eval_rows[-1]['step'] if eval_rows else None,
        final_train_loss=train_rows[-1]['loss'] if train_rows else None,
        images_per_second=(statistics.median(r['images_per_second'] for r in train_rows)
                           if train_rows else None),
        wall_seconds=wall))
  return rows


def _pct(value) -> str:
  return '-' if value is None else f'{100 * value:.2f}'


def results_markdown(rows: list[dict]) -> str:
  """The per-run table and the mean over seeds per (model, mode, method, order)."""
  lines = ['Final accuracy of the fully binary network (all masks = 1) on the test split, %.',
           'Only finished runs (done = yes) enter the means.', '',
           '| run | model | mode | method | order | seed | step / steps | done | fully binary acc |'
           ' eval acc (masks of the step) | final train loss | img/s (median) | wall s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    loss = '-' if r['final_train_loss'] is None else f"{r['final_train_loss']:.3f}"
    speed = '-' if r['images_per_second'] is None else f"{r['images_per_second']:.0f}"
    wall = '-' if r['wall_seconds'] is None else f"{r['wall_seconds']:.0f}"
    lines.append(f"| {r['name']} | {r['model']} | {r['mode']} | {r['method']} | {r['order']} |"
                 f" {r['seed']} | {r['step']} / {r['steps']} | {'yes' if r['done'] else 'no'} |"
                 f" {_pct(r['fully_binary_accuracy'])} | {_pct(r['masked_accuracy'])} | {loss} |"
                 f" {speed} | {wall} |")
  groups = collections.defaultdict(list)
  for r in rows:
    if r['done'] and r['fully_binary_accuracy'] is not None:
      groups[(r['model'], r['mode'], r['method'], r['order'])].append(r['fully_binary_accuracy'])
  lines += ['', '| model | mode | method | order | seeds | mean fully binary acc | min | max |',
            '|---|---|---|---|---|---|---|---|']
  for (model, mode, method, order), values in sorted(groups.items()):
    lines.append(f'| {model} | {mode} | {method} | {order} | {len(values)} |'
                 f' {_pct(statistics.mean(values))} | {_pct(min(values))} | {_pct(max(values))} |')
  return '\n'.join(lines) + '\n'


def write_report(out: str) -> list[dict]:
  """results.md, results.json and plots/ from every run under `out`; returns the rows."""
  rows = collect(out)
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(results_markdown(rows))
  with open(os.path.join(out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=2)
  plots = os.path.join(out, 'plots')
  by_model = collections.defaultdict(list)
  for r in rows:
    by_model[r['model']].append(r)
  for model, model_rows in by_model.items():
    main_dirs = [r['dir'] for r in model_rows if r['order'] == 'layerwise' and r['mode'] == 'bnn']
    if main_dirs:
      _plot_curves(main_dirs, os.path.join(plots, f'curves_{model}_bnn.png'), f'{model} BNN')
    others = [r['dir'] for r in model_rows if r['order'] != 'layerwise' or r['mode'] != 'bnn']
    if others:  # The layerwise StoMPP run first: its sites' freezing starts are marked.
      reference = [r['dir'] for r in model_rows if r['mode'] == 'bnn' and r['method'] == 'stompp'
                   and r['order'] == 'layerwise' and r['seed'] == 0]
      _plot_curves(reference + others, os.path.join(plots, f'curves_{model}_ablations.png'),
                   f'{model} ablations')
  for r in rows:
    if r['method'] in ('stompp', 'stompp_ste'):
      run = analysis.load_run(r['dir'])
      if run['rows']:
        _close(analysis.plot_frozen_heatmap(run, os.path.join(plots, f'frozen_{r["name"]}.png')))
  runs = [analysis.load_run(r['dir']) for r in rows if r['done'] and r['mode'] == 'bnn'
          and r['order'] == 'layerwise']
  _close(analysis.plot_accuracy_vs_depth(runs, os.path.join(plots, 'accuracy_vs_depth.png')))
  return rows


def _plot_curves(dirs, path, title):
  runs = [analysis.load_run(d) for d in dirs]
  _close(analysis.plot_curves([r for r in runs if r['rows']], path, title=title))


def _close(fig):
  analysis.plt.close(fig)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default='runs/study', help='Output root: one directory per run.')
  parser.add_argument('--models', default='resnet20,resnet32,resnet56',
                      help='Comma-separated; the first one also gets the ablations.')
  parser.add_argument('--seeds', type=int, default=2, help='Seeds 0..N-1 of the main group.')
  parser.add_argument('--ablation_seeds', type=int, default=1, help='Seeds of order/bwn groups.')
  parser.add_argument('--groups', default='main,order,bwn', help=f'Comma-separated of {GROUPS}.')
  parser.add_argument('--steps', type=int, default=300, help='Train steps of every run.')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--eval_batch', type=int, default=500)
  parser.add_argument('--evals', type=int, default=2, help='Evaluations per run (last at the end).')
  parser.add_argument('--refresh', type=int, default=10, help='Soft refresh period in steps.')
  parser.add_argument('--data', default='npz', choices=('npz', 'synthetic'))
  parser.add_argument('--data_dir', default='', help="npz directory; '' = $STOMPP_DATA_DIR.")
  parser.add_argument('--compile_cache', default=os.path.join('~', '.cache', 'stompp_jax', 'jax_cache'),
                      help="Persistent JAX compilation cache ('' = none); seeds share compiles.")
  parser.add_argument('--dry_run', action='store_true', help='Print the plan and configs only.')
  parser.add_argument('--table_only', action='store_true', help='Only rewrite the table and plots.')
  args = parser.parse_args(argv)
  args.models = [m for m in args.models.split(',') if m]
  args.groups = [g for g in args.groups.split(',') if g]
  unknown = set(args.groups) - set(GROUPS)
  if unknown:
    parser.error(f'unknown --groups {sorted(unknown)}; choose from {GROUPS}')
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  runs = plan_runs(args.models, args.seeds, args.ablation_seeds, args.groups)
  if args.dry_run:
    for run in runs:
      config = make_config(run, args)
      done = os.path.exists(os.path.join(args.out, run['name'], workdir_lib.DONE))
      print(f"{run['name']} ({run['group']}{', done' if done else ''}): seed={config.seed} "
            f"steps={config.train.num_steps} batch={config.train.batch_size} "
            f"refresh={config.binary.refresh_every} eval_every={config.train.eval_every}")
    return 0
  os.makedirs(args.out, exist_ok=True)
  failed = []
  if not args.table_only:
    if args.compile_cache:
      import jax  # pylint: disable=g-import-not-at-top
      jax.config.update('jax_compilation_cache_dir', os.path.expanduser(args.compile_cache))
      jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    failed = execute(runs, args)
  rows = write_report(args.out)
  print(results_markdown(rows), flush=True)
  if failed:
    print(f'Failed runs: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
