"""Metric aggregation (clu.metrics) and writers: metrics.jsonl and TensorBoard (tensorboardX).

Only process 0 writes. Each row of metrics.jsonl is one JSON object:
{"step": int, "split": "train" | "eval", ...scalars, optional lists (per-site values)}.

TensorBoard gets the same rows under `tensorboard_tag` names (`train/loss`, `eval/accuracy`,
`eval/fully_binary/accuracy`, ...); a per-site list is one histogram per logged step whose
bucket i is site i (height = the site's value), so a 51-site ResNet-50 is one chart, not 51.
`write_config` adds the config as text and as hparams.
"""

import json
import math
import os
from typing import Any, Mapping

import flax.struct
import jax
import numpy as np
from clu import metrics as clu_metrics

from stompp_jax import workdir as workdir_lib


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Averages of the train step outputs over the steps between two log rows."""

  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Average.from_output('accuracy')
  nonfinite: clu_metrics.Average.from_output('nonfinite')


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """Example-weighted averages over an eval split; padded examples have mask 0."""

  loss: clu_metrics.Average.from_output('loss')
  accuracy: clu_metrics.Average.from_output('accuracy')


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    v = value.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v
  return [_to_python(v) for v in value]


class MetricWriter:
  """Writes metric rows to `workdir/metrics.jsonl` and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str, start_step: int = 0):
    """Opens the writers; `start_step` > 0 (a resumed run) makes TensorBoard drop the events a
    killed run logged after that step, as `workdir.trim_metrics` does for metrics.jsonl."""
    self._active = jax.process_index() == 0
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    from tensorboardX import SummaryWriter  # Imported here: only process 0 writes.
    self._jsonl = open(os.path.join(workdir, workdir_lib.METRICS), 'a', encoding='utf-8')
    self._tensorboard = SummaryWriter(logdir=os.path.join(workdir, workdir_lib.TENSORBOARD),
                                      purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
    """Appends one row; on TensorBoard a scalar under `tensorboard_tag`, a list (per site) one
    histogram (`per_site_histogram`)."""
    if not self._active:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: _to_python(v) for k, v in values.items()})
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for name, value in row.items():
      if name in ('step', 'split') or value is None:
        continue
      tag = tensorboard_tag(split, name)
      if isinstance(value, list):
        self._tensorboard.add_histogram_raw(tag, global_step=step, **per_site_histogram(value))
      else:
        self._tensorboard.add_scalar(tag, value, step)

  def write_config(self, config: Mapping[str, Any], step: int = 0) -> None:
    """Adds `config` (nested dict) as a TensorBoard text (JSON) and as hparams (flat fields)."""
    if not self._active:
      return
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    self._tensorboard.add_text('config', '    ' + json.dumps(config, indent=2).replace(
        '\n', '\n    '), step)
    experiment, session_start, _ = summary.hparams(
        flat_hparams(config), {tag: 0.0 for tag in HPARAMS_METRICS})
    for proto in (experiment, session_start):
      self._tensorboard.file_writer.add_summary(proto, step)

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()


# The metrics TensorBoard's hparams view shows beside each run's config.
HPARAMS_METRICS = ('eval/accuracy', 'eval/fully_binary/accuracy')


def tensorboard_tag(split: str, name: str) -> str:
  """The TensorBoard tag of a metrics.jsonl key: `{split}/{name}`, with an eval row's `eval_`
  prefix dropped and `fully_binary_` made a level: eval_fully_binary_accuracy ->
  eval/fully_binary/accuracy."""
  if split == 'eval':
    name = name.removeprefix('eval_')
    if name.startswith('fully_binary_'):
      name = 'fully_binary/' + name.removeprefix('fully_binary_')
  return f'{split}/{name}'


def per_site_histogram(values: list) -> dict[str, Any]:
  """`add_histogram_raw` arguments drawing per-site values as one histogram: bucket i spans
  (i - 1/2, i + 1/2] and its count is site i's value (a missing value counts 0)."""
  counts = [0.0 if v is None else float(v) for v in values]
  positions = np.arange(len(counts), dtype=np.float64)
  total = float(np.sum(counts))
  return dict(min=0.0, max=float(len(counts) - 1), num=total,
              sum=float(np.dot(positions, counts)),
              sum_squares=float(np.dot(positions ** 2, counts)),
              bucket_limits=(positions + 0.5).tolist(), bucket_counts=counts)


def flat_hparams(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for every leaf of a nested config dict; values that are not a bool, a
  number or a string (tuples, None) become their repr."""
  flat = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flat_hparams(value, name + '.'))
    else:
      flat[name] = value if isinstance(value, (bool, int, float, str)) else repr(value)
  return flat


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl` in file order ([] if there is none).

  A last line cut short (the run was killed while writing it) is skipped; the next start of the
  run removes it (`workdir.trim_metrics`).
  """
  path = os.path.join(workdir, workdir_lib.METRICS)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    *complete, last = f.read().split('\n')
  rows = [json.loads(line) for line in complete if line.strip()]
  try:
    rows += [json.loads(last)] if last.strip() else []
  except json.JSONDecodeError:
    pass
  return rows
