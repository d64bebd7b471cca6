"""Two processes on localhost, joined by jax.distributed with CPU collectives (gloo), each with
2 fake CPU devices: they train like one process with 4 devices and the same global batch, and a
SIGTERM to one of them stops both at the same step with a checkpoint to resume from."""

import contextlib
import http.server
import json
import re
import signal
import socket
import threading
import types

import jax
import numpy as np
import pytest

import reliability_utils as ru
from stompp_jax import parallel

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


# --- Which jobs start jax.distributed: JAX's own cluster detection, each environment simulated.

CLUSTER_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                     'SLURM_LOCALID', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES',
                     'TPU_SKIP_MDS_QUERY', 'MEGASCALE_NUM_SLICES', 'KUBERNETES_SERVICE_HOST',
                     'OMPI_MCA_orte_hnp_uri', 'GCE_METADATA_IP', 'STOMPP_COORDINATOR_ADDRESS')


@pytest.fixture
def cluster(monkeypatch):
  """No cluster variables; `initialize` records the calls of jax.distributed.initialize."""
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)

  def on_tpu_vm():  # What jax's TPU start-up sets on a Cloud TPU VM.
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
  return types.SimpleNamespace(calls=calls, setenv=monkeypatch.setenv, delenv=monkeypatch.delenv,
                               on_tpu_vm=on_tpu_vm)


@contextlib.contextmanager
def _metadata_server(workers: int):
  """A GCE metadata server on loopback, as a TPU VM of `workers` hosts sees it."""
  values = {'agent-worker-number': '0',
            'worker-network-endpoints': ','.join(f'w{i}:{i}:10.0.0.{i + 2}' for i in range(workers))}

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # pylint: disable=invalid-name
      value = values.get(self.path.rsplit('/', 1)[-1])
      self.send_response(200 if value is not None else 404)
      self.end_headers()
      self.wfile.write((value or '').encode())

    def log_message(self, *args):
      del args

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'127.0.0.1:{server.server_address[1]}'
  finally:
    server.shutdown()


def _slurm(cluster, ntasks: int):
  for name, value in {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]',
                      'SLURM_NTASKS': str(ntasks), 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}.items():
    cluster.setenv(name, value)


def test_outside_a_cluster_jax_distributed_is_not_started(cluster):
  assert parallel.cluster_process_count() == 1
  parallel.initialize_distributed()
  assert cluster.calls == []


@pytest.mark.parametrize('ntasks, starts', [(1, False), (4, True)])
def test_slurm_job_starts_jax_distributed_when_it_has_several_tasks(cluster, ntasks, starts):
  _slurm(cluster, ntasks)
  assert parallel.cluster_process_count() == ntasks
  parallel.initialize_distributed()
  assert cluster.calls == ([((), {})] if starts else [])


def test_slurm_batch_script_outside_srun_is_one_process(cluster):
  _slurm(cluster, 4)
  cluster.delenv('SLURM_STEP_NODELIST')  # sbatch's own shell: no job step.
  assert parallel.cluster_process_count() == 1


@pytest.mark.parametrize('workers, starts', [(1, False), (4, True)])
def test_cloud_tpu_vm_found_through_the_metadata_server(cluster, workers, starts):
  cluster.on_tpu_vm()
  cluster.setenv('MEGASCALE_NUM_SLICES', '1')
  with _metadata_server(workers) as address:
    cluster.setenv('GCE_METADATA_IP', address)
    assert parallel.cluster_process_count() == workers
    parallel.initialize_distributed()
  assert cluster.calls == ([((), {})] if starts else [])


def test_gke_tpu_found_through_its_worker_hostnames(cluster):
  cluster.on_tpu_vm()
  cluster.setenv('TPU_SKIP_MDS_QUERY', '1')
  cluster.setenv('MEGASCALE_NUM_SLICES', '2')
  cluster.setenv('TPU_WORKER_HOSTNAMES', 'h0,h1')
  assert parallel.cluster_process_count() == 4  # 2 hosts a slice x 2 slices.
  parallel.initialize_distributed()
  assert cluster.calls == [((), {})]


def test_explicit_coordinator_variables_win(cluster):
  _slurm(cluster, 4)
  cluster.setenv('STOMPP_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  cluster.setenv('STOMPP_NUM_PROCESSES', '2')
  cluster.setenv('STOMPP_PROCESS_ID', '1')
  parallel.initialize_distributed()
  assert cluster.calls == [((), {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2,
                                 'process_id': 1})]
