"""Reliability guarantees (docs/reliability.md): exact resume after SIGKILL, SIGTERM preemption,
non-finite steps, one-line errors for bad input with nothing written, corrupt checkpoints,
a full disk. Subprocess tests run the real command line on 1-2 fake CPU devices."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from helpers import tiny_config
import reliability_utils as ru
from stompp_jax import checkpoints
from stompp_jax import errors
from stompp_jax import storage
from stompp_jax import train
from stompp_jax.data import pipeline
from stompp_jax.data import sources

DEVICES = ru.DEVICES


def small_config(**train_overrides):
  """tiny_config (12 steps, the suite's compiled step) without evaluations."""
  return tiny_config('stompp', **{'eval_every': 0, **train_overrides})


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The final checkpoint of a run of ru.TINY_FLAGS that nothing interrupted."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  ru.run_cli(workdir, workdir / 'log.txt', DEVICES)
  return ru.read_checkpoint(workdir)


def _resumed_step(output: str) -> int:
  match = re.search(r'Resumed from the checkpoint at step (\d+)', output)
  assert match, output[-3000:]
  return int(match.group(1))


def test_sigkill_at_any_step_then_rerun_is_bitwise_identical(tmp_path, uninterrupted):
  total = ru.TINY_FLAGS['train.num_steps']
  cli = ru.Cli(tmp_path, tmp_path / 'killed.txt', DEVICES)
  ru.wait_for_checkpoint(cli, tmp_path, min_step=10)
  cli.signal(signal.SIGKILL)  # Mid-step, mid-save or mid-log: wherever it is.
  assert cli.wait() == -signal.SIGKILL
  assert not (tmp_path / 'done.json').exists(), 'the run ended before the kill: make it longer'

  output = ru.run_cli(tmp_path, tmp_path / 'rerun.txt', DEVICES)
  assert 10 <= _resumed_step(output) < total
  step, state, data = ru.read_checkpoint(tmp_path)
  reference_step, reference_state, reference_data = uninterrupted
  assert step == reference_step == total
  ru.assert_bitwise_equal(state, reference_state)  # Params, optimizer, BN stats, mask key, step.
  assert data == reference_data  # The data order continues where it was.
  train_rows = [r for r in map(json.loads, open(tmp_path / 'metrics.jsonl')) if r['split'] == 'train']
  assert [r['step'] for r in train_rows] == list(range(5, total + 1, 5)), 'rows of the killed run'


def test_sigterm_saves_at_the_next_step_and_the_rerun_resumes_there(tmp_path, uninterrupted):
  cli = ru.Cli(tmp_path, tmp_path / 'preempted.txt', DEVICES)
  ru.wait_for_checkpoint(cli, tmp_path, min_step=10)
  cli.signal(signal.SIGTERM)
  assert cli.wait() == ru.PREEMPTED_EXIT_CODE
  output = cli.output()
  match = re.search(r'Preempted \(SIGTERM\): saved the checkpoint at step (\d+) in (\S+); run the'
                    r' same command to resume', output)
  assert match, output[-3000:]
  saved = int(match.group(1))
  assert ru.checkpoint_steps(tmp_path)[-1] == saved < ru.TINY_FLAGS['train.num_steps']
  assert not (tmp_path / 'done.json').exists()

  output = ru.run_cli(tmp_path, tmp_path / 'rerun.txt', DEVICES)
  assert _resumed_step(output) == saved
  _, state, data = ru.read_checkpoint(tmp_path)
  ru.assert_bitwise_equal(state, uninterrupted[1])
  assert data == uninterrupted[2]


# ---------------------------------------------------------------- non-finite steps


@pytest.fixture
def nan_batch(monkeypatch):
  """Makes the images of train batch `index` (0-based: the batch of step index + 1) NaN."""
  poisoned = []
  original = pipeline.TrainIterator.__next__

  def next_batch(self):
    index = self._next_batch
    batch = original(self)
    if index in poisoned:
      batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
    return batch

  monkeypatch.setattr(pipeline.TrainIterator, '__next__', next_batch)
  return poisoned.append


def _all_finite(state: dict) -> bool:
  return all(np.all(np.isfinite(v)) for v in state.values() if np.issubdtype(v.dtype, np.floating))


def test_nonfinite_step_stops_the_run_naming_the_step(tmp_path, nan_batch):
  nan_batch(4)
  config = small_config(log_every=8, checkpoint_every=2)
  assert config.train.on_nonfinite == 'error'  # The default.
  with pytest.raises(errors.NonFiniteError, match=r'not finite at step 5\b'):
    train.train_and_evaluate(config, str(tmp_path))
  # Stopped one step later, before step 6's checkpoint; no saved state holds the bad update.
  assert ru.checkpoint_steps(tmp_path) == [2, 4]
  for step in (2, 4):
    assert _all_finite(ru.read_checkpoint(tmp_path, step)[1])


def test_nonfinite_step_is_skipped_under_skip_policy(tmp_path, nan_batch):
  nan_batch(4)
  config = small_config(log_every=3, checkpoint_every=1, keep_checkpoints=10, on_nonfinite='skip')
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == 12
  states = {step: ru.read_checkpoint(tmp_path, step)[1] for step in (4, 5, 6)}
  assert all(_all_finite(s) for s in states.values())
  step_key = "['step']"
  unchanged = {k: v for k, v in states[5].items() if k != step_key}
  ru.assert_bitwise_equal(unchanged, {k: v for k, v in states[4].items() if k != step_key})
  assert states[5][step_key] == 5
  assert any(not np.array_equal(states[6][k], states[5][k]) for k in unchanged)
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['nonfinite'] for r in rows if r['split'] == 'train'] == [0.0, pytest.approx(1 / 3), 0.0,
                                                                     0.0]


def test_a_state_with_nan_is_never_saved(tmp_path):
  state = {'params': {'w': jnp.array([1.0, jnp.nan])}, 'step': jnp.int32(3)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  checkpointer = checkpoints.Checkpointer(str(tmp_path), keep=2, abstract_state=abstract)
  try:
    with pytest.raises(errors.NonFiniteError, match='at step 3 holds NaN'):
      checkpointer.save(3, state, data_iterator=None, config_json={})
  finally:
    checkpointer.close()
  assert ru.checkpoint_steps(tmp_path) == []


# ---------------------------------------------------------------- bad input


def _set(config, dotted, value):
  section, field = dotted.split('.')
  setattr(getattr(config, section), field, value)
  return config


@pytest.mark.parametrize('field, value, message', [
    ('data.name', 'cifar11', r"unknown data.name='cifar11': use one of cifar10, cifar100, imagenet2012"),
    ('binary.method', 'stomp', r"Unknown binary.method 'stomp': use one of fp, ste, stompp, stompp_ste"),
    ('binary.shape', 'cubicc', r"Unknown binary.shape 'cubicc': use one of linear, .*flipped_quadratic"),
    ('binary.span_end', 1.5, r'span \[0.0, 1.5\] is not inside \[0, 1\].*set binary.span_start'),
    ('binary.span_start', -0.1, r'span \[-0.1, 0.8\] is not inside \[0, 1\]'),
    ('train.batch_size', 12, r'train.batch_size=12 is not divisible by the 8 devices: use a multiple of 8'),
])
def test_bad_config_is_one_line_error_and_writes_nothing(tmp_path, field, value, message):
  workdir = tmp_path / 'run'
  with pytest.raises(errors.SetupError, match=message) as error:
    train.train_and_evaluate(_set(tiny_config(), field, value), str(workdir))
  assert '\n' not in str(error.value)
  assert not workdir.exists()


def test_a_data_check_raises_setup_error_where_it_checks():
  """The data package's checks raise errors.SetupError themselves: nothing converts a ValueError
  by its type (a bug keeps its own type and traceback)."""
  with pytest.raises(errors.SetupError, match="unknown data.name='cifar11'") as raised:
    sources.check_data_config(_set(tiny_config(), 'data.name', 'cifar11').data)
  assert raised.value.__cause__ is None


def _npz_config(data_dir):
  config = tiny_config()
  config.data.source = 'npz'
  config.data.dir = str(data_dir)
  return config


def test_malformed_data_is_one_line_error_and_writes_nothing(tmp_path):
  (tmp_path / 'data').mkdir()
  for name in ('train.npz', 'test.npz'):
    (tmp_path / 'data' / name).write_bytes(b'not an npz file')
  with pytest.raises(errors.SetupError, match=r'train.npz is not a readable npz') as error:
    train.train_and_evaluate(_npz_config(tmp_path / 'data'), str(tmp_path / 'run'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------- the workdir's earlier run


@pytest.fixture(scope='module')
def finished_template(tmp_path_factory):
  """A finished run of small_config(), run once for every test that needs one."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  train.train_and_evaluate(small_config(), str(workdir))
  return workdir


@pytest.fixture
def finished_run(tmp_path, finished_template):
  """A copy of finished_template that the test may change."""
  return shutil.copytree(finished_template, tmp_path / 'run')


def _listing(directory):
  return sorted((str(p.relative_to(directory)), p.stat().st_mtime_ns) for p in directory.rglob('*'))


def test_workdir_of_another_config_is_refused_and_left_as_it_was(finished_run):
  before = _listing(finished_run)
  other = small_config()
  other.optim.learning_rate = 0.05
  with pytest.raises(errors.SetupError, match=r'different config: optim.learning_rate \(0.1 -> 0.05\).*'
                     'override_workdir_config=True'):
    train.train_and_evaluate(other, str(finished_run))
  # Without config.json, the config saved with the newest checkpoint is compared.
  (finished_run / 'config.json').unlink()
  before = [entry for entry in before if entry[0] != 'config.json']
  with pytest.raises(errors.SetupError, match=r'different config: optim.learning_rate'):
    train.train_and_evaluate(other, str(finished_run))
  assert _listing(finished_run) == before


def test_workdir_of_another_model_is_refused_even_with_override(finished_run):
  before = _listing(finished_run)
  other = small_config()
  other.model.name = 'resnet20'
  other.train.override_workdir_config = True
  with pytest.raises(errors.SetupError, match=r'holds checkpoints of a different model or optimizer'):
    train.train_and_evaluate(other, str(finished_run))
  assert _listing(finished_run) == before


def test_rerunning_a_finished_run_changes_nothing(finished_run):
  before, done = _listing(finished_run), json.loads((finished_run / 'done.json').read_text())
  assert train.train_and_evaluate(small_config(), str(finished_run)) == done
  assert _listing(finished_run) == before


# ---------------------------------------------------------------- corrupt checkpoints, full disk

CORRUPT_TRAIN = {'log_every': 4, 'checkpoint_every': 3}


@pytest.fixture(scope='module')
def preempted_template(tmp_path_factory):
  """small_config(**CORRUPT_TRAIN) preempted at step 7: checkpoints at steps 3, 6 and 7."""
  workdir = tmp_path_factory.mktemp('preempted') / 'run'
  original = train._Preemption.reached
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train._Preemption, 'reached', lambda self, s: s == 7 or original(self, s))
    assert train.train_and_evaluate(small_config(**CORRUPT_TRAIN), str(workdir))['preempted']
  assert ru.checkpoint_steps(workdir) == [3, 6, 7]
  return workdir


def _truncate_array_data(step_dir):
  """Cuts every data file of the state in half, as a disk or a copy that lost their ends."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)


def _change_recorded_fingerprint(step_dir):
  metadata = json.loads((step_dir / '_CHECKPOINT_METADATA').read_text())
  metadata['custom_metadata']['fingerprint'] ^= 1
  (step_dir / '_CHECKPOINT_METADATA').write_text(json.dumps(metadata))


# Orbax leaves an asyncio loop's callbacks behind when a read fails; they are harmless.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('corrupt', [_truncate_array_data, _change_recorded_fingerprint])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, corrupt,
                                                            preempted_template, finished_template):
  workdir = shutil.copytree(preempted_template, tmp_path / 'run')
  corrupt(workdir / 'checkpoints' / '7')
  with caplog.at_level(logging.WARNING):
    assert train.train_and_evaluate(small_config(**CORRUPT_TRAIN), str(workdir))['step'] == 12
  assert re.search(r'The checkpoint at step 7 in \S+ cannot be read \(.+\); falling back to step 6',
                   caplog.text), caplog.text
  # Resumed from step 6 exactly: the end is that of the uninterrupted finished_template.
  ru.assert_bitwise_equal(ru.read_checkpoint(workdir)[1], ru.read_checkpoint(finished_template)[1])


def test_a_transient_read_error_propagates_and_falls_back_to_nothing(tmp_path, caplog,
                                                                    preempted_template,
                                                                    monkeypatch):
  """A storage outage while reading the newest checkpoint is not corruption: the error comes
  out as raised, no older checkpoint is used, nothing advises deleting checkpoints, and the
  next try resumes from the newest one."""
  workdir = shutil.copytree(preempted_template, tmp_path / 'run')
  outage = ValueError('UNAVAILABLE: Error reading "checkpoints/7/state/d/0": connection reset')

  def unavailable(self, step, *args, **kwargs):
    raise outage

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', unavailable)
  with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as raised:
    train.train_and_evaluate(small_config(**CORRUPT_TRAIN), str(workdir))
  assert raised.value is outage and not isinstance(raised.value, errors.SetupError)
  assert 'falling back' not in caplog.text and 'delete' not in caplog.text
  assert ru.checkpoint_steps(workdir) == [3, 6, 7]
  monkeypatch.undo()
  with caplog.at_level(logging.INFO):
    assert train.train_and_evaluate(small_config(**CORRUPT_TRAIN), str(workdir))['step'] == 12
  assert 'Resumed from the checkpoint at step 7' in caplog.text


@pytest.mark.parametrize('failure', [MemoryError('out of memory'), PermissionError(13, 'denied')],
                         ids=['out_of_memory', 'permission'])
def test_only_corruption_counts_as_a_corrupt_checkpoint(failure):
  assert not checkpoints.is_corrupt(failure)
  wrapped = RuntimeError('restore failed')
  wrapped.__cause__ = ValueError('OUT_OF_RANGE: Requested byte range [0, 5754) is not valid for'
                                 ' value of size 2877')
  assert checkpoints.is_corrupt(wrapped)
  assert checkpoints.is_corrupt(FileNotFoundError(2, 'No such file', '_CHECKPOINT_METADATA'))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_reading_a_corrupt_newest_checkpoint_names_the_step_to_delete(finished_run):
  """evaluate and export read the newest checkpoint (checkpoints.read_state)."""
  newest, older = max(ru.checkpoint_steps(finished_run)), min(ru.checkpoint_steps(finished_run))
  step_dir = finished_run / 'checkpoints' / str(newest)
  _truncate_array_data(step_dir)
  with pytest.raises(errors.SetupError, match=(
      rf'^The newest checkpoint, step {newest} in \S+, cannot be read \(.+\): delete'
      rf' {re.escape(str(step_dir))} to read step {older} instead\.$')) as error:
    checkpoints.read_state(str(finished_run))
  assert '\n' not in str(error.value)
  shutil.rmtree(step_dir)
  assert checkpoints.read_state(str(finished_run))[0] == older


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_no_readable_checkpoint_is_one_line_error(finished_run):
  for step in ru.checkpoint_steps(finished_run):
    _truncate_array_data(finished_run / 'checkpoints' / str(step))
  with pytest.raises(errors.SetupError, match=r'No checkpoint in \S+ can be read \(steps 12, 6; step 6:'
                     r' .+\): delete \S+ to start over') as error:
    train.train_and_evaluate(small_config(), str(finished_run))
  assert '\n' not in str(error.value)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  """ENOSPC from the file write that commits a checkpoint, in orbax's background thread."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  original = async_path.write_text

  async def write_text(path, text):
    if '/checkpoints/6.orbax-checkpoint-tmp' in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await original(path, text)

  monkeypatch.setattr(async_path, 'write_text', write_text)
  config = small_config(log_every=4, checkpoint_every=3, keep_checkpoints=4)
  with pytest.raises(errors.DiskFullError, match=r'Disk full while saving the checkpoint at'
                     r' step 6 in \S+: free space and run the same command again; the previous'
                     ' checkpoints are intact'):
    train.train_and_evaluate(config, str(tmp_path))
  monkeypatch.undo()
  assert ru.checkpoint_steps(tmp_path) == [3]
  assert not (tmp_path / 'done.json').exists()
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == 12  # Resumes from step 3.
  assert ru.checkpoint_steps(tmp_path) == [3, 6, 9, 12]
  assert not [p for p in (tmp_path / 'checkpoints').iterdir() if 'tmp' in p.name]


@pytest.fixture
def small_filesystem(tmp_path):
  """A 420 KiB tmpfs: room for the first checkpoint of ru.TINY_FLAGS, not for the run.

  A checkpoint of the tiny run takes 204-240 KiB, plus orbax's transient per-process files while
  it merges them (300 KiB left no room for that once in four fresh-clone runs); the run keeps
  three (684 KiB), so the disk fills at a later save.
  """
  mount_point = tmp_path / 'small'
  mount_point.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=420k', 'tmpfs', str(mount_point)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here (needs root): {mounted.stderr.strip()[:200]};'
                ' test_full_disk_while_saving_keeps_the_previous_checkpoint covers the error path')
  try:
    yield mount_point
  finally:
    subprocess.run(['umount', str(mount_point)], check=False)


def test_cli_on_a_full_disk_stops_with_one_line_and_resumes_after_space_is_freed(
    tmp_path, small_filesystem, uninterrupted):
  """A real full disk: tensorstore's ENOSPC from orbax's background thread, through the CLI."""
  workdir = small_filesystem / 'run'
  cli = ru.Cli(workdir, tmp_path / 'full.txt', DEVICES)
  assert cli.wait() == 1
  errors = [line for line in cli.output().splitlines() if line.startswith('Error: ')]
  assert len(errors) == 1 and errors[0].startswith('Error: Disk full'), cli.output()[-3000:]
  assert 'run the same command again' in errors[0]
  saved = ru.checkpoint_steps(workdir)
  assert saved, 'no checkpoint fitted: make the filesystem larger'
  ru.read_checkpoint(workdir)  # The newest complete checkpoint is intact.

  subprocess.run(['mount', '-o', 'remount,size=20m', str(small_filesystem)], check=True)
  output = ru.run_cli(workdir, tmp_path / 'rerun.txt', DEVICES)
  assert _resumed_step(output) == saved[-1]
  ru.assert_bitwise_equal(ru.read_checkpoint(workdir)[1], uninterrupted[1])


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
  """storage.write_bytes (done.json, config.json, metrics) on a full disk."""
  target = tmp_path / 'done.json'
  target.write_text('old')
  real = tempfile.NamedTemporaryFile

  def on_a_full_disk(*args, **kwargs):
    f = real(*args, **kwargs)
    def write(data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    f.write = write
    return f

  monkeypatch.setattr(storage.tempfile, 'NamedTemporaryFile', on_a_full_disk)
  with pytest.raises(OSError, match='No space left'):
    storage.write_bytes(epath.Path(target), b'new')
  assert os.listdir(tmp_path) == ['done.json'] and target.read_text() == 'old'
