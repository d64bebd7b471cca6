"""Orbax checkpoints of a run: train state, data-iterator state (one file per process), config.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it), keep the
newest N, and a corrupt newest checkpoint falls back to the previous one with a warning.
"""

import errno
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores one run's checkpoints under `workdir/checkpoints`."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, config_json: dict) -> None:
    """Starts an async save of `state` at `step`; the iterator state is captured now."""
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(config_json)), force=True)
    except OSError as e:
      raise _save_error(e, step, self.directory) from e

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise _save_error(e, None, self.directory) from e

  def restore_latest(self, abstract_state: Any, data_iterator: Any) -> Optional[tuple[int, Any]]:
    """Restores the newest readable checkpoint into `data_iterator` and returns (step, state).

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with shardings (the restore target).
      data_iterator: a fresh data iterator; its state is set from the checkpoint.

    Returns:
      None when there is no checkpoint.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # pylint: disable=broad-except  # Any unreadable checkpoint.
        older = [s for s in steps if s < step]
        if not older:
          raise ValueError(f'The only checkpoint in {self.directory} (step {step}) cannot be read'
                           f' ({type(e).__name__}: {str(e).splitlines()[0][:200]}): delete it to'
                           ' start over.') from e
        logging.warning('Checkpoint at step %d in %s cannot be read (%s); falling back to step %d.',
                        step, self.directory, type(e).__name__, older[-1])
        continue
      return step, restored['state']
    return None

  def close(self) -> None:
    self._manager.close()


def _save_error(e: OSError, step: Optional[int], directory: str) -> Exception:
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    at = f' at step {step}' if step is not None else ''
    return OSError(e.errno, f'Disk full while saving the checkpoint{at} in {directory}: free space'
                   ' and run the same command again; the previous checkpoints are intact.')
  return e


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` with the given shardings (restore targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
