"""Plots of training dynamics from run directories (metrics.jsonl + config.json), as PNG.

    python -m stompp_jax.analysis RUN_DIR [RUN_DIR ...] --out=PLOT_DIR

writes to PLOT_DIR:
  curves.png              train loss, train accuracy and eval accuracy (fully binary network) over
                          steps for every run, with the step at which each site starts freezing marked (dotted
                          lines, from the first StoMPP run; the papers' saw-tooth dips sit there);
  frozen_<run>.png        per-site frozen fraction over steps (heatmap), for each StoMPP run;
  accuracy_vs_depth.png   final fully binary eval accuracy against network depth, one line per
                          method (mean over seeds, error bars = min..max); runs of the zoo's
                          ResNets only (RESNET_DEPTHS), other models have no such depth.

A RUN_DIR that does not exist or holds no metrics is refused before anything is written: one line
`Error: ...`, exit status 2.

The functions also work from a notebook: `run = load_run(d)`, `plot_curves([run])`, ...; each
returns the matplotlib Figure and saves it when given `path`. Reading runs needs no matplotlib
(it is imported by the plots only), so a machine without it can still summarize runs.
"""

import argparse
import collections
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from stompp_jax import errors
from stompp_jax import metrics as metrics_lib
from stompp_jax import storage
from stompp_jax import workdir as workdir_lib
from stompp_jax.binary import context as bctx

# The accuracy a run is judged by: the deployed (fully binary) network; fp runs have only eval_*.
FINAL_ACCURACY_KEYS = ('eval_fully_binary_accuracy', 'eval_accuracy')
# The depth of the zoo's ResNets by config.model.name: weighted layers on the main path (convs
# and the classifier, not the shortcut convs), as the names count them.
RESNET_DEPTHS = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50, 'resnet20': 20, 'resnet32': 32,
                 'resnet44': 44, 'resnet56': 56, 'resnet110': 110, 'bireal18': 18,
                 'tiny_resnet': 6}


def load_run(run_dir: str) -> dict[str, Any]:
  """Reads one run directory.

  Returns:
    {'dir', 'name' (the directory's base name), 'config' (dict from config.json, {} if absent),
     'rows' (metrics.jsonl rows in file order), 'done' (done.json contents or None)}.
  """
  def read_json(name):
    text = storage.read_text(storage.path(run_dir) / name)
    return None if text is None else json.loads(text)

  return {'dir': run_dir, 'name': storage.path(run_dir).name,
          'config': read_json(workdir_lib.CONFIG) or {}, 'rows': metrics_lib.read_metrics(run_dir),
          'done': read_json(workdir_lib.DONE)}


def load_runs(run_dirs: Sequence[str]) -> list[dict[str, Any]]:
  """`load_run` of each directory, in order.

  Raises:
    errors.SetupError: a directory that does not exist or holds no metrics.
  """
  runs = [load_run(d) for d in run_dirs]
  for run in runs:
    if not run['rows']:
      what = ('holds no metrics (no rows in metrics.jsonl)' if storage.path(run['dir']).is_dir()
              else 'does not exist')
      raise errors.SetupError(f'Run directory {run["dir"]} {what}: give the --workdir of training'
                              ' runs that have logged a step.')
  return runs


def split_rows(run: dict[str, Any], split: str) -> list[dict]:
  """The run's rows of one split ('train' or 'eval'), in step order."""
  return sorted((r for r in run['rows'] if r.get('split') == split), key=lambda r: r['step'])


def frozen_fractions(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(steps (T,), frozen fraction (T, L) per site in forward order) from the train rows."""
  rows = [r for r in split_rows(run, 'train') if 'frozen_fraction' in r]
  if not rows:
    return np.zeros((0,), int), np.zeros((0, 0))
  return (np.array([r['step'] for r in rows]),
          np.array([r['frozen_fraction'] for r in rows], dtype=float))


def freeze_starts(run: dict[str, Any]) -> list[int | None]:
  """Per site, the first logged step whose frozen fraction is > 0 (None: never logged frozen)."""
  steps, fractions = frozen_fractions(run)
  starts = []
  for site in range(fractions.shape[1]):
    frozen = np.flatnonzero(fractions[:, site] > 0)
    starts.append(int(steps[frozen[0]]) if frozen.size else None)
  return starts


def final_accuracy(run: dict[str, Any]) -> float | None:
  """The last eval row's fully binary accuracy (eval_accuracy for fp runs); None if no eval."""
  rows = split_rows(run, 'eval')
  if not rows:
    return None
  for key in FINAL_ACCURACY_KEYS:
    if key in rows[-1]:
      return float(rows[-1][key])
  return None


def method_of(run: dict[str, Any]) -> str:
  """A label such as 'bnn stompp' (model mode and method; order when not layerwise)."""
  config = run['config']
  model, binary = config.get('model', {}), config.get('binary', {})
  label = f"{model.get('mode', '?')} {binary.get('method', '?')}"
  if (binary.get('order', 'layerwise') != 'layerwise'
      and binary.get('method') in bctx.PROGRESSIVE_METHODS):
    label += f" {binary['order']}"
  return label


def depth_of(run: dict[str, Any]) -> int | None:
  """The depth of the run's ResNet (RESNET_DEPTHS: resnet56 -> 56), None for other models
  (your own model's runs too, whatever their model.name)."""
  model = run['config'].get('model', {})
  return None if model.get('own_class') else RESNET_DEPTHS.get(model.get('name'))


def _pyplot():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top  (plots only)
  return plt


def _save(fig, path: str | None):
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
  return fig


def plot_curves(runs: Sequence[dict[str, Any]], path: str | None = None, title: str = ''):
  """Train loss, train and eval accuracy over steps; dotted lines where each site starts freezing.

  The freezing starts come from the first run of the list that has a progressive schedule
  (StoMPP / StoMPP+STE); runs that share a config but not the seed share these steps.
  """
  fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(11, 4))
  for i, run in enumerate(runs):
    color = f'C{i % 10}'
    train_rows = split_rows(run, 'train')
    if train_rows:
      ax_loss.plot([r['step'] for r in train_rows], [r['loss'] for r in train_rows], color=color,
                   label=run['name'], lw=1)
      ax_acc.plot([r['step'] for r in train_rows], [100 * r['accuracy'] for r in train_rows],
                  color=color, lw=0.8, alpha=0.6)
    eval_rows = [r for r in split_rows(run, 'eval')
                 if any(k in r for k in FINAL_ACCURACY_KEYS)]
    if eval_rows:
      key = next(k for k in FINAL_ACCURACY_KEYS if k in eval_rows[0])
      ax_acc.plot([r['step'] for r in eval_rows], [100 * r[key] for r in eval_rows], 'o-',
                  color=color, label=run['name'], lw=1, ms=3)
  marked = next((r for r in runs
                 if r['config'].get('binary', {}).get('method') in bctx.PROGRESSIVE_METHODS
                 and any(s is not None for s in freeze_starts(r))), None)
  if marked is not None:
    for start in sorted({s for s in freeze_starts(marked) if s is not None}):
      for ax in (ax_loss, ax_acc):
        ax.axvline(start, color='gray', ls=':', lw=0.6, alpha=0.6)
  ax_loss.set(xlabel='step', ylabel='train loss (logged mean)', title='train loss')
  note = f'\ndotted: sites of {marked["name"]} start freezing' if marked is not None else ''
  ax_acc.set(xlabel='step', ylabel='accuracy (%)',
             title='train accuracy (lines), eval accuracy, fully binary (dots)' + note)
  ax_acc.title.set_fontsize(8)
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  ax_loss.legend(fontsize=6)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def plot_frozen_heatmap(run: dict[str, Any], path: str | None = None):
  """Heatmap of each site's frozen fraction (rows: sites, input at the top) over logged steps."""
  steps, fractions = frozen_fractions(run)
  fig, ax = _pyplot().subplots(figsize=(7, 0.12 * max(fractions.shape[1], 8) + 1.5))
  if fractions.size:
    extent = (steps[0], steps[-1], fractions.shape[1] - 0.5, -0.5)
    image = ax.imshow(fractions.T, aspect='auto', interpolation='nearest', cmap='viridis',
                      vmin=0, vmax=1, extent=extent)
    fig.colorbar(image, ax=ax, label='frozen fraction')
  ax.set(xlabel='step', ylabel='site (forward order)', title=f'frozen fraction: {run["name"]}')
  ax.title.set_fontsize(9)
  fig.tight_layout()
  return _save(fig, path)


def accuracy_by_depth(runs: Sequence[dict[str, Any]]) -> dict[str, dict[int, list[float]]]:
  """{method label: {depth: [final fully binary accuracy of each run (seed)]}}."""
  table = collections.defaultdict(lambda: collections.defaultdict(list))
  for run in runs:
    accuracy, depth = final_accuracy(run), depth_of(run)
    if accuracy is not None and depth is not None:
      table[method_of(run)][depth].append(accuracy)
  return {method: dict(by_depth) for method, by_depth in table.items()}


def plot_accuracy_vs_depth(runs: Sequence[dict[str, Any]], path: str | None = None):
  """Final fully binary accuracy vs depth per method: mean over runs, bars = min..max."""
  fig, ax = _pyplot().subplots(figsize=(6, 4))
  table = accuracy_by_depth(runs)
  ax.set_xticks(sorted({d for by_depth in table.values() for d in by_depth}))
  for i, (method, by_depth) in enumerate(sorted(table.items())):
    depths = sorted(by_depth)
    values = [100 * np.array(by_depth[d]) for d in depths]
    means = np.array([v.mean() for v in values])
    bars = np.array([[m - v.min() for m, v in zip(means, values)],
                     [v.max() - m for m, v in zip(means, values)]])
    ax.errorbar(depths, means, yerr=bars, marker='o', capsize=3, label=method, color=f'C{i % 10}')
  ax.set(xlabel='depth', ylabel='final eval accuracy, fully binary (%)',
         title='accuracy vs depth')
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


def write_plots(run_dirs: Sequence[str], out: str) -> list[str]:
  """Writes curves.png, frozen_<run>.png per StoMPP run and accuracy_vs_depth.png; their paths.

  Raises:
    errors.SetupError: a run directory that `load_runs` refuses, or an `out` that cannot be a
      directory (before anything is written).
  """
  runs = load_runs(run_dirs)
  storage.check_output_directory(out, '--out')
  written = []

  def save(fig, name):
    written.append(os.path.join(out, name))
    _save(fig, written[-1])
    _pyplot().close(fig)

  save(plot_curves(runs), 'curves.png')
  for run in runs:
    if (frozen_fractions(run)[1].size
        and run['config'].get('binary', {}).get('method') in bctx.PROGRESSIVE_METHODS):
      save(plot_frozen_heatmap(run), f'frozen_{run["name"]}.png')
  save(plot_accuracy_vs_depth(runs), 'accuracy_vs_depth.png')
  return written


class _ArgumentParser(argparse.ArgumentParser):
  """argparse with its errors in one line `Error: ...` (exit status 2), not the usage text."""

  def error(self, message: str):
    errors.fail(f'{message}: python -m stompp_jax.analysis RUN_DIR [RUN_DIR ...] --out=PLOT_DIR'
                ' (--help says more).', errors.EXIT_BAD_INPUT)


def main(argv: Sequence[str] | None = None) -> None:
  parser = _ArgumentParser(description=__doc__.split('\n\n')[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR')
  parser.add_argument('--out', default='plots', help='Directory for the PNG files.')
  args = parser.parse_args(argv)
  try:
    written = write_plots(args.run_dirs, args.out)
  except errors.SetupError as e:
    errors.fail(str(e), errors.EXIT_BAD_INPUT)
  for path in written:
    print(path)


if __name__ == '__main__':
  main(sys.argv[1:])
