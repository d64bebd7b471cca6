"""Tests of launch/: shellcheck, and each script run against fake gcloud / srun / python
executables on PATH that record their arguments, so nothing reaches a cloud, a cluster or JAX."""

import functools
import importlib
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from launch import sweep, sweeps

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_VM = str(ROOT / 'launch' / 'tpu_vm.sh')
SPACE_OVERRIDE = '--config.data.dir=/tmp/my data'
TRAIN_ARGS = ['--config=configs/imagenet_r50.py', '--workdir=gs://my-bucket/runs/r50_bnn',
              SPACE_OVERRIDE, "--config.model.binary_exclude=('^stem', \"$HOME\")"]
SETTINGS = ['--name=stompp-v4', '--zone=us-central2-b', '--accelerator-type=v4-32',
            '--project=my-project']
TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']
WHERE = ['--zone=us-central2-b', '--project=my-project']

# Appends {"argv", "env" (the variables that choose devices), "cwd"} as one JSON line to
# $FAKE_LOG, with the member names of any .tgz argument; prints a line; exits $FAKE_STATUS (1 by
# default) if $FAKE_FAIL occurs in that JSON line.
RECORDER = f"""#!{sys.executable}
import json, os, sys, tarfile
record = {{'argv': [os.path.basename(sys.argv[0]), *sys.argv[1:]], 'cwd': os.getcwd(),
          'env': {{k: v for k, v in os.environ.items() if k.startswith(('STOMPP_', 'CUDA_'))}}}}
for arg in sys.argv[1:]:
  if arg.endswith('.tgz') and os.path.isfile(arg):
    record['archive'] = tarfile.open(arg).getnames()
line = json.dumps(record)
with open(os.environ['FAKE_LOG'], 'a') as f:
  f.write(line + '\\n')
print('fake', record['argv'][0])
sys.exit(int(os.environ.get('FAKE_STATUS', '1')) if os.environ.get('FAKE_FAIL', '\\0') in line else 0)
"""


class Fakes:
  """A bin/ folder of recorders for PATH, and the calls they recorded."""

  def __init__(self, tmp_path: pathlib.Path):
    self.bin = tmp_path / 'bin'
    self.bin.mkdir()
    self.log = tmp_path / 'calls.jsonl'

  def add(self, name: str, folder: pathlib.Path | None = None) -> None:
    path = (folder or self.bin) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER)
    path.chmod(0o755)

  def env(self, **extra: str) -> dict[str, str]:
    settings = ('NAME', 'ZONE', 'PROJECT', 'ACCELERATOR_TYPE', 'RUNTIME_VERSION', 'REPO', 'BRANCH',
                'PYTHON_VERSION', 'BUCKET', 'DATA_BUCKET', 'GPUS', 'CUDA_VISIBLE_DEVICES', 'PYTHON')
    env = {k: v for k, v in os.environ.items()
           if k not in settings and not k.startswith(('SLURM', 'STOMPP_'))}
    return {**env, 'PATH': f'{self.bin}:{env["PATH"]}', 'FAKE_LOG': str(self.log), **extra}

  def calls(self) -> list[dict]:
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def argvs(self) -> list[list[str]]:
    return [call['argv'] for call in self.calls()]


@pytest.fixture
def fakes(tmp_path):
  fakes = Fakes(tmp_path)
  for name in ('gcloud', 'srun', 'python', 'sbatch', 'scontrol'):
    fakes.add(name)
  return fakes


def tpu_vm(fakes, *args, env=None, cwd=None):
  return subprocess.run(['bash', TPU_VM, *args], env=fakes.env(**(env or {})), cwd=cwd,
                        capture_output=True, text=True, timeout=60)


def remote_command(argv: list[str]) -> str:
  [command] = [a.removeprefix('--command=') for a in argv if a.startswith('--command=')]
  return command


def run_remote(command: str, home: pathlib.Path, fakes: Fakes):
  """Runs a recorded --command as a worker's login shell would: bash -c, in the home folder."""
  return subprocess.run(['bash', '-c', command], cwd=home, capture_output=True, text=True,
                        env=fakes.env(HOME=str(home)), timeout=60)


def wait_for_calls(fakes: Fakes, count: int) -> list[dict]:
  deadline = time.monotonic() + 20
  while len(fakes.calls()) < count and time.monotonic() < deadline:
    time.sleep(0.05)
  return fakes.calls()


def test_shell_scripts_pass_shellcheck():
  scripts = sorted(ROOT.glob('launch/*.sh')) + sorted(ROOT.glob('launch/*.sbatch'))
  assert {p.name for p in scripts} >= {'tpu_vm.sh', 'gpu_local.sh', 'gpu_slurm.sbatch'}
  result = subprocess.run(['shellcheck', *map(str, scripts)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_create_and_create_queued(fakes):
  assert tpu_vm(fakes, *SETTINGS, 'create').returncode == 0
  assert tpu_vm(fakes, *SETTINGS, '--runtime-version=v2-alpha-tpuv5', 'create', '--',
                '--spot').returncode == 0
  assert tpu_vm(fakes, *SETTINGS, 'create-queued').returncode == 0
  assert fakes.argvs() == [
      [*TPU, 'create', 'stompp-v4', '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base',
       *WHERE],
      [*TPU, 'create', 'stompp-v4', '--accelerator-type=v4-32', '--version=v2-alpha-tpuv5',
       '--spot', *WHERE],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'stompp-v4',
       '--node-id=stompp-v4', '--accelerator-type=v4-32',
       '--runtime-version=tpu-ubuntu2204-base', *WHERE],
  ]


def test_tpu_settings_from_environment(fakes):
  env = {'NAME': 'env-vm', 'ZONE': 'europe-west4-a', 'ACCELERATOR_TYPE': 'v5litepod-16'}
  assert tpu_vm(fakes, 'create', env=env).returncode == 0
  assert fakes.argvs() == [[*TPU, 'create', 'env-vm', '--accelerator-type=v5litepod-16',
                            '--version=tpu-ubuntu2204-base', '--zone=europe-west4-a']]


@pytest.mark.parametrize('args, error', [
    (['--name=vm', 'create'], 'ACCELERATOR_TYPE is not set: pass --accelerator-type=...'),
    (['--name=vm', '--accelerator-type=v4-8', 'create'], 'ZONE is not set: pass --zone=...'),
    (['--zone=z', 'status'], 'NAME is not set: pass --name=... or export NAME=...'),
    (['fetch'], 'BUCKET is not set'),
    ([*SETTINGS, 'train'], 'train needs the arguments of stompp_jax.main'),
    ([*SETTINGS, 'sweep'], 'sweep needs a grid'),
    (['--name', 'vm', 'create'], "unknown command '--name'"),
    (['--nmae=vm', 'create'], 'unknown setting --nmae'),
    ([], 'usage: launch/tpu_vm.sh'),
])
def test_tpu_errors_name_what_is_missing(fakes, args, error):
  result = tpu_vm(fakes, *args)
  assert result.returncode == 2
  assert error in result.stderr
  assert fakes.calls() == []


@pytest.mark.parametrize('command, module', [
    ('train', ['stompp_jax.main']),
    ('sweep', ['launch.sweep', '--run']),
])
def test_tpu_start_sends_one_command_to_all_workers(fakes, tmp_path, command, module):
  result = tpu_vm(fakes, *SETTINGS, command, '--', *TRAIN_ARGS)
  assert result.returncode == 0, result.stderr
  [argv] = fakes.argvs()
  assert argv[:6] == [*TPU, 'ssh', 'stompp-v4']
  assert argv[6] == '--worker=all'
  assert argv[-2:] == WHERE

  # The recorded command, run by bash on a worker, starts the venv's python with the arguments
  # exactly as given, in the project folder, detached, with its output in train.log.
  home = tmp_path / 'home'
  fakes.add('python', home / 'stompp_jax' / '.venv' / 'bin')
  fakes.log.unlink()
  started = time.monotonic()
  assert run_remote(remote_command(argv), home, fakes).returncode == 0
  assert time.monotonic() - started < 5
  [call] = wait_for_calls(fakes, 1)
  assert call['argv'] == ['python', '-m', *module, *TRAIN_ARGS]
  assert call['cwd'] == str(home / 'stompp_jax')
  deadline = time.monotonic() + 10
  while 'fake python' not in (home / 'stompp_jax' / 'train.log').read_text():
    assert time.monotonic() < deadline
    time.sleep(0.05)


@pytest.mark.parametrize('installed', [False, True])
def test_tpu_install_from_git(fakes, tmp_path, installed):
  settings = [*SETTINGS, '--repo=https://example.com/me/stompp_jax.git', '--branch=dev']
  assert tpu_vm(fakes, *settings, 'install').returncode == 0
  [argv] = fakes.argvs()
  assert argv[:7] == [*TPU, 'ssh', 'stompp-v4', '--worker=all']

  home = tmp_path / 'home'
  (home / 'stompp_jax').mkdir(parents=True)
  if installed:
    (home / 'stompp_jax' / '.git').mkdir()
    fakes.add('python', home / 'stompp_jax' / '.venv' / 'bin')
  for name in ('git', 'uv', 'curl'):
    fakes.add(name)
  fakes.log.unlink()
  result = run_remote(remote_command(argv), home, fakes)
  assert result.returncode == 0, result.stderr
  if installed:
    get_code = [['git', '-C', 'stompp_jax', 'fetch', '--depth=1', 'origin', 'dev'],
                ['git', '-C', 'stompp_jax', 'checkout', '--force', 'FETCH_HEAD']]
  else:
    get_code = [['git', 'clone', '--depth=1', '--branch', 'dev',
                 'https://example.com/me/stompp_jax.git', 'stompp_jax'],
                ['uv', 'venv', '--python', '3.11', '.venv']]
  assert fakes.argvs() == [*get_code, ['uv', 'pip', 'install', '--python', '.venv/bin/python',
                                       '-r', 'requirements.txt', 'jax[tpu]', 'gcsfs']]


def test_tpu_install_copies_this_checkout(fakes):
  assert tpu_vm(fakes, *SETTINGS, '--python-version=3.12', 'install').returncode == 0
  scp, ssh = fakes.calls()
  assert scp['argv'][:5] == [*TPU, 'scp']
  assert scp['argv'][6:] == ['stompp-v4:stompp_jax.tgz', '--worker=all', *WHERE]
  assert {'launch/tpu_vm.sh', 'launch/sweep.py', 'configs/default.py'} <= set(scp['archive'])
  assert not [n for n in scp['archive'] if n.startswith('.git/') or '__pycache__' in n]
  assert ssh['argv'][:7] == [*TPU, 'ssh', 'stompp-v4', '--worker=all']
  command = remote_command(ssh['argv'])
  assert command.startswith('set -e; mkdir -p stompp_jax && tar -xzf stompp_jax.tgz -C stompp_jax;')
  assert 'uv venv --python 3.12 .venv' in command


def test_tpu_mount_data_mounts_the_bucket_on_every_worker(fakes, tmp_path):
  unset = tpu_vm(fakes, *SETTINGS, 'mount-data')
  assert unset.returncode == 2 and 'DATA_BUCKET is not set' in unset.stderr
  assert tpu_vm(fakes, *SETTINGS, '--data-bucket=gs://my-data', 'mount-data').returncode == 0
  [ssh] = fakes.argvs()
  assert ssh[:7] == [*TPU, 'ssh', 'stompp-v4', '--worker=all']
  # On a worker (gcsfuse, sudo and mountpoint faked; the mount point is not mounted yet):
  for name in ('gcsfuse', 'sudo', 'mountpoint'):
    fakes.add(name)
  home = tmp_path / 'home'
  home.mkdir()
  worker = subprocess.run(['bash', '-c', remote_command(ssh)], cwd=home, capture_output=True,
                          text=True, env=fakes.env(HOME=str(home), FAKE_FAIL='"mountpoint"'),
                          timeout=60)
  assert worker.returncode == 0, worker.stderr
  calls = fakes.argvs()[1:]
  assert ['mountpoint', '-q', '/mnt/stompp_data'] in calls
  assert calls[-1] == ['gcsfuse', '--implicit-dirs', '-o', 'ro', 'my-data', '/mnt/stompp_data']
  assert not [c for c in calls if 'apt-get' in c]  # gcsfuse was there already.


def test_tfds_data_in_a_bucket_is_refused_naming_the_mount(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'stompp_jax.main', '--config=configs/default.py',
       f'--workdir={tmp_path / "run"}', '--config.data.source=tfds',
       '--config.data.dir=gs://my-data/tensorflow_datasets'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2, result.stderr[-2000:]
  [line] = [l for l in result.stderr.splitlines() if l.startswith('Error: ')]
  assert 'mount-data' in line and '/mnt/stompp_data' in line
  assert not (tmp_path / 'run').exists()


def test_tpu_status_reports_each_worker(fakes, tmp_path):
  assert tpu_vm(fakes, *SETTINGS, 'status').returncode == 0
  describe, ssh = fakes.argvs()
  assert describe[:6] == [*TPU, 'describe', 'stompp-v4']
  assert ssh[:7] == [*TPU, 'ssh', 'stompp-v4', '--worker=all']

  home = tmp_path / 'home'
  (home / 'stompp_jax').mkdir(parents=True)
  (home / 'stompp_jax' / 'train.log').write_text('step 10\nstep 20 loss 1.5\n')
  # A fake pgrep answers for the worker: found (exit 0) or not (FAKE_FAIL makes it exit 1).
  fakes.add('pgrep')
  command = remote_command(ssh)
  for env, state in (({}, 'training'), ({'FAKE_FAIL': 'pgrep'}, 'idle')):
    result = subprocess.run(['bash', '-c', command], cwd=home, capture_output=True, text=True,
                            env=fakes.env(HOME=str(home), **env), timeout=60)
    assert result.stdout.split(': ', 1)[1] == f'{state} | step 20 loss 1.5\n'
  [pattern] = {tuple(c['argv']) for c in fakes.calls() if c['argv'][0] == 'pgrep'}
  assert pattern == ('pgrep', '-f', '[s]tompp_jax[.]main|[l]aunch[.]sweep')
  # The status command must not find itself: its own command line does not match the pattern.
  assert re.search(pattern[2], command) is None
  assert re.search(pattern[2], 'python -m stompp_jax.main --config=x')


def test_tpu_preflight_compiles_here_for_the_accelerator_type(fakes):
  fakes.add('python3')
  args = ['--config=configs/imagenet_r50.py', '--methods=fp,stompp']
  result = tpu_vm(fakes, '--accelerator-type=v5litepod-256', 'preflight', '--', *args)
  assert result.returncode == 0, result.stderr
  [call] = fakes.calls()  # No gcloud: nothing is created.
  assert call['argv'] == ['python3', '-m', 'stompp_jax.preflight', '--topology=v5litepod-256',
                          *args]
  assert call['cwd'] == str(ROOT)


@pytest.mark.parametrize('settings, args, error', [
    ([], ['--config=configs/imagenet_r50.py'], 'ACCELERATOR_TYPE is not set'),
    (['--accelerator-type=v4-32'], [], "preflight needs the run's config"),
])
def test_tpu_preflight_needs_a_type_and_a_config(fakes, settings, args, error):
  result = tpu_vm(fakes, *settings, 'preflight', '--', *args)
  assert result.returncode == 2 and error in result.stderr
  assert fakes.calls() == []


def test_tpu_status_of_a_queued_resource(fakes):
  result = tpu_vm(fakes, *SETTINGS, 'status', env={'FAKE_FAIL': '"tpu-vm", "describe"'})
  assert result.returncode == 0
  describe_vm, describe_queued = fakes.argvs()
  assert describe_vm[:5] == [*TPU, 'describe']
  assert describe_queued[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe',
                                 'stompp-v4']


@pytest.mark.parametrize('args, worker, command', [
    ([], '0', 'tail -n 100 stompp_jax/train.log'),
    (['3'], '3', 'tail -n 100 stompp_jax/train.log'),
    (['-f', 'all'], 'all', 'tail -n 100 -F stompp_jax/train.log'),
])
def test_tpu_logs_selects_workers(fakes, args, worker, command):
  assert tpu_vm(fakes, *SETTINGS, 'logs', *args).returncode == 0
  assert fakes.argvs() == [[*TPU, 'ssh', 'stompp-v4', f'--worker={worker}',
                            f'--command={command}', *WHERE]]


def test_tpu_fetch_and_delete(fakes, tmp_path):
  settings = [*SETTINGS, '--bucket=gs://my-bucket']
  for args in (['fetch', 'r50_bnn_cifar'], ['fetch', '--checkpoints'], ['delete'],
               ['delete-queued']):
    assert tpu_vm(fakes, *settings, *args, cwd=tmp_path).returncode == 0
  assert fakes.argvs() == [
      ['gcloud', 'storage', 'rsync', '--recursive', '--exclude=(.*/)?checkpoints/.*',
       'gs://my-bucket/runs/r50_bnn_cifar', 'runs/r50_bnn_cifar'],
      ['gcloud', 'storage', 'rsync', '--recursive', 'gs://my-bucket/runs', 'runs'],
      [*TPU, 'delete', 'stompp-v4', '--quiet', *WHERE],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'stompp-v4', '--force',
       '--quiet', *WHERE],
  ]
  assert (tmp_path / 'runs' / 'r50_bnn_cifar').is_dir()


def slurm_env(fakes, **extra):
  return fakes.env(**{'SLURM_JOB_ID': '4242', 'SLURM_NTASKS': '16', 'SLURM_JOB_NUM_NODES': '2',
                      'SLURM_CPUS_PER_TASK': '8', 'SLURM_SUBMIT_DIR': str(ROOT), **extra})


def test_slurm_runs_one_task_per_gpu_with_srun(fakes, tmp_path):
  script = ROOT / 'launch' / 'gpu_slurm.sbatch'
  directives = dict(line.removeprefix('#SBATCH --').partition('=')[::2]
                    for line in script.read_text().splitlines() if line.startswith('#SBATCH --'))
  assert directives['ntasks-per-node'] == directives['gpus-per-node']

  # sbatch runs the script from a spool folder; it must work from SLURM_SUBMIT_DIR.
  result = subprocess.run(['bash', str(script), *TRAIN_ARGS], env=slurm_env(fakes), cwd=tmp_path,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  [call] = fakes.calls()
  assert call['argv'] == ['srun', '--kill-on-bad-exit=1', 'python', '-m', 'stompp_jax.main',
                          *TRAIN_ARGS, '--config.data.num_workers=7']
  assert call['cwd'] == str(ROOT)


def test_slurm_signals_before_the_time_limit_and_requeues_a_preempted_run(fakes):
  script = ROOT / 'launch' / 'gpu_slurm.sbatch'
  directives = [line.removeprefix('#SBATCH ') for line in script.read_text().splitlines()
                if line.startswith('#SBATCH ')]
  assert '--requeue' in directives
  [signal_spec] = [d.removeprefix('--signal=') for d in directives if d.startswith('--signal=')]
  name, seconds = signal_spec.split('@')
  assert name == 'TERM' and int(seconds) >= 600  # The tasks' SIGTERM checkpoint, then exit 75.
  # srun exits 75 (EX_TEMPFAIL): the trainer saved a checkpoint after SIGTERM.
  result = subprocess.run(['bash', str(script), *TRAIN_ARGS],
                          env=slurm_env(fakes, FAKE_FAIL='"srun"', FAKE_STATUS='75'),
                          capture_output=True, text=True)
  assert result.returncode == 75, result.stderr
  assert fakes.argvs()[-1] == ['scontrol', 'requeue', '4242']
  assert 'requeue' in result.stderr


def test_slurm_does_not_requeue_a_failed_run(fakes):
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'gpu_slurm.sbatch'), *TRAIN_ARGS],
                          env=slurm_env(fakes, FAKE_FAIL='"srun"'), capture_output=True, text=True)
  assert result.returncode == 1
  assert [a[0] for a in fakes.argvs()] == ['srun']


def test_slurm_grain_workers_follow_cpus_per_task_unless_given(fakes):
  script = str(ROOT / 'launch' / 'gpu_slurm.sbatch')
  subprocess.run(['bash', script, *TRAIN_ARGS], env=slurm_env(fakes, SLURM_CPUS_PER_TASK='4'),
                 check=True, capture_output=True)
  subprocess.run(['bash', script, *TRAIN_ARGS, '--config.data.num_workers=2'],
                 env=slurm_env(fakes, SLURM_CPUS_PER_TASK='4'), check=True, capture_output=True)
  first, second = fakes.argvs()
  assert first[-1] == '--config.data.num_workers=3'
  assert second[-1] == '--config.data.num_workers=2' and len(second) == len(first)


def test_imagenet_config_workers_fit_the_slurm_cpus_per_task():
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  cpus = int(next(line.partition('=')[2] for line in
                  (ROOT / 'launch' / 'gpu_slurm.sbatch').read_text().splitlines()
                  if line.startswith('#SBATCH --cpus-per-task=')))
  assert imagenet.get_config().data.num_workers == cpus - 1  # And the trainer's own CPU.


@pytest.mark.parametrize('env, error', [
    ({}, 'not inside a SLURM job'),
    ({'SLURM_JOB_ID': '1', 'SLURM_SUBMIT_DIR': '/'}, 'submit from the repository root'),
])
def test_slurm_errors(fakes, env, error):
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'gpu_slurm.sbatch'), *TRAIN_ARGS],
                          env=fakes.env(**env), capture_output=True, text=True)
  assert result.returncode == 2
  assert error in result.stderr
  assert fakes.calls() == []


def gpu_local(fakes, *args, **env):
  return subprocess.run(['bash', str(ROOT / 'launch' / 'gpu_local.sh'), *args], cwd=ROOT,
                        env=fakes.env(**env), capture_output=True, text=True, timeout=60)


def test_gpu_local_one_process_for_the_chosen_gpus(fakes):
  assert gpu_local(fakes, *TRAIN_ARGS, GPUS='0,2').returncode == 0
  [call] = fakes.calls()
  assert call['argv'] == ['python', '-m', 'stompp_jax.main', *TRAIN_ARGS]
  assert call['env'] == {'CUDA_VISIBLE_DEVICES': '0,2'}


def test_gpu_local_process_per_gpu(fakes):
  (fakes.bin / 'nvidia-smi').write_text('#!/bin/sh\nprintf "0\\n1\\n2\\n"\n')
  (fakes.bin / 'nvidia-smi').chmod(0o755)
  result = gpu_local(fakes, '--process-per-gpu', *TRAIN_ARGS, COORDINATOR_PORT='23456')
  assert result.returncode == 0, result.stderr
  calls = sorted(fakes.calls(), key=lambda c: c['env']['STOMPP_PROCESS_ID'])
  assert [c['argv'] for c in calls] == [['python', '-m', 'stompp_jax.main', *TRAIN_ARGS]] * 3
  assert [c['env'] for c in calls] == [
      {'CUDA_VISIBLE_DEVICES': str(i), 'STOMPP_PROCESS_ID': str(i), 'STOMPP_NUM_PROCESSES': '3',
       'STOMPP_COORDINATOR_ADDRESS': '127.0.0.1:23456'} for i in range(3)]
  assert sorted(result.stdout.splitlines()) == [f'[process {i}] fake python' for i in range(3)]


def test_gpu_local_process_per_gpu_fails_when_one_fails(fakes):
  result = gpu_local(fakes, '--process-per-gpu', *TRAIN_ARGS, GPUS='4,5',
                     FAKE_FAIL='"STOMPP_PROCESS_ID": "1"')
  assert result.returncode == 1
  assert len(fakes.calls()) == 2


def test_gpu_local_needs_arguments_gpus_and_the_repository_root(fakes, tmp_path):
  assert gpu_local(fakes).returncode == 2
  (fakes.bin / 'nvidia-smi').write_text('#!/bin/sh\n')  # Finds no GPU.
  (fakes.bin / 'nvidia-smi').chmod(0o755)
  result = gpu_local(fakes, '--process-per-gpu', *TRAIN_ARGS)
  assert result.returncode == 2
  assert 'no GPUs found' in result.stderr
  result = subprocess.run(['bash', str(ROOT / 'launch' / 'gpu_local.sh'), *TRAIN_ARGS],
                          cwd=tmp_path, env=fakes.env(), capture_output=True, text=True)
  assert result.returncode == 2
  assert 'run it from the repository root' in result.stderr
  assert fakes.calls() == []


def sweep_lines(capsys, *args) -> list[list[str]]:
  assert sweep.main(list(args)) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def test_sweep_is_a_module_of_the_repository_root(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'launch.sweep', 'mobilenet_v2', '--print',
                           f'--workdir-root={tmp_path}'], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert len(result.stdout.splitlines()) == 6


def test_sweep_prints_every_row_of_a_table_with_three_seeds(capsys, tmp_path):
  commands = sweep_lines(capsys, 'r50_bnn_cifar', '--print', f'--workdir-root={tmp_path}')
  rows = set()
  for command in commands:
    assert command[:3] == ['python', '-m', 'stompp_jax.main']
    config, workdir, seed = command[3:]
    assert config.startswith('--config=configs/cifar.py:')
    args = dict(a.split('=') for a in config.removeprefix('--config=configs/cifar.py:').split(','))
    assert (args['model'], args['mode']) == ('resnet50', 'bnn')
    rows.add((args['dataset'], args['method'], seed))
  assert rows == set(itertools.product(('cifar10', 'cifar100'), ('ste', 'stompp', 'stompp_ste'),
                                       ('--config.seed=0', '--config.seed=1', '--config.seed=2')))
  workdirs = [command[4] for command in commands]
  assert len(set(workdirs)) == 18
  assert (f'--workdir={tmp_path}/r50_bnn_cifar/dataset=cifar10,method=ste,mode=bnn,'
          'model=resnet50,seed=0') in workdirs


def test_sweep_print_is_shell_safe_for_a_launcher(capsys, fakes, tmp_path):
  assert sweep.main(['--config=configs/cifar.py:model=resnet18,mode=bnn',
                     '--grid', 'binary.method=ste,stompp', '--grid', 'seed=0,1',
                     '--set', SPACE_OVERRIDE.removeprefix('--config.'),
                     f'--workdir-root={tmp_path}', '--launcher=sbatch launch/gpu_slurm.sbatch',
                     '--print']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4
  for line in lines:
    subprocess.run(['bash', '-c', line], env=fakes.env(), check=True)
  for argv in fakes.argvs():
    assert argv[:2] == ['sbatch', 'launch/gpu_slurm.sbatch']
    assert argv[2] == '--config=configs/cifar.py:model=resnet18,mode=bnn'
    assert argv[-1] == SPACE_OVERRIDE
    assert 'data' not in argv[3]  # --set values do not name runs.
  assert {argv[3] for argv in fakes.argvs()} == {
      f'--workdir={tmp_path}/cifar/mode=bnn,model=resnet18,binary.method={m},seed={s}'
      for m in ('ste', 'stompp') for s in (0, 1)}


def test_sweep_workdirs_do_not_depend_on_axis_order(capsys, tmp_path):
  common = ['--config=configs/cifar.py', f'--workdir-root={tmp_path}', '--list']
  first = sweep_lines(capsys, *common, '--arg=model=resnet18,resnet34', '--grid=seed=0,1',
                      '--grid=optim.learning_rate=0.1,0.05')
  second = sweep_lines(capsys, *common, '--grid=optim.learning_rate=0.1,0.05', '--grid=seed=0,1',
                       '--arg=model=resnet18,resnet34')
  assert len(first) == 8
  assert sorted(first) == sorted(second)


def test_sweep_command_line_axes_replace_the_grids(capsys, tmp_path):
  commands = sweep_lines(capsys, 'lr_ablation', '--grid=seed=7', '--arg=method=stompp', '--print',
                         f'--workdir-root={tmp_path}')
  assert len(commands) == 2
  assert {c[-1] for c in commands} == {'--config.seed=7'}
  assert {c[-2] for c in commands} == {'--config.optim.learning_rate=0.1',
                                       '--config.optim.learning_rate=0.05'}


def test_sweep_skips_finished_runs_and_lists_status(capsys, tmp_path):
  root = tmp_path / 'mobilenet_v2'
  done = root / 'dataset=cifar100,method=ste,mode=bnn,model=mobilenet_v2,seed=1'
  started = root / 'dataset=cifar100,method=stompp_ste,mode=bnn,model=mobilenet_v2,seed=0'
  done.mkdir(parents=True)
  (done / 'done.json').write_text('{}')
  started.mkdir(parents=True)
  (started / 'config.json').write_text('{}\n')
  commands = sweep_lines(capsys, 'mobilenet_v2', '--print', f'--workdir-root={tmp_path}')
  assert len(commands) == 5
  assert f'--workdir={done}' not in [c[4] for c in commands]
  assert f'--workdir={started}' in [c[4] for c in commands]

  listing = sweep_lines(capsys, 'mobilenet_v2', '--list', f'--workdir-root={tmp_path}')
  assert sorted(status for status, _ in listing) == ['done', 'new', 'new', 'new', 'new', 'started']
  assert [str(done), str(started)] == [w for s, w in listing if s != 'new']


def test_sweep_run_goes_on_past_failures_and_reports_them(capsys, tmp_path):
  trainer = tmp_path / 'trainer.py'
  trainer.write_text(
      'import json, pathlib, sys\n'
      'with open(sys.argv[1], "a") as f: f.write(json.dumps(sys.argv[2:]) + "\\n")\n'
      'if "--config.seed=1" in sys.argv: sys.exit(3)\n'
      'workdir = pathlib.Path(next(a for a in sys.argv if a.startswith("--workdir="))[10:])\n'
      'workdir.mkdir(parents=True)\n'
      '(workdir / "done.json").write_text("{}")\n')
  calls = tmp_path / 'calls.jsonl'
  args = ['--config=configs/quickstart.py', '--grid=seed=0,1,2', f'--workdir-root={tmp_path}',
          f'--launcher={sys.executable} {trainer} {calls}', '--run']

  assert sweep.main(args) == 1
  assert len(calls.read_text().splitlines()) == 3
  err = capsys.readouterr().err
  assert f'1 of 3 runs failed:\n  {tmp_path}/quickstart/seed=1 (exit status 3)' in err
  assert sorted(p.parent.name for p in tmp_path.glob('quickstart/*/done.json')) == [
      'seed=0', 'seed=2']

  assert sweep.main(args) == 1  # Only the failed run again.
  assert len(calls.read_text().splitlines()) == 4
  assert json.loads(calls.read_text().splitlines()[-1])[1] == f'--workdir={tmp_path}/quickstart/seed=1'


@pytest.mark.parametrize('args', [
    ['--grid=seed=0,0'],  # Two runs, one workdir.
    ['--grid=seed=0,1', '--set=seed=2'],
    ['r50_bnn_cifar'],  # A named grid and --config.
    ['--grid=seed'],
])
def test_sweep_rejects_bad_grids(tmp_path, args):
  with pytest.raises(SystemExit) as error:
    sweep.main(['--config=configs/quickstart.py', f'--workdir-root={tmp_path}', '--print', *args])
  assert error.value.code == 2


def test_named_grids_build_valid_configs():
  # Argument values as the design contract lists them for the config families.
  contract = {
      'dataset': {'cifar10', 'cifar100'},
      'model': {'resnet18', 'resnet34', 'resnet50', 'resnet20', 'resnet32', 'resnet56',
                'mobilenet_v2'},
      'mode': {'bnn', 'bwn', 'fp'}, 'method': {'ste', 'stompp', 'stompp_ste', 'fp'},
      'order': {'layerwise', 'global', 'reverse'},
      'shape': {'cubic', 'linear', 'quadratic', 'cosine', 'flipped_quadratic'}}
  for name, grid in sweeps.GRIDS.items():
    assert grid.overrides['seed'] == (0, 1, 2), name
    for key, values in grid.args.items():
      assert key == 'refresh' or set(values) <= contract[key], f'{name}: {key}={values}'
    # Each combination of arguments is accepted by the config file, which has every overridden
    # field, of a type that takes the grid's values (ml_collections checks types on assignment).
    module = importlib.import_module(grid.config.removesuffix('.py').replace('/', '.'))
    for values in itertools.product(*grid.args.values()):
      config = module.get_config(','.join(f'{k}={v}' for k, v in zip(grid.args, values)))
      for key, override_values in grid.overrides.items():
        *parents, field = key.split('.')
        node = functools.reduce(getattr, parents, config)
        for value in override_values:
          setattr(node, field, value)
