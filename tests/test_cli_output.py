"""What the command line prints, and the README's first command on a machine with no network
and no data: it trains a binary ResNet-20 on the built-in digits, well above chance.

The run is a real `python -m stompp_jax.main` subprocess with $HOME moved to an empty
directory (no ~/stompp_data), no $STOMPP_DATA_DIR, and every socket connection refused (a
`sitecustomize` on PYTHONPATH), at a tiny budget.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

from configs import quickstart

from helpers import REPO  # pylint: disable=g-bad-import-order

QUICKSTART = 'python -m stompp_jax.main --config=configs/quickstart.py --workdir=/tmp/stompp_quickstart'
# 40 steps of batch 128 (~3.6 epochs of the 1,437 digits), seeds 0-4 on the 2-core VM (8 fake
# devices, XLA backend optimizations off): fully binary test accuracy 0.844, 0.853, 0.836,
# 0.861, 0.833. Chance is 0.10; the bound leaves 23 points below the lowest seed.
NUM_STEPS = 40
MIN_ACCURACY = 0.6
_NO_NETWORK = '''import socket


def _refuse(*args, **kwargs):
  raise OSError('network disabled by the test')


socket.socket.connect = _refuse
socket.create_connection = _refuse
'''


def offline_env(tmp_path) -> dict:
  """The environment of a fresh offline machine: empty home, no data dir, no network."""
  site = tmp_path / 'offline_site'
  site.mkdir()
  (site / 'sitecustomize.py').write_text(_NO_NETWORK)
  env = {k: v for k, v in os.environ.items() if not k.startswith('STOMPP_')}
  env['HOME'] = str(tmp_path / 'home')
  env['PYTHONPATH'] = os.pathsep.join([str(site), str(REPO)])
  return env


@pytest.fixture(scope='module')
def quickstart_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('quickstart')
  workdir = tmp_path / 'run'
  argv = [sys.executable, *QUICKSTART.split()[1:]]
  argv = [a.replace('/tmp/stompp_quickstart', str(workdir)) for a in argv]
  argv += [f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every=20',
           '--config.train.checkpoint_every=40']
  result = subprocess.run(argv, cwd=REPO, env=offline_env(tmp_path), capture_output=True,
                          text=True, timeout=900)
  return result, workdir


def test_quickstart_runs_offline_on_the_builtin_digits(quickstart_run):
  result, workdir = quickstart_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Data: digits (npz in ' in result.stderr
  closing = result.stdout.strip().splitlines()[-1]
  match = re.fullmatch(
      r'Done: fully binary accuracy ([\d.]+)% on digits \(npz\) at step 40, \d+:\d\d:\d\d wall'
      r' time\. The run is in (\S+); curves: tensorboard --logdir=(\S+)', closing)
  assert match, closing
  assert float(match.group(1)) / 100 > MIN_ACCURACY, closing
  assert match.group(2) == str(workdir)
  assert match.group(3) == str(workdir / 'tensorboard')


def test_output_is_quiet_and_says_what_it_does(quickstart_run):
  result, _ = quickstart_run
  err = result.stderr
  assert "Unable to initialize backend" not in err
  # absl's prefix: level, date, time, thread, file:line]. Every such line is from stompp_jax.
  logged_from = set(re.findall(r'^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]', err, re.M))
  package = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'stompp_jax', '**', '*.py'),
                                                    recursive=True)}
  assert logged_from and logged_from <= package, logged_from - package
  for expected in (r'Compiling the train and eval steps\.\.\.', r'Compiled in \d+\.\d s\.',
                   r'step 20/40 \| loss', r'Evaluating at step 40\.\.\.',
                   r'eval at step 40 \| eval_fully_binary_accuracy'):
    assert re.search(expected, err), (expected, err[-3000:])


def test_quickstart_picks_cifar10_when_it_is_on_disk(tmp_path, monkeypatch):
  monkeypatch.delenv('STOMPP_DATA_DIR', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert quickstart.get_config().data.name == 'digits'
  (tmp_path / 'stompp_data' / 'cifar-10-batches-py').mkdir(parents=True)
  config = quickstart.get_config()
  assert (config.data.name, config.data.source) == ('cifar10', 'cifar_archive')
  npz_dir = tmp_path / 'npz'
  npz_dir.mkdir()
  (npz_dir / 'train.npz').write_bytes(b'')
  monkeypatch.setenv('STOMPP_DATA_DIR', str(npz_dir))
  config = quickstart.get_config('ste')
  assert (config.data.name, config.data.source, config.binary.method) == ('cifar10', 'npz', 'ste')
  assert quickstart.get_config('stompp,digits').data.name == 'digits'
  with pytest.raises(ValueError, match='dataset'):
    quickstart.get_config('stompp,mnist')


_NEW_MMAPPED_BLOCKS_OF_A_64_MB_MALLOC = '''import ctypes, sys
from stompp_jax import allocator


class MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in (
      'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
      'fordblks', 'keepcost')]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
kept = allocator.keep_freed_memory()
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
print(kept, libc.mallinfo2().hblks - before)
'''


@pytest.mark.parametrize('user_setting, expected', [
    ({}, 'True 0'),                                     # glibc serves 64 MB from the heap.
    ({'MALLOC_ARENA_MAX': '2'}, 'False 1'),             # The user's setting wins: glibc mmaps it.
    ({'GLIBC_TUNABLES': 'glibc.malloc.check=0'}, 'False 1'),
])
def test_the_cli_keeps_freed_memory_unless_the_user_sets_malloc_options(user_setting, expected):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')
         and not k.startswith('MALLOC_')}
  result = subprocess.run([sys.executable, '-c', _NEW_MMAPPED_BLOCKS_OF_A_64_MB_MALLOC],
                          env={**env, **user_setting}, cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=120)
  assert result.stdout.split('\n')[-2] == expected
