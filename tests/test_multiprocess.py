"""Two processes on localhost, joined by jax.distributed with CPU collectives (gloo), each with
2 fake CPU devices: they train bitwise like one process with 4 devices and the same global batch
(run as a one-process jax.distributed job with the same intra-op threads, which reduces in gloo's
order: docs/reliability.md), they re-estimate BatchNorm statistics like it, and a SIGTERM to one
of them stops both at the same step with a checkpoint to resume from.

Run as a script (`python tests/test_multiprocess.py recalibrate|sum OUT.npz`), this file is
one process of the re-estimation test or of the cross-device sum's (process 0 writes OUT)."""

import contextlib
import http.server
import json
import re
import signal
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import pytest

from helpers import REPO
import reliability_utils as ru
from configs import default
from stompp_jax import experiment
from stompp_jax import parallel
from stompp_jax import recalibrate

# Long enough for a SIGTERM to land mid-run; re-estimated BatchNorm statistics (2 batches) before
# the final eval, across processes too. 24 steps, not ru.TINY_FLAGS' 60: 2 x 2 and 1 x 4 devices
# compile programs of their own anyway (shared with test_gcs.py's rehearsal), and a step across
# processes is slow.
FLAGS = {'train.num_steps': 24, 'train.log_every': 1, 'train.checkpoint_every': 4,
         'train.recalibrate_bn_batches': 2}
PROCESSES, DEVICES_PER_PROCESS = 2, 2


def _start_processes(workdir, name) -> list[ru.Cli]:
  """The same command in PROCESSES processes that find each other through a coordinator."""
  return [ru.Cli(workdir, workdir / f'{name}_{i}.txt', DEVICES_PER_PROCESS, env=env, **FLAGS)
          for i, env in enumerate(ru.coordinates(PROCESSES))]


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
  reference = ru.Cli(single, single / 'run.txt', PROCESSES * DEVICES_PER_PROCESS,
                     env=ru.coordinates(1)[0], **FLAGS)
  _finish(clis)
  _finish([reference])
  return multi, single


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_like_one_process_with_the_same_global_batch(two_processes):
  multi, single = two_processes
  losses = _train_losses(multi)
  assert len(losses) == FLAGS['train.num_steps']
  assert losses == _train_losses(single)
  _, state, data = ru.read_checkpoint(multi)
  _, reference, reference_data = ru.read_checkpoint(single)
  ru.assert_bitwise_equal(state, reference)
  assert [d['next_batch'] for d in data] == [reference_data[0]['next_batch']] * PROCESSES
  assert json.loads((multi / 'done.json').read_text())['step'] == FLAGS['train.num_steps']
  done, reference_done = (json.loads((d / 'done.json').read_text()) for d in (multi, single))
  assert (done['eval_fully_binary_recalibrated_loss']
          == reference_done['eval_fully_binary_recalibrated_loss'])


@pytest.mark.multiprocess
@pytest.mark.slow
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


# --- Re-estimated BatchNorm statistics across processes.

RECALIBRATION_BATCH, RECALIBRATION_BATCHES = 16, 3


def recalibrated_statistics() -> dict[str, np.ndarray]:
  """{path: (C,) array} of the fully binary tiny_resnet's BatchNorm statistics at init,
  re-estimated on its first RECALIBRATION_BATCHES train batches (each process loads its slice),
  on every device of every process."""
  config = default.get_config()
  config.model.name = 'tiny_resnet'
  config.data.source = 'synthetic'
  config.data.synthetic_image_shape = (16, 16, 3)
  config.data.synthetic_num_classes = 4
  config.data.synthetic_train_size = 256
  config.train.batch_size = RECALIBRATION_BATCH
  exp = experiment.build(config)
  state = jax.jit(exp.init_state, out_shardings=exp.state_shardings)()
  recalibrator = recalibrate.Recalibrator(exp.model, exp.binarization, exp.abstract_state,
                                          exp.state_shardings,
                                          exp.abstract_batch(RECALIBRATION_BATCH),
                                          RECALIBRATION_BATCHES)
  state = recalibrate.recalibrated_state(recalibrator, state, config.data,
                                         global_batch_size=RECALIBRATION_BATCH, seed=config.seed,
                                         mesh=exp.mesh)
  return {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
          for path, leaf in jax.tree_util.tree_flatten_with_path(state.batch_stats)[0]}


def _run_processes(tmp_path, task: str, processes: int = PROCESSES,
                   devices_per_process: int = DEVICES_PER_PROCESS) -> dict[str, np.ndarray]:
  """Runs this file as a jax.distributed job of `processes` processes doing `task`; returns what
  process 0 wrote."""
  out = tmp_path / f'{task}_{processes}.npz'
  env = {**ru.cli_env(devices_per_process), 'PYTHONPATH': str(REPO)}
  logs = [tmp_path / f'{task}_{processes}_{i}.txt' for i in range(processes)]
  files = [open(log, 'w', encoding='utf-8') for log in logs]
  runs = [subprocess.Popen([sys.executable, __file__, task, str(out)], cwd=REPO,
                           env={**env, **coordinates}, stdout=f, stderr=subprocess.STDOUT)
          for coordinates, f in zip(ru.coordinates(processes), files)]
  for run, f in zip(runs, files):
    try:
      run.wait(timeout=300)
    finally:
      run.kill()
      f.close()
  assert [r.returncode for r in runs] == [0] * processes, '\n'.join(
      log.read_text()[-2500:] for log in logs)
  return dict(np.load(out))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_re_estimate_batch_norm_statistics_like_one_process(tmp_path):
  got = _run_processes(tmp_path, 'recalibrate')
  expected = _run_processes(tmp_path, 'recalibrate', 1, PROCESSES * DEVICES_PER_PROCESS)
  assert got.keys() == expected.keys() and len(got) % 2 == 0
  for key in got:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# --- The order in which a cross-device sum adds the devices' partial sums (docs/reliability.md).

def summands() -> np.ndarray:
  """(4, 4096) float32 of magnitudes 1e-3..1e3: row d is device d's partial sum."""
  rng = np.random.default_rng(0)
  return (rng.standard_normal((4, 4096)) * 10.0 ** rng.integers(-3, 4, (4, 4096))).astype(np.float32)


def cross_device_sum(num_devices: int = 0) -> dict[str, np.ndarray]:
  """{'sum': (4096,)}: the rows of `summands()`, one a device, summed by a jitted jnp.sum
  (an all-reduce); each process loads its devices' rows."""
  mesh = parallel.make_mesh(num_devices)
  rows = summands()
  local = len(rows) // jax.process_count()
  x = parallel.global_batch({'x': rows[jax.process_index() * local:][:local]}, mesh)['x']
  total = jax.jit(lambda a: a.sum(0), out_shardings=parallel.replicated(mesh))(x)
  return {'sum': np.asarray(total.addressable_data(0))}


@pytest.mark.canary
@pytest.mark.multiprocess
def test_one_process_sums_in_device_order_gloo_in_ring_order(tmp_path):
  """A canary (run with --canary), not a property of this project: XLA's in-process
  communicator adds in device order; gloo, which a jax.distributed job uses even with one
  process, in ring order. When a jax or gloo upgrade changes either order, this fails and says
  why runs of one and of several processes no longer agree bit for bit."""
  x = summands()
  devices, size = x.shape
  assert devices == PROCESSES * DEVICES_PER_PROCESS
  in_order = ((x[0] + x[1]) + x[2]) + x[3]
  np.testing.assert_array_equal(cross_device_sum(devices)['sum'], in_order)
  # gloo's ring all-reduce: chunk c of the buffer is summed along the ring c-1, c-2, ..., c.
  got = _run_processes(tmp_path, 'sum')['sum']
  np.testing.assert_array_equal(_run_processes(tmp_path, 'sum', 1, devices)['sum'], got)
  chunk = size // devices
  for c in range(devices):
    part = slice(c * chunk, (c + 1) * chunk)
    ring = [(c - 1 - k) % devices for k in range(devices)]
    expected = x[ring[0], part]
    for d in ring[1:]:
      expected = expected + x[d, part]
    np.testing.assert_array_equal(got[part], expected, err_msg=f'chunk {c}')
  assert np.any(got != in_order)  # The two orders differ on these summands.


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


if __name__ == '__main__':
  parallel.initialize_distributed()
  results = {'recalibrate': recalibrated_statistics, 'sum': cross_device_sum}[sys.argv[1]]()
  if jax.process_index() == 0:
    np.savez(sys.argv[2], **results)
