"""Orbax checkpoints of a run: train state, data-iterator state (one file per process), config.

Saves are asynchronous and atomic: orbax writes a temporary directory and renames it when every
file is on disk, so a run killed mid-save leaves only a temporary directory, removed at the next
start. The newest N are kept. Each checkpoint records the train state's signature (paths,
shapes, dtypes) and a fingerprint of its bits: a checkpoint of another model is refused, and a
corrupt newest checkpoint (`is_corrupt`: missing or truncated files, bits that changed on disk)
falls back to the previous one with a warning. Any other failure to read (a storage outage, out
of memory) propagates as raised: the checkpoints may well be fine. A state with a NaN or an
infinity is never saved.
"""

import errno
import json
import re
from typing import Any, Iterator, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from stompp_jax import errors
from stompp_jax import parallel
from stompp_jax import state as state_lib
from stompp_jax import storage
from stompp_jax import workdir as workdir_lib

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ('No space left on device', 'Disk quota exceeded')
# tensorstore's status codes (the start of its error messages) that say what is on disk is not
# what was written: a file shorter than recorded, a missing file, a failed checksum.
_CORRUPTION_STATUSES = re.compile(r'(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND): ')


class CorruptCheckpointError(Exception):
  """A checkpoint's bits differ from the fingerprint recorded when it was saved."""


class Checkpointer:
  """Saves and restores one run's checkpoints under `workdir/checkpoints`.

  Args:
    workdir: the run directory.
    keep: how many of the newest checkpoints to keep.
    abstract_state: the train state as jax.ShapeDtypeStructs with shardings (`abstract_like`):
      the restore target; a checkpoint of another `state.signature` is refused.
  """

  def __init__(self, workdir: str, keep: int, abstract_state: Any):
    self.directory = directory(workdir)
    self._abstract_state = abstract_state
    self._signature = state_lib.signature(abstract_state)
    # Compiled here, with the rest of the run's programs: a process compiling it at its first
    # save would keep the others waiting in its collective.
    self._summarize = state_lib.fingerprint_and_finite.lower(abstract_state).compile()
    parallel.wait_for_all_processes('stompp_jax: checkpointer compiled')
    self._pending_step = None
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            workdir_lib.CHECKPOINT_STATE: ocp.StandardCheckpointHandler(),
            workdir_lib.CHECKPOINT_DATA: grain.checkpoint.CheckpointHandler(),
            workdir_lib.CHECKPOINT_CONFIG: ocp.JsonCheckpointHandler(
                filename=workdir_lib.CHECKPOINT_CONFIG_FILE)},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True,
                                             enable_async_checkpointing=True))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config_json: dict) -> None:
    """Starts an async save of `state` at `step`; the iterator state is captured now.

    Raises:
      errors.NonFiniteError: `state` holds a NaN or an infinity (nothing is written).
      errors.DiskFullError: this save or the previous one ran out of space.
    """
    self.wait()  # Orbax would wait here too; this way an error names the step it belongs to.
    fingerprint, finite = map(_first_value, self._summarize(state))
    if not finite:
      raise errors.NonFiniteError(
          f'The train state at step {step} holds NaN or infinite values; it was not saved and the'
          f' checkpoints in {self.directory} are intact: lower optim.learning_rate.')
    self._pending_step = step
    try:
      self._manager.save(step, args=ocp.args.Composite(**{
          workdir_lib.CHECKPOINT_STATE: ocp.args.StandardSave(state),
          workdir_lib.CHECKPOINT_DATA: grain.checkpoint.CheckpointSave(data_iterator),
          workdir_lib.CHECKPOINT_CONFIG: ocp.args.JsonSave(config_json)}),
          custom_metadata={'signature': self._signature, 'fingerprint': fingerprint}, force=True)
    except Exception as e:  # pylint: disable=broad-except  # Only a full disk is translated.
      _raise_if_disk_full(e, step, self.directory)
      raise

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # Only a full disk is translated.
      _raise_if_disk_full(e, self._pending_step, self.directory)
      raise
    finally:
      self._pending_step = None

  def restore_latest(self, data_iterator: Any) -> Optional[tuple[int, Any]]:
    """Restores the newest intact checkpoint into `data_iterator` and returns (step, state).

    Args:
      data_iterator: a fresh data iterator; its state is set from the checkpoint.

    Returns:
      None when there is no checkpoint.

    Raises:
      errors.ForeignCheckpointError: the checkpoints belong to another model.
      errors.SetupError: every checkpoint is corrupt (`is_corrupt`).
      Any other error of reading a checkpoint, unchanged (nothing falls back on it).
    """
    steps = self.steps()
    problems = []
    for step in reversed(steps):
      try:
        return step, self._restore(step, data_iterator)
      except Exception as e:  # pylint: disable=broad-except  # Re-raised unless corrupt.
        if not is_corrupt(e):
          raise
        problems.append(step)
        if step == steps[0]:
          raise errors.SetupError(
              f'No checkpoint in {self.directory} can be read (steps'
              f' {", ".join(map(str, problems))}; step {step}: {_summary(e)}): delete'
              f' {self.directory} to start over.') from e
        older = steps[steps.index(step) - 1]
        logging.warning('The checkpoint at step %d in %s cannot be read (%s); falling back to'
                        ' step %d.', step, self.directory, _summary(e), older)
    return None

  def _restore(self, step: int, data_iterator: Any) -> Any:
    """The state of `step`, checked against the recorded signature and fingerprint."""
    custom = self._manager.metadata(step).custom_metadata or {}
    signature = custom.get('signature')
    if signature is not None and signature != self._signature:
      raise errors.ForeignCheckpointError(
          f'{self.directory} holds checkpoints of a different model or optimizer (the train state'
          f' at step {step} has other parameters or shapes): use another --workdir, or delete'
          ' those checkpoints to start over.')
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        workdir_lib.CHECKPOINT_STATE: ocp.args.StandardRestore(self._abstract_state),
        workdir_lib.CHECKPOINT_DATA: grain.checkpoint.CheckpointRestore(data_iterator)}))
    state = restored[workdir_lib.CHECKPOINT_STATE]
    fingerprint = custom.get('fingerprint')
    if fingerprint is not None:
      actual = _first_value(self._summarize(state)[0])
      if actual != fingerprint:
        raise CorruptCheckpointError(f'its contents changed on disk: fingerprint {actual}, saved'
                                     f' {fingerprint}')
    return state

  def close(self) -> None:
    self._manager.close()


def directory(workdir: str) -> epath.Path:
  """The checkpoint directory of a run directory (local and absolute, or gs://)."""
  return storage.path(workdir) / workdir_lib.CHECKPOINTS


def read_state(workdir: str) -> tuple[int, dict[str, Any]]:
  """The newest checkpoint's train state, without a target tree or a model.

  Returns:
    (step, the train state as a dict of arrays on one device: 'step', 'params', 'batch_stats',
    'opt_state', 'mask_key').

  Raises:
    errors.SetupError: `workdir` has no checkpoint, or its newest one cannot be read (one line
      that names the step to delete).
  """
  path = directory(workdir)
  if not path.is_dir():
    raise errors.SetupError(f'{workdir} has no {workdir_lib.CHECKPOINTS}/ directory: train a run'
                            ' there first, or give the run directory of a trained run.')
  manager = ocp.CheckpointManager(path)
  try:
    step = manager.latest_step()
    if step is None:
      raise errors.SetupError(f'No checkpoint in {path}: train the run first.')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          workdir_lib.CHECKPOINT_STATE: ocp.args.StandardRestore(fallback_sharding=device)}))
    except Exception as error:  # pylint: disable=broad-except  # Only corruption is re-raised as ours.
      if not is_corrupt(error):
        raise
      older = sorted(s for s in manager.all_steps() if s < step)
      then = (f'delete {path / str(step)} to read step {older[-1]} instead' if older else
              f'train the run again in a new directory')
      raise errors.SetupError(f'The newest checkpoint, step {step} in {path}, cannot be read'
                              f' ({_summary(error)}): {then}.') from None
  finally:
    manager.close()
  return step, restored[workdir_lib.CHECKPOINT_STATE]


def read_variables(workdir: str) -> tuple[int, dict, int]:
  """The model of the newest checkpoint, without the rest of the train state or a model.

  Returns:
    (step, {'params', 'batch_stats'} as numpy arrays, bytes of the train state on disk).

  Raises:
    errors.SetupError: `workdir` has no checkpoint.
  """
  step, state = read_state(workdir)
  variables = jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})
  state_directory = directory(workdir) / str(step) / workdir_lib.CHECKPOINT_STATE
  return step, variables, _directory_bytes(state_directory)


def _directory_bytes(path: epath.Path) -> int:
  return sum(_directory_bytes(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def is_corrupt(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) shows a corrupt checkpoint: a missing file, a
  file shorter than recorded or failing its checksum (tensorstore's DATA_LOSS, OUT_OF_RANGE,
  NOT_FOUND), unparsable metadata, or a fingerprint mismatch."""
  return any(isinstance(e, (CorruptCheckpointError, FileNotFoundError, json.JSONDecodeError))
             or _CORRUPTION_STATUSES.match(str(e)) for e in _cause_chain(error))


def _summary(error: Exception) -> str:
  """`Type: first line` of an error, at most 200 characters."""
  lines = str(error).strip().splitlines() or ['']
  return f'{type(error).__name__}: {lines[0][:200]}'


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` or an exception it was raised from reports a full disk or quota."""
  return any((isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS)
             or any(text in str(e) for text in _DISK_FULL_TEXTS) for e in _cause_chain(error))


def _cause_chain(error: Optional[BaseException]) -> Iterator[BaseException]:
  """`error`, then the exception it was raised from (`__cause__`, else `__context__`), and so
  on, each once (a cycle ends the chain)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _raise_if_disk_full(error: Exception, step: Optional[int], directory: str) -> None:
  if is_disk_full(error):
    at = f' at step {step}' if step is not None else ''
    raise errors.DiskFullError(
        f'Disk full while saving the checkpoint{at} in {directory}: free space and run the same'
        ' command again; the previous checkpoints are intact.') from error


def _first_value(x: jax.Array) -> int:
  """A replicated scalar as a Python int (read from this process's first shard)."""
  return int(np.asarray(x.addressable_data(0)))


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

