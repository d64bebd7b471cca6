"""Run directories on Cloud Storage, against a real GCS emulator (gcp-storage-emulator) on
loopback: metric parts, a CLI run resumed from the bucket, analysis and export of a gs:// run,
and a rehearsal of a pod (2 processes x 2 CPU devices, one SIGKILLed, resumed from the bucket:
bitwise equal to one process with 4 devices and the same global batch, uninterrupted)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import fsspec
import pytest

from helpers import REPO
import reliability_utils as ru
from stompp_jax import metrics as metrics_lib
from stompp_jax import storage
from stompp_jax import workdir as workdir_lib

BUCKET = 'bucket'


@pytest.fixture(scope='module')
def gcs():
  """A GCS emulator on loopback with BUCKET; the clients of this process and of the CLI
  subprocesses (which inherit os.environ) reach it. Yields the bucket's gs:// URL."""
  port = ru.free_port()
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen(
      [sys.executable, str(pathlib.Path(__file__).with_name('gcs_emulator.py')), 'start',
       '--host=127.0.0.1', f'--port={port}', '--in-memory', f'--default-bucket={BUCKET}'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}', timeout=1).read()
      break
    except OSError:
      if time.monotonic() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail('the GCS emulator did not start (pip install -r requirements-test.txt)')
      time.sleep(0.2)
  saved = dict(os.environ)
  # gcsfs would first ask for the bucket type over gRPC, which an emulator does not serve (each
  # probe then waits 60 s); tensorstore (orbax's arrays) and gcsfs (every other file) use `url`.
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')
  try:
    yield f'gs://{BUCKET}'
  finally:
    os.environ.clear()
    os.environ.update(saved)
    server.kill()
    server.wait()


def _listing(url: str) -> list[str]:
  """Names under `url`, read fresh from the server (gcsfs caches listings)."""
  fs = fsspec.filesystem('gs')
  fs.invalidate_cache()
  return sorted(p.rsplit('/', 1)[-1] for p in fs.ls(url.removeprefix('gs://'))) if fs.exists(url) else []


def _steps(workdir: str) -> list[int]:
  return sorted(int(n) for n in _listing(f'{workdir}/checkpoints') if n.isdigit())


def test_metric_rows_are_parts_until_closed_then_one_file(gcs, monkeypatch):
  monkeypatch.setattr(storage, 'PART_BYTES', 100)  # A few rows a part.
  workdir = f'{gcs}/parts'
  writer = metrics_lib.MetricWriter(workdir)
  rows = [{'step': s, 'split': 'train', 'loss': float(s)} for s in range(1, 7)]
  for row in rows:
    writer.write(row['step'], 'train', {'loss': row['loss']})
  assert metrics_lib.read_metrics(workdir) == rows  # Readable while running.
  assert len(_listing(f'{workdir}/{workdir_lib.METRICS_PARTS}')) > 1
  assert workdir_lib.METRICS not in _listing(workdir)
  writer.close()
  assert metrics_lib.read_metrics(workdir) == rows
  assert _listing(f'{workdir}/{workdir_lib.METRICS_PARTS}') == []
  assert len(_listing(f'{workdir}/{workdir_lib.TENSORBOARD}')) > 1

  resumed = metrics_lib.MetricWriter(workdir, start_step=4)
  resumed.write(7, 'train', {'loss': 7.0})  # Killed: never closed.
  metrics_lib.trim(workdir, 4)
  assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3, 4]


def test_cli_run_in_a_bucket_twice_then_analysis_and_export(gcs, tmp_path):
  workdir = f'{gcs}/run'
  flags = {'train.log_every': 30, 'train.checkpoint_every': 30}  # Of ru.TINY_FLAGS' 60 steps.
  ru.run_cli(workdir, tmp_path / 'first.txt', **flags)
  output = ru.run_cli(workdir, tmp_path / 'second.txt', **flags)
  assert 'is a finished run (done.json): nothing to do' in output
  assert not (REPO / 'gs:').exists(), 'a local folder named gs: was written'
  names = _listing(workdir)
  for name in ('config.json', 'metrics.jsonl', 'done.json', 'checkpoints', 'tensorboard'):
    assert name in names, names
  assert _steps(workdir) == [30, 60]
  assert [r['step'] for r in metrics_lib.read_metrics(workdir) if r['split'] == 'train'] == [30, 60]

  env = ru.cli_env(1)
  plots = subprocess.run([sys.executable, '-m', 'stompp_jax.analysis', workdir,
                          f'--out={tmp_path / "plots"}'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert plots.returncode == 0, plots.stderr[-2000:]
  assert (tmp_path / 'plots' / 'curves.png').stat().st_size > 0
  export = subprocess.run([sys.executable, '-m', 'stompp_jax.export', f'--workdir={workdir}',
                           f'--out={tmp_path / "export"}'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert export.returncode == 0, export.stderr[-2000:]
  manifest = json.loads((tmp_path / 'export' / 'manifest.json').read_text())
  assert manifest['source']['workdir'] == workdir and manifest['source']['step'] == 60


# The rehearsal: the flags of tests/test_multiprocess.py (24 steps: its own compiled programs on
# 2 x 2 and 1 x 4 devices, shared with that file's).
POD_FLAGS = {'train.num_steps': 24, 'train.log_every': 1, 'train.checkpoint_every': 4}
PROCESSES, DEVICES_PER_PROCESS = 2, 2


def _pod(workdir: str, logs: pathlib.Path, name: str) -> list[ru.Cli]:
  return [ru.Cli(workdir, logs / f'{name}_{i}.txt', DEVICES_PER_PROCESS, env=env, **POD_FLAGS)
          for i, env in enumerate(ru.coordinates(PROCESSES))]


def _wait(clis: list[ru.Cli], timeout=400) -> list[int]:
  return [cli.wait(timeout=timeout) for cli in clis]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_pod_rehearsal_in_a_bucket_sigkill_one_process_and_resume(gcs, tmp_path):
  workdir = f'{gcs}/pod'
  timings = {}
  start = time.monotonic()
  # One process with the pod's 4 devices and global batch, on local disk, uninterrupted; a
  # one-process jax.distributed job, so it reduces in the pod's order (docs/reliability.md).
  single = ru.Cli(tmp_path / 'single', tmp_path / 'single.txt', PROCESSES * DEVICES_PER_PROCESS,
                  env=ru.coordinates(1)[0], **POD_FLAGS)
  clis = _pod(workdir, tmp_path, 'killed')
  deadline = time.monotonic() + 300
  while not [s for s in _steps(workdir) if s >= 8]:
    assert time.monotonic() < deadline and all(c.process.poll() is None for c in clis), (
        '\n'.join(c.output()[-2000:] for c in clis))
    time.sleep(0.2)
  timings['to the checkpoint at step 8'] = time.monotonic() - start
  clis[1].signal(signal.SIGKILL)  # One host dies mid-run; the other fails or hangs.
  statuses = []
  for cli in clis:
    try:
      statuses.append(cli.process.wait(timeout=120))
    except subprocess.TimeoutExpired:
      cli.process.kill()
      statuses.append(cli.process.wait())
  assert statuses[1] == -signal.SIGKILL
  assert not _listing(workdir).count('done.json')
  killed_at = _steps(workdir)[-1]
  assert killed_at < POD_FLAGS['train.num_steps']

  start = time.monotonic()
  rerun = _pod(workdir, tmp_path, 'rerun')
  statuses = _wait(rerun)
  timings['the resumed pod'] = time.monotonic() - start
  assert statuses == [0, 0], '\n'.join(c.output()[-3000:] for c in rerun)
  for cli in rerun:
    assert 'Resumed from the checkpoint at step' in cli.output()
  assert _wait([single]) == [0], single.output()[-3000:]
  print('rehearsal timings (s):', {k: round(v, 1) for k, v in timings.items()})

  _, state, data = ru.read_checkpoint(workdir)
  _, expected, expected_data = ru.read_checkpoint(tmp_path / 'single')
  ru.assert_bitwise_equal(state, expected)
  assert [d['next_batch'] for d in data] == [expected_data[0]['next_batch']] * PROCESSES
  rows = metrics_lib.read_metrics(workdir)
  assert [r['step'] for r in rows if r['split'] == 'train'] == list(range(1, 25))
  assert ([r['loss'] for r in rows if r['split'] == 'train']
          == [r['loss'] for r in metrics_lib.read_metrics(tmp_path / 'single')
              if r['split'] == 'train'])
