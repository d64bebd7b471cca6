"""Metric aggregation (clu.metrics) and writers: metrics.jsonl and TensorBoard event files.

Only process 0 writes. Each row of metrics.jsonl is one JSON object:
{"step": int, "split": "train" | "eval", ...scalars, optional lists (per-site values)}.

TensorBoard gets the same rows under `tensorboard_tag` names (`train/loss`, `eval/accuracy`,
`eval/fully_binary/accuracy`, ...); a per-site list is one histogram per logged step whose
bucket i is site i (height = the site's value), so a 51-site ResNet-50 is one chart, not 51.
`write_config` adds the config as text and as hparams.

Storage works on object stores (no append): a running writer adds its rows to bounded parts
under metrics.parts/, each rewritten whole at every row, and its TensorBoard events to bounded
event files; closing the writer (or the next start of a killed run, `consolidate`) moves the
parts' rows to the end of metrics.jsonl. `read_metrics` reads both, so a live run is readable.
"""

import itertools
import json
import math
import os
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
    """Adds one row; on TensorBoard a scalar under `tensorboard_tag`, a list (per site) one
    histogram (`per_site_histogram`)."""
    if not self._active:
      return
    row = {'step': int(step), 'split': split}
    row.update({k: _to_python(v) for k, v in values.items()})
    self._rows.append((json.dumps(row) + '\n').encode('utf-8'))
    self._rows.flush()
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    summary_values = []
    for name, value in row.items():
      if name in ('step', 'split') or value is None:
        continue
      tag = tensorboard_tag(split, name)
      if isinstance(value, list):
        summary_values += summary.histogram_raw(tag, **per_site_histogram(value)).value
      else:
        summary_values += summary.scalar(tag, value).value
    self._events.add(step, summary_values)

  def write_config(self, config: Mapping[str, Any]) -> None:
    """Adds `config` (nested dict) at step 0 as a TensorBoard text (JSON) and as hparams (flat
    fields)."""
    if not self._active:
      return
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    text = summary.text('config', '    ' + json.dumps(config, indent=2).replace('\n', '\n    '))
    experiment, session_start, _ = summary.hparams(
        flat_hparams(config), {tag: 0.0 for tag in HPARAMS_METRICS})
    for proto in (text, experiment, session_start):
      self._events.add(0, proto.value)

  def close(self) -> None:
    if self._active:
      self._rows.flush()
      self._events.flush()
      consolidate(str(self._root))


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


# Numbers the event logs of this process, so that two started in the same second differ.
_EVENT_LOGS = itertools.count()


class _EventLog:
  """TensorBoard event files (TFRecords of Event protos) written as PartLog parts, named as
  TensorBoard's own writer names them (start time in seconds, host, ...), then the nanoseconds of
  the start, the process id and a per-process counter, zero-padded: TensorBoard reads a
  directory's files in name order, which is then the order they were started in, also for
  writers started in the same second."""

  def __init__(self, logdir: epath.Path, purge_step: int | None):
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    seconds, nanoseconds = divmod(time.time_ns(), 10**9)
    prefix = (f'events.out.tfevents.{seconds:010d}.{socket.gethostname()}.{nanoseconds:09d}.'
              f'{os.getpid():07d}.{next(_EVENT_LOGS):06d}.')
    header = _record(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
    self._log = storage.PartLog(logdir, prefix, '', header=header)
    if purge_step is not None:  # TensorBoard drops the earlier files' events from this step on.
      self._log.append(_record(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))))

  def add(self, step: int, values) -> None:
    """Writes one event of Summary.Value protos (scalars, histograms, text, hparams) at `step`."""
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
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
  texts = [storage.read_text(source) for source in sources]
  parsed = [_parse_rows(text) if text is not None else ([], False) for text in texts]
  rows, parts = parsed[0][0], [row for part, _ in parsed[1:] for row in part]
  if parts and rows[-len(parts):] == parts:  # A rewrite that stopped before removing its parts.
    parts = []
  rows = rows + parts
  changed = len(sources) > 1 or any(cut for _, cut in parsed)
  kept = [r for r in rows if last_step is None or r.get('step', 0) <= last_step]
  if not changed and len(kept) == len(rows):
    return
  storage.write_text(sources[0], ''.join(json.dumps(r) + '\n' for r in kept))
  for part in sources[1:]:
    part.unlink()
  if len(sources) > 1 and storage.is_local(sources[1]):
    # Also removes what a write cut short by a full disk left there (object stores: no folders).
    sources[1].parent.rmtree()
