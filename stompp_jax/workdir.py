"""The run directory: config.json, metrics.jsonl, tensorboard/, checkpoints/, done.json.

A local path or a gs:// URI: every file goes through `storage` (etils.epath).

Running the same command on the same directory resumes it; a directory made with a different
config (config.json, else the config saved in its newest checkpoint) is refused unless
`train.override_workdir_config` is set. `check_same_run` only reads, so a refused config leaves the
directory as it was; `write_config` comes after every check has passed. Fields that only change
how a run is observed or executed (logging, workers, devices) may differ between resumes.
"""

import json
from typing import Any, Mapping

import jax
import ml_collections

from stompp_jax import errors
from stompp_jax import storage

# The names inside a run directory (the one place they are spelled).
CONFIG = 'config.json'
METRICS = 'metrics.jsonl'  # The rows of the finished metric writers, in order.
METRICS_PARTS = 'metrics.parts'  # Rows of a writer still running (or killed): PartLog parts.
TENSORBOARD = 'tensorboard'
CHECKPOINTS = 'checkpoints'
DONE = 'done.json'
# The items of each checkpoint, CHECKPOINTS/<step>/<item>/ (orbax's item directories).
CHECKPOINT_STATE = 'state'  # The train state.
CHECKPOINT_DATA = 'data'  # The data iterator's position.
CHECKPOINT_CONFIG = 'config'  # The run's config, JSON in the file CHECKPOINT_CONFIG_FILE.
CHECKPOINT_CONFIG_FILE = 'metadata'

# Fields that may change when a run is resumed: they do not change what is computed.
RESUMABLE_FIELDS = (
    'train.log_every', 'train.eval_every', 'train.eval_steps', 'train.eval_batch_size',
    'train.checkpoint_every', 'train.keep_checkpoints', 'train.diagnostics',
    'train.on_nonfinite', 'train.override_workdir_config', 'data.num_workers', 'data.prefetch',
    'data.dir', 'data.download', 'mesh.num_devices', 'mesh.shard_params',
    # How masks and gradients are computed and kept (binary/context.py), not what they are.
    'binary.masks_by', 'binary.residuals', 'binary.committed_backward',
    # A record, not a setting; a different model is refused by its checkpoint's signature.
    'model.own_class')


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return flat


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Fields (dotted) whose values differ, other than RESUMABLE_FIELDS."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  keys = sorted(set(old_flat) | set(new_flat))
  return [k for k in keys if k not in RESUMABLE_FIELDS and old_flat.get(k) != new_flat.get(k)]


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that is a file or cannot be created or written (nothing is written)."""
  storage.check_output_directory(workdir, '--workdir')


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose run has a different config, unless train.override_workdir_config.

  The run's config is config.json, or, when that is missing, the config saved with its newest
  checkpoint. Nothing is written.
  """
  old = read_config(workdir)
  if old is None:
    old = _newest_checkpoint_config(workdir)
    if old is None:
      return
  new = json.loads(config.to_json())
  differences = config_differences(old, new)
  if differences and not config.train.override_workdir_config:
    old_flat, new_flat = _flatten(old), _flatten(new)
    shown = ', '.join(f'{k} ({old_flat.get(k)!r} -> {new_flat.get(k)!r})' for k in differences[:5])
    raise errors.SetupError(f'{workdir} holds a run with a different config: {shown}; use another --workdir,'
                     ' or set --config.train.override_workdir_config=True to resume it anyway.')


def _newest_checkpoint_config(workdir: str) -> dict | None:
  """The config saved with the newest finished checkpoint (orbax's JSON item), if readable."""
  directory = storage.path(workdir) / CHECKPOINTS
  names = [p.name for p in directory.iterdir()] if directory.exists() else []
  steps = sorted(int(name) for name in names if name.isdigit())
  for step in reversed(steps):
    path = directory / str(step) / CHECKPOINT_CONFIG / CHECKPOINT_CONFIG_FILE
    try:
      return upgrade_config(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError):
      continue
  return None


# Fields added after runs were made with the config format, and the value that reproduces such
# a run: {dotted field: value}. `upgrade_config` fills them in where an old config is read.
ADDED_FIELDS = {
    'binary.window_steps': 0,  # 0 = windows derived from binary.span_start / span_end.
    'model.bnn_shortcut': 'real',  # The real-valued shortcut, the only block before the field.
    'binary.masks_by': 'cond',  # The per-site branch, the only way before the field.
    'binary.residuals': 'auto',  # Bit for bit the same values either way.
    'binary.committed_backward': 'full',  # Every gradient computed, as before the field.
    'model.own_class': '',  # Not recorded before the field: a zoo model as far as it tells.
}


def upgrade_config(config: dict) -> dict:
  """A run's saved config (config.json or a checkpoint's) with every field of ADDED_FIELDS
  that it lacks set to the value its run used; the one place old run directories are read."""
  config = json.loads(json.dumps(config))  # A deep copy.
  for field, value in ADDED_FIELDS.items():
    *sections, name = field.split('.')
    node = config
    for section in sections:
      node = node.setdefault(section, {})
    node.setdefault(name, value)
  return config


def read_config(workdir: str) -> dict | None:
  """The upgraded config.json of the run in `workdir` (`upgrade_config`), None without one.

  Raises:
    errors.SetupError: config.json is not valid JSON.
  """
  path = storage.path(workdir) / CONFIG
  text = storage.read_text(path)
  if text is None:
    return None
  try:
    return upgrade_config(json.loads(text))
  except json.JSONDecodeError:
    raise errors.SetupError(f'{path} is not valid JSON: restore it or start a new --workdir.') from None


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates `workdir` and writes its config.json (process 0), after `check_same_run`."""
  if jax.process_index() == 0:
    storage.write_text(storage.path(workdir) / CONFIG,
                       json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True) + '\n')


def read_done(workdir: str) -> dict | None:
  """The final metrics of a finished run (done.json), or None."""
  text = storage.read_text(storage.path(workdir) / DONE)
  return None if text is None else json.loads(text)


def write_done(workdir: str, summary: Mapping[str, Any]) -> None:
  """Marks the run finished: done.json with the final metrics (written last)."""
  if jax.process_index() == 0:
    storage.write_text(storage.path(workdir) / DONE, json.dumps(dict(summary), indent=2) + '\n')
