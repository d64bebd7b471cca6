"""Two processes on localhost, joined by jax.distributed with CPU collectives (gloo), each with
2 fake CPU devices: they train like one process with 4 devices and the same global batch, and a
SIGTERM to one of them stops both at the same step with a checkpoint to resume from."""

import json
import re
import signal
import socket

import jax
import numpy as np
import pytest

import reliability_utils as ru

# Short enough that the float differences of another reduction order cannot grow through the
# binarization's signs; long enough for a SIGTERM to land mid-run.
# Re-estimated BatchNorm statistics (2 batches) before the final eval, across processes too.
FLAGS = {'train.num_steps': 24, 'train.log_every': 1, 'train.checkpoint_every': 4,
         'train.recalibrate_bn_batches': 2}
PROCESSES, DEVICES_PER_PROCESS = 2, 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_processes(workdir, name) -> list[ru.Cli]:
  """The same command in PROCESSES processes that find each other through a coordinator."""
  address = f'127.0.0.1:{_free_port()}'
  return [ru.Cli(workdir, workdir / f'{name}_{i}.txt', DEVICES_PER_PROCESS,
                 env={'STOMPP_COORDINATOR_ADDRESS': address,
                      'STOMPP_NUM_PROCESSES': str(PROCESSES), 'STOMPP_PROCESS_ID': str(i)},
                 **FLAGS)
          for i in range(PROCESSES)]


def _finish(clis: list[ru.Cli], expected_status=0) -> None:
  statuses = [cli.wait(timeout=400) for cli in clis]
  if statuses != [expected_status] * len(clis):
    output = '\n'.join(f'--- process {i}:\n{cli.output()[-2500:]}' for i, cli in enumerate(clis))
    if re.search(r'collective|gloo', output, re.IGNORECASE):
      pytest.fail(f'CPU collectives across processes do not work with this JAX {jax.__version__}'
                  f' (exit statuses {statuses}), so multi-process training is untested:\n{output}')
    raise AssertionError(f'exit statuses {statuses}, expected {expected_status}:\n{output}')


def _train_losses(workdir) -> list[float]:
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  return [r['loss'] for r in rows if r['split'] == 'train']


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  """Workdirs of a 2-process run and of a 1-process, 4-device run of the same config."""
  if 'jax_cpu_collectives_implementation' not in jax.config.values:
    pytest.fail(f'JAX {jax.__version__} has no CPU collectives (jax_cpu_collectives_implementation):'
                ' multi-process training cannot be tested on CPU.')
  multi, single = tmp_path_factory.mktemp('two_processes'), tmp_path_factory.mktemp('one_process')
  clis = _start_processes(multi, 'run')
  reference = ru.Cli(single, single / 'run.txt', PROCESSES * DEVICES_PER_PROCESS, **FLAGS)
  _finish(clis)
  _finish([reference])
  return multi, single


def test_two_processes_train_like_one_process_with_the_same_global_batch(two_processes):
  multi, single = two_processes
  losses = _train_losses(multi)
  assert len(losses) == FLAGS['train.num_steps']
  np.testing.assert_allclose(losses, _train_losses(single), rtol=2e-4)
  _, state, data = ru.read_checkpoint(multi)
  _, reference, reference_data = ru.read_checkpoint(single)
  assert state.keys() == reference.keys()
  for key in state:
    np.testing.assert_allclose(state[key], reference[key], rtol=2e-3, atol=2e-5, err_msg=key)
  assert [d['next_batch'] for d in data] == [reference_data[0]['next_batch']] * PROCESSES
  assert json.loads((multi / 'done.json').read_text())['step'] == FLAGS['train.num_steps']
  done, reference_done = (json.loads((d / 'done.json').read_text()) for d in (multi, single))
  np.testing.assert_allclose(done['eval_fully_binary_recalibrated_loss'],
                             reference_done['eval_fully_binary_recalibrated_loss'], rtol=1e-3)


def test_sigterm_to_one_process_stops_all_at_one_step_and_they_resume(tmp_path, two_processes):
  clis = _start_processes(tmp_path, 'preempted')
  ru.wait_for_checkpoint(clis[0], tmp_path, min_step=4)
  clis[1].signal(signal.SIGTERM)  # One host is preempted; the preemption service tells all.
  _finish(clis, ru.PREEMPTED_EXIT_CODE)
  saved = {int(re.search(r'Preempted \(SIGTERM\): saved the checkpoint at step (\d+)',
                         cli.output()).group(1)) for cli in clis}
  assert len(saved) == 1, f'the processes saved different steps: {saved}'
  step = saved.pop()
  assert ru.checkpoint_steps(tmp_path)[-1] == step < FLAGS['train.num_steps']

  clis = _start_processes(tmp_path, 'rerun')
  _finish(clis)
  for cli in clis:
    assert f'Resumed from the checkpoint at step {step}' in cli.output()
  _, state, data = ru.read_checkpoint(tmp_path)
  _, reference, reference_data = ru.read_checkpoint(two_processes[0])
  ru.assert_bitwise_equal(state, reference)
  assert data == reference_data
