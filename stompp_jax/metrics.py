"""Metric aggregation (clu.metrics) and writers: metrics.jsonl and TensorBoard event files.

Only process 0 writes. Each row of metrics.jsonl is one JSON object:
{"step": int, "split": "train" | "eval", ...scalars, optional lists (per-site values)}.

Storage works on object stores (no append): a running writer adds its rows to bounded parts
under metrics.parts/, each rewritten whole at every row, and its TensorBoard events to bounded
event files; closing the writer (or the next start of a killed run, `consolidate`) moves the
parts' rows to the end of metrics.jsonl. `read_metrics` reads both, so a live run is readable.
"""

import json
import math
import socket
import struct
import time
from typing import Any, Mapping

import flax.struct
import jax
import numpy as np
from clu import metrics as clu_metrics
from etils import epath

from stompp_jax import storage
from stompp_jax.workdir import METRICS, METRICS_PARTS, TENSORBOARD


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
  """Writes metric rows to `workdir`'s metrics and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str, start_step: int = 0):
    """Opens the writers; `start_step` > 0 (a resumed run) makes TensorBoard drop the events a
    killed run logged after that step, as `trim` does for the metric rows."""
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._root = storage.path(workdir)
    existing = storage.parts(self._root / METRICS_PARTS, '', '.jsonl')
    first = int(existing[-1].name.split('.')[0]) + 1 if existing else 0
    self._rows = storage.PartLog(self._root / METRICS_PARTS, '', '.jsonl', first_part=first)
    self._events = _EventLog(self._root / TENSORBOARD, start_step + 1 if start_step else None)

  def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
    """Adds one row; list values (per site) become one TensorBoard scalar per entry."""
    if not self._active:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: _to_python(v) for k, v in values.items()})
    self._rows.append((json.dumps(row) + '\n').encode('utf-8'))
    self._rows.flush()
    scalars = {}
    for name, value in row.items():
      if name in ('step', 'split') or value is None:
        continue
      if isinstance(value, list):
        scalars.update({f'{split}/{name}/site_{i:02d}': v for i, v in enumerate(value)
                        if v is not None})
      else:
        scalars[f'{split}/{name}'] = value
    self._events.add_scalars(step, scalars)

  def close(self) -> None:
    if self._active:
      self._rows.flush()
      self._events.flush()
      consolidate(str(self._root))


class _EventLog:
  """TensorBoard event files (TFRecords of Event protos) written as PartLog parts."""

  def __init__(self, logdir: epath.Path, purge_step: int | None):
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    prefix = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
    header = _record(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    self._log = storage.PartLog(logdir, prefix, '', header=header)
    if purge_step is not None:  # TensorBoard drops the earlier files' events from this step on.
      self._log.append(_record(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))))

  def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
    self._log.append(_record(self._event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))))
    self._log.flush()

  def flush(self) -> None:
    self._log.flush()


def _record(event) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the serialized proto, its masked CRC-32C."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top
  data = event.SerializeToString()
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', masked_crc32c(header)) + data
          + struct.pack('<I', masked_crc32c(data)))


def _parse_rows(text: str) -> tuple[list[dict], bool]:
  """The rows of one JSON-lines text, and whether a last line cut short was skipped."""
  *complete, last = text.split('\n')
  rows = [json.loads(line) for line in complete if line.strip()]
  try:
    rows += [json.loads(last)] if last.strip() else []
  except json.JSONDecodeError:
    return rows, True
  return rows, False


def _sources(workdir: str) -> list[epath.Path]:
  root = storage.path(workdir)
  return [root / METRICS, *storage.parts(root / METRICS_PARTS, '', '.jsonl')]


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir`'s metrics.jsonl, then of its parts, in order ([] if there are none).

  A last line cut short (an old run killed while appending it) is skipped; the next start of
  the run removes it (`trim`).
  """
  rows = []
  for source in _sources(workdir):
    text = storage.read_text(source)
    rows += _parse_rows(text)[0] if text is not None else []
  return rows


def trim(workdir: str, step: int) -> None:
  """Drops the rows after `step` (logged by a run that died before its next checkpoint) and
  moves the rows of its parts into metrics.jsonl, on process 0."""
  if jax.process_index() == 0:
    consolidate(workdir, last_step=step)


def consolidate(workdir: str, last_step: int | None = None) -> None:
  """Moves the rows of metrics.parts/ to the end of metrics.jsonl (one rewrite), dropping the
  rows after `last_step` when given and any line cut short; a no-op when nothing changes."""
  sources = _sources(workdir)
  rows, changed = [], len(sources) > 1
  for source in sources:
    text = storage.read_text(source)
    if text is not None:
      parsed, cut = _parse_rows(text)
      rows += parsed
      changed |= cut
  kept = [r for r in rows if last_step is None or r.get('step', 0) <= last_step]
  if not changed and len(kept) == len(rows):
    return
  storage.write_text(sources[0], ''.join(json.dumps(r) + '\n' for r in kept))
  for part in sources[1:]:
    part.unlink()
  if len(sources) > 1 and storage.is_local(sources[1]):
    sources[1].parent.rmdir()  # Object stores have no empty folders to remove.
