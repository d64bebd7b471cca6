"""Metric aggregation (clu.metrics) and writers: metrics.jsonl and TensorBoard (tensorboardX).

Only process 0 writes. Each row of metrics.jsonl is one JSON object:
{"step": int, "split": "train" | "eval", ...scalars, optional lists (per-site values)}.
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
    """Appends one row; list values (per site) become one TensorBoard scalar per entry."""
    if not self._active:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: _to_python(v) for k, v in values.items()})
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for name, value in row.items():
      if name in ('step', 'split') or value is None:
        continue
      if isinstance(value, list):
        for i, v in enumerate(value):
          if v is not None:
            self._tensorboard.add_scalar(f'{split}/{name}/site_{i:02d}', v, step)
      else:
        self._tensorboard.add_scalar(f'{split}/{name}', value, step)

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()


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
