"""Tests of stompp_jax.metrics' writers (no training)."""

import glob
import itertools
import os

import pytest
from tensorboardX.proto import event_pb2

from stompp_jax import metrics as metrics_lib

from helpers import read_events  # pylint: disable=g-bad-import-order


def test_rows_and_tensorboard_scalars(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(1, 'train', {'loss': 2.5, 'frozen_fraction': [0.0, 1.0]})
  writer.write(2, 'eval', {'eval_accuracy': float('nan')})
  writer.close()
  assert metrics_lib.read_metrics(str(tmp_path)) == [
      {'step': 1, 'split': 'train', 'loss': 2.5, 'frozen_fraction': [0.0, 1.0]},
      {'step': 2, 'split': 'eval', 'eval_accuracy': None}]
  values = [(v.tag, e.step, v) for e in read_events(tmp_path / 'tensorboard')
            for v in e.summary.value]
  assert [(tag, step) for tag, step, _ in values] == [('train/loss', 1),
                                                      ('train/frozen_fraction', 1)]
  assert values[0][2].simple_value == 2.5
  histogram = values[1][2].histo
  assert list(histogram.bucket) == [0.0, 1.0] and list(histogram.bucket_limit) == [0.5, 1.5]


@pytest.mark.parametrize('split, key, tag', [
    ('train', 'loss', 'train/loss'),
    ('train', 'frozen_fraction', 'train/frozen_fraction'),
    ('eval', 'eval_accuracy', 'eval/accuracy'),
    ('eval', 'eval_loss', 'eval/loss'),
    ('eval', 'eval_fully_binary_accuracy', 'eval/fully_binary/accuracy'),
    ('eval', 'eval_fully_binary_loss', 'eval/fully_binary/loss'),
])
def test_tensorboard_tags(split, key, tag):
  assert metrics_lib.tensorboard_tag(split, key) == tag


def test_flat_hparams():
  assert metrics_lib.flat_hparams({'a': {'b': 1, 'c': (1, 2)}, 'd': None, 'e': 'x'}) == {
      'a.b': 1, 'a.c': '(1, 2)', 'd': 'None', 'e': 'x'}


def test_a_resumed_writer_tells_tensorboard_to_drop_the_steps_after_the_checkpoint(tmp_path):
  first = metrics_lib.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    first.write(step, 'train', {'loss': float(step)})
  first.close()
  resumed = metrics_lib.MetricWriter(str(tmp_path), start_step=3)
  resumed.write(4, 'train', {'loss': 40.0})
  resumed.close()
  purges = [e.step for e in read_events(tmp_path / 'tensorboard')
            if e.session_log.status == event_pb2.SessionLog.START]
  assert purges == [4]


def test_a_fresh_writer_purges_nothing(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(1, 'train', {'loss': 1.0})
  writer.close()
  assert not any(e.session_log.status == event_pb2.SessionLog.START
                 for e in read_events(tmp_path / 'tensorboard'))


def test_writers_started_in_the_same_second_write_distinct_event_files(tmp_path, monkeypatch):
  """In the order they were started, also when the per-process counter gains a digit."""
  monkeypatch.setattr(metrics_lib.time, 'time_ns', lambda: 1_700_000_000_123_456_789)
  monkeypatch.setattr(metrics_lib, '_EVENT_LOGS', itertools.count(9))
  for step in (1, 2):  # E.g. a run stopped by an error and started again at once.
    writer = metrics_lib.MetricWriter(str(tmp_path))
    writer.write(step, 'train', {'loss': float(step)})
    writer.close()
  files = glob.glob(os.path.join(tmp_path, 'tensorboard', 'events.out.tfevents.1700000000.*'))
  assert len(files) == 2, files
  assert [(e.step, v.simple_value) for e in read_events(tmp_path / 'tensorboard')
          for v in e.summary.value] == [(1, 1.0), (2, 2.0)]


def test_a_consolidation_stopped_before_removing_its_parts_adds_no_row_twice(tmp_path):
  """Killed between rewriting metrics.jsonl and deleting the parts it moved there."""
  writer = metrics_lib.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': float(step)})
  parts_dir = tmp_path / 'metrics.parts'
  parts = {p.name: p.read_bytes() for p in parts_dir.iterdir()}
  assert parts
  writer.close()
  metrics_lib.consolidate(str(tmp_path))
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert [r['step'] for r in rows] == [1, 2, 3] and not parts_dir.exists()
  parts_dir.mkdir()
  for name, data in parts.items():  # The state the kill left: the parts are still there.
    (parts_dir / name).write_bytes(data)
  metrics_lib.consolidate(str(tmp_path))
  assert metrics_lib.read_metrics(str(tmp_path)) == rows and not parts_dir.exists()
