"""Helpers of the reliability tests: the command line in a subprocess, checkpoint contents."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from helpers import REPO
from stompp_jax import compiler
from stompp_jax import storage

# The command-line runs: configs/tiny.py (the suite's one tiny config) with a longer, smaller-
# batch schedule, so that a signal can land at many different steps, on DEVICES devices. Every
# one-process CLI run of the tests uses these flags (change only the host's settings: logging,
# checkpoints), so they share one compiled step through the persistent cache.
TINY_CONFIG = 'configs/tiny.py'
TINY_FLAGS = {
    'data.synthetic_train_size': 256,
    'data.synthetic_eval_size': 32,
    'train.batch_size': 8,
    'train.eval_batch_size': 16,
    'train.num_steps': 60,
    'train.log_every': 5,
    'train.eval_every': 0,
    'train.checkpoint_every': 5,
    'train.keep_checkpoints': 3,
}
DEVICES = 2  # CPU devices of the command-line runs: the batch is sharded, as on real hardware.
PREEMPTED_EXIT_CODE = 75


def copy_checkout(dest) -> pathlib.Path:
  """Copies the checkout's files (tracked, and untracked ones git does not ignore, so uncommitted
  changes too) into `dest`; returns `dest`."""
  dest = pathlib.Path(dest)
  files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split('\0')
  for name in files:
    if name and (REPO / name).is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / name, dest / name)
  return dest


def cli_command(workdir, **overrides) -> list[str]:
  flags = {**TINY_FLAGS, **overrides}
  return [sys.executable, '-m', 'stompp_jax.main', f'--config={TINY_CONFIG}',
          f'--workdir={workdir}', *(f'--config.{k}={v}' for k, v in flags.items())]


def cli_env(devices: int, **extra) -> dict:
  """The environment of a CLI subprocess: `devices` CPU devices, the tests' compile cache.

  The bitwise guarantees (resume, two processes like one) are checked with the project's CPU
  compiler options (compiler.CPU_OPTIONS, pinned here) and the suite's XLA_FLAGS (conftest.py,
  inherited): both sides of every comparison compile with exactly these.
  """
  env = dict(os.environ)
  env[compiler.SETTING] = 'project'
  if jax.config.jax_compilation_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.2', **extra)
  return env


class Cli:
  """One `python -m stompp_jax.main` subprocess; its output goes to `log`."""

  def __init__(self, workdir, log, devices=DEVICES, env=None, **overrides):
    self.log = pathlib.Path(log)
    self._file = open(self.log, 'w', encoding='utf-8')
    self.process = subprocess.Popen(cli_command(workdir, **overrides), cwd=REPO,
                                    env={**cli_env(devices), **(env or {})},
                                    stdout=self._file, stderr=subprocess.STDOUT)

  def wait(self, timeout=300) -> int:
    try:
      return self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()
      raise AssertionError(f'timed out after {timeout} s:\n{self.output()[-3000:]}') from None
    finally:
      self._file.close()

  def signal(self, signum) -> None:
    self.process.send_signal(signum)

  def output(self) -> str:
    return self.log.read_text(encoding='utf-8')


def run_cli(workdir, log, devices=DEVICES, timeout=300, **overrides) -> str:
  """Runs the CLI to the end, asserts exit status 0 and returns its output."""
  cli = Cli(workdir, log, devices, **overrides)
  status = cli.wait(timeout)
  assert status == 0, f'exit status {status}:\n{cli.output()[-3000:]}'
  return cli.output()


def checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoints (orbax renames a step's directory to its number when complete)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_for_checkpoint(cli: Cli, workdir, min_step: int, timeout=240) -> int:
  """Polls until a checkpoint at `min_step` or later exists; returns the newest step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [s for s in checkpoint_steps(workdir) if s >= min_step]
    if steps:
      return steps[-1]
    if cli.process.poll() is not None:
      raise AssertionError(f'the run ended (status {cli.process.returncode}) before a checkpoint'
                           f' at step {min_step}:\n{cli.output()[-3000:]}')
    time.sleep(0.02)
  cli.process.kill()
  raise AssertionError(f'no checkpoint at step {min_step} within {timeout} s')


def read_checkpoint(workdir, step=None) -> tuple[int, dict, list]:
  """(step, {path: numpy array} of the train state, data-iterator states) of a checkpoint in a
  local or gs:// `workdir`."""
  directory = storage.path(workdir) / 'checkpoints'
  manager = ocp.CheckpointManager(directory, item_handlers={'state': ocp.StandardCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    # Onto one device of this process, whatever devices and processes saved it.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          manager.item_metadata(step)['state'].tree)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  state = {jax.tree_util.keystr(path): np.asarray(value)
           for path, value in jax.tree_util.tree_flatten_with_path(restored['state'])[0]}
  data = [json.loads(f.read_text()) for f in sorted((directory / str(step) / 'data').glob('*.json'))]
  return step, state, data


def assert_bitwise_equal(state, reference) -> None:
  """Every array of two train states has the same dtype, shape and bits."""
  assert state.keys() == reference.keys()
  different = [k for k in state if state[k].dtype != reference[k].dtype
               or state[k].shape != reference[k].shape
               or state[k].tobytes() != reference[k].tobytes()]
  assert not different, f'{len(different)} of {len(state)} arrays differ: {different[:5]}'


# Every process of the tests that compare topologies runs this many intra-op threads: XLA's CPU
# client sizes its thread pool max(NPROC or the core count, local devices), and Eigen splits
# each convolution by the pool's size, so without it a process of 2 devices and one of 4 compute
# the same convolution differently in the last bits (docs/reliability.md).
INTRA_OP_THREADS = 4


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def coordinates(num_processes: int) -> list[dict[str, str]]:
  """Per process, the variables by which `num_processes` processes find each other through
  jax.distributed, with INTRA_OP_THREADS threads each. One process (`num_processes=1`) then also
  reduces across its devices through gloo, in the order of a pod's processes."""
  address = f'127.0.0.1:{free_port()}'
  return [{'STOMPP_COORDINATOR_ADDRESS': address, 'STOMPP_NUM_PROCESSES': str(num_processes),
           'STOMPP_PROCESS_ID': str(i), 'NPROC': str(INTRA_OP_THREADS)}
          for i in range(num_processes)]
