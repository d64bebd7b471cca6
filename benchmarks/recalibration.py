"""Which methods should have their BatchNorm statistics re-estimated before they are evaluated and
exported? Decided per method by a rule fixed before the runs (below), on data that the
equal-epochs study (benchmarks/study.py) does not use.

    python benchmarks/recalibration.py             # the runs (resumable), then the decisions
    python benchmarks/recalibration.py --analyze   # the decisions from the committed summaries

Every run is the quickstart's budget (configs/quickstart.py:METHOD: CIFAR ResNet-20 BNN, 400
steps at batch 128) with seed S and train.recalibrate_bn_batches=RECALIBRATE, so that its last
evaluation reports the fully binary accuracy as trained (running statistics) and with the
statistics re-estimated on RECALIBRATE training batches, on each dataset of --datasets:
  digits      the built-in handwritten digits (8x8, 360 test images: one image is 0.28 points);
  cifar10_16  CIFAR-10 (JPEG copy) pooled to 16x16 (benchmarks/prepare_cifar16.py, --cifar16_dir).
Each finished run writes --summaries/DATASET_METHOD_sS.json; a run with a summary is skipped.

The rule, per method, with gain = recalibrated - as trained, paired by seed:
  "recalibrate"  the one-sided 95% lower bound of the gain is above 0 and the mean gain is at
                 least GAIN_MIN;
  "as trained"   the one-sided 95% upper bound of the gain is below GAIN_MIN (re-estimating
                 cannot buy that much);
  "cannot tell"  otherwise.
A method's default is "recalibrate" when every dataset says so, "as trained" otherwise (it needs
no data); a method where the datasets disagree is reported as such.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study  # noqa: E402  (benchmarks/study.py: the interval helpers and run metadata)

METHODS = ('ste', 'stompp', 'stompp_ste')
DATASETS = ('digits', 'cifar10_16')
SEEDS = 3
RECALIBRATE = 50  # Training batches the statistics are re-estimated on.
GAIN_MIN = 0.01  # One point of accuracy.


def summary_path(args, dataset: str, method: str, seed: int) -> str:
  return os.path.join(args.summaries, f'{dataset}_{method}_s{seed}.json')


def run(args, dataset: str, method: str, seed: int) -> dict:
  """Trains one run at the quickstart's budget and returns its summary."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top  (JAX)
  from stompp_jax import train  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config(f'{method},digits')
  if dataset == 'cifar10_16':
    config.data.name, config.data.source = 'cifar10', 'npz'
    config.data.dir = os.path.expanduser(args.cifar16_dir)
  config.seed = seed
  config.train.recalibrate_bn_batches = RECALIBRATE
  config.mesh.num_devices = 1
  workdir = os.path.join(args.out, f'{dataset}_{method}_s{seed}')
  final = train.train_and_evaluate(config, workdir)
  return {
      'method': method, 'seed': seed, 'data': dataset, 'steps': config.train.num_steps,
      'batch': config.train.batch_size, 'recalibrate_bn_batches': RECALIBRATE,
      'as_trained': round(final['eval_fully_binary_accuracy'], 6),
      'recalibrated': round(final['eval_fully_binary_recalibrated_accuracy'], 6),
      'command': f'python benchmarks/recalibration.py --datasets={dataset} --seeds={args.seeds}',
      'machine': study.describe_machine(), 'code_commit': study.code_commit(),
  }


def decide(gains: list[float]) -> tuple[str, 'study.Estimate | None']:
  """The rule of the module docstring on one method's per-seed gains."""
  estimate = study.one_sample(gains)
  if estimate is None:
    return 'cannot tell', None
  if estimate.lower > 0 and estimate.mean >= GAIN_MIN:
    return 'recalibrate', estimate
  if estimate.upper < GAIN_MIN:
    return 'as trained', estimate
  return 'cannot tell', estimate


def analyze(args) -> str:
  """A markdown table (per dataset and method: accuracies as means over seeds, the gain, the
  decision) and each method's default."""
  lines = ['| data | method | seeds | as trained | recalibrated | gain | decision |',
           '|---|---|---|---|---|---|---|']
  verdicts = {method: [] for method in METHODS}
  for dataset in args.datasets:
    for method in METHODS:
      rows = []
      for seed in range(args.seeds):
        path = summary_path(args, dataset, method, seed)
        if os.path.exists(path):
          with open(path, encoding='utf-8') as f:
            rows.append(json.load(f))
      if not rows:
        continue
      verdict, estimate = decide([r['recalibrated'] - r['as_trained'] for r in rows])
      verdicts[method].append(verdict)
      mean = lambda key: 100 * sum(r[key] for r in rows) / len(rows)
      gain = estimate.text() if estimate else 'one seed'
      lines.append(f'| {dataset} | {method} | {len(rows)} | {mean("as_trained"):.2f} |'
                   f' {mean("recalibrated"):.2f} | {gain} | {verdict} |')
  lines.append('')
  for method, found in verdicts.items():
    complete = len(found) == len(args.datasets)
    default = 'recalibrate' if complete and set(found) == {'recalibrate'} else 'as trained'
    lines.append(f'- {method}: default {default}'
                 + ('' if complete else ' (not every dataset has run)')
                 + (' (the datasets disagree)' if len(set(found)) > 1 else ''))
  return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's arguments, --datasets as a list."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  parser.add_argument('--analyze', action='store_true', help='Only print the decisions.')
  parser.add_argument('--datasets', default=','.join(DATASETS),
                      help=f'Comma-separated of {DATASETS}.')
  parser.add_argument('--cifar16_dir', default='~/stompp_data/cifar10_16',
                      help='train.npz/test.npz of benchmarks/prepare_cifar16.py.')
  parser.add_argument('--seeds', type=int, default=SEEDS)
  parser.add_argument('--out', default='runs/recalibration', help='Run directories (ignored).')
  parser.add_argument('--summaries', default='docs/results/recalibration')
  args = parser.parse_args(argv)
  args.datasets = args.datasets.split(',')
  unknown = sorted(set(args.datasets) - set(DATASETS))
  if unknown:
    parser.error(f'--datasets: unknown {", ".join(unknown)}; use some of {", ".join(DATASETS)}')
  return args


def main() -> None:
  args = parse_args()
  if not args.analyze:
    os.makedirs(args.summaries, exist_ok=True)
    for dataset in args.datasets:
      for seed in range(args.seeds):
        for method in METHODS:
          path = summary_path(args, dataset, method, seed)
          if os.path.exists(path):
            continue
          summary = run(args, dataset, method, seed)
          with open(path + '.tmp', 'w', encoding='utf-8') as f:
            json.dump(summary, f, indent=1)
          os.replace(path + '.tmp', path)
          print(f'{os.path.basename(path)}: as trained {summary["as_trained"]:.4f},'
                f' recalibrated {summary["recalibrated"]:.4f}', flush=True)
  print(analyze(args))


if __name__ == '__main__':
  main()
