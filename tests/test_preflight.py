"""The TPU preflight (stompp_jax/preflight.py) through its command line, with the real TPU
compiler (libtpu, from requirements-test.txt; no TPU): the tiny model compiled for a v5e-4 slice.

libtpu is found as JAX finds it: $TPU_LIBRARY_PATH, else the installed `libtpu` package.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from stompp_jax import preflight
from stompp_jax import tpu_chips
from helpers import REPO

TINY = ['--config=configs/default.py', '--config.model.name=tiny_resnet',
        '--config.data.source=synthetic', '--config.data.synthetic_image_shape=(16,16,3)',
        '--config.data.synthetic_num_classes=4', '--config.train.batch_size=32',
        '--config.train.eval_batch_size=32', '--config.train.num_steps=12',
        '--config.binary.refresh_every=4']


@pytest.fixture(scope='module')
def libtpu():
  if preflight.libtpu_path() is None:
    pytest.fail('libtpu is not installed: pip install -r requirements-test.txt (it pins libtpu),'
                ' or set TPU_LIBRARY_PATH to a libtpu.so.')


def run_preflight(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'stompp_jax.preflight', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _steps(result: dict, method: str) -> dict:
  return result['methods'][method]['steps']


@pytest.fixture(scope='module')
def tiny_v5e_4(libtpu, tmp_path_factory):
  """The tiny model's fp and stompp preflight on v5e-4: (completed process, JSON)."""
  path = tmp_path_factory.mktemp('preflight') / 'tiny.json'
  done = run_preflight(*TINY, '--topology=v5e-4', '--methods=fp,stompp', f'--json={path}')
  assert done.returncode == 0, done.stderr[-3000:]
  return done, json.loads(path.read_text())


def test_every_step_of_a_run_compiles_for_the_slice_with_memory_figures(tiny_v5e_4):
  done, result = tiny_v5e_4
  assert (result['chips'], result['device_kind'], result['global_batch']) == (4, 'TPU v5 lite', 32)
  assert set(_steps(result, 'fp')) == {'train', 'eval'}
  assert set(_steps(result, 'stompp')) == {'train', 'eval', 'eval_fully_binary', 'recalibrate'}
  for method in ('fp', 'stompp'):
    for name, step in _steps(result, method).items():
      hbm = step['hbm_bytes']
      assert step['fits'], (method, name)
      assert hbm['arguments'] > 0 and hbm['total'] > 0 and step['flops'] > 0, (method, name)
      assert 0 < hbm['total'] < tpu_chips.CHIPS['v5e'].hbm_bytes
      assert step['compile_s'] > 0
  assert _steps(result, 'stompp')['train']['hbm_bytes']['temporaries'] > 0
  assert 'stompp (tiny_resnet, mode bnn, float32):' in done.stdout
  assert 'recalibrate (8/chip): fits' in done.stdout
  assert 'not a measured run' in done.stdout


def test_stompp_adds_elementwise_work_only(tiny_v5e_4):
  """Same convolutions: StoMPP's FLOPs over fp's are those of masks and signs, a few percent."""
  done, result = tiny_v5e_4
  ratios = result['methods']['stompp']['ratios_to_fp']['train']
  fp, stompp = _steps(result, 'fp')['train'], _steps(result, 'stompp')['train']
  assert ratios['flops'] == pytest.approx(stompp['flops'] / fp['flops'])
  assert 1.0 < ratios['flops'] < 1.10
  assert 1.0 < ratios['bytes_accessed'] < 1.25
  assert set(result['methods']['stompp']['ratios_to_fp']) == {'train', 'eval'}
  assert 'train / fp: hbm_total' in done.stdout and 'eval / fp: hbm_total' in done.stdout


def test_the_roofline_is_the_slower_of_compute_and_memory(tiny_v5e_4):
  _, result = tiny_v5e_4
  chip = tpu_chips.CHIPS['v5e']
  train = _steps(result, 'stompp')['train']
  seconds = max(train['flops'] / chip.peak_bf16_flops, train['bytes_accessed'] / chip.hbm_bandwidth)
  assert train['roofline']['seconds'] == pytest.approx(seconds)
  assert train['roofline']['images_per_s_per_chip'] == pytest.approx(8 / seconds)


def test_an_oversized_batch_does_not_fit_and_says_by_how_much(libtpu, tmp_path):
  path = tmp_path / 'big.json'
  done = run_preflight(*TINY, '--topology=v5e-4', '--methods=fp', '--per_chip_batch=1000000',
                       f'--json={path}')
  assert done.returncode == 0, done.stderr[-3000:]
  train = _steps(json.loads(path.read_text()), 'fp')['train']
  assert not train['fits']
  assert train['required_bytes'] > train['available_bytes'] > 15 * 2**30
  line = next(l for l in done.stdout.splitlines() if l.startswith('  train (1000000/chip)'))
  assert 'does not fit in HBM: RESOURCE_EXHAUSTED' in line and 'exceeds available HBM' in line


def test_an_unknown_topology_is_one_line_with_the_supported_ones(libtpu):
  done = run_preflight(*TINY, '--topology=v7-3')
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith(
      "Error: Unknown TPU type 'v7-3': use one of v4-8, v4-16")
  assert 'v5litepod-256' in done.stderr and 'v6e-64' in done.stderr


def test_a_missing_libtpu_says_how_to_install_it(tmp_path):
  hidden = tmp_path / 'libtpu'
  hidden.mkdir()
  (hidden / '__init__.py').write_text('raise ImportError("hidden by the test")\n')
  env = {k: v for k, v in os.environ.items() if k != 'TPU_LIBRARY_PATH'}
  env['PYTHONPATH'] = os.pathsep.join([str(tmp_path), env.get('PYTHONPATH', '')])
  done = run_preflight(*TINY, '--topology=v5e-4', env=env, timeout=300)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (
      'Error: The TPU compiler (libtpu) is not installed: pip install ".[tpu]" (or pip install'
      ' "jax[tpu]==0.10.2"); no TPU is needed to compile.')


@pytest.mark.parametrize('name, chips, topology', [
    ('v4-32', 16, 'v4:2x2x4'), ('v5e-256', 256, 'v5e:16x16'), ('v5litepod-4', 4, 'v5e:2x2'),
    ('v5p-128', 64, 'v5p:4x4x4'), ('v6e-64', 64, 'v6e:8x8')])
def test_slices_are_named_as_gcloud_names_them(name, chips, topology):
  slice_ = tpu_chips.parse_slice(name)
  assert (slice_.chips, slice_.topology_name) == (chips, topology)


@pytest.mark.parametrize('name', ['v4-6', 'v5e-3', 'tpu-8', 'v4'])
def test_an_unknown_slice_is_refused(name):
  with pytest.raises(ValueError, match='Unknown TPU type'):
    tpu_chips.parse_slice(name)


def test_the_largest_batch_is_found_by_compiling_where_the_figures_point(monkeypatch):
  """A train step that fits up to 100 images per chip, 1 MiB of temporaries per image: from 8,
  to 16x (no ceiling yet), then where the temporaries reach the 100 MiB the compiler allows."""
  compiled = []

  def fake_compile_steps(config, devices, chip, steps):
    per_chip = config.train.batch_size // len(devices)
    compiled.append(per_chip)
    if per_chip <= 100:
      return None, {'train': {'fits': True, 'compile_s': 1.0, 'hbm_bytes': {
          'total': per_chip * 2**20, 'temporaries': per_chip * 2**20}}}
    return None, {'train': {'fits': False, 'required_bytes': per_chip * 2**20,
                            'available_bytes': 100 * 2**20, 'compile_s': 1.0,
                            'message': 'RESOURCE_EXHAUSTED: too big'}}

  monkeypatch.setattr(preflight, 'compile_steps', fake_compile_steps)
  from configs import default  # pylint: disable=g-import-not-at-top
  found = preflight.find_max_batch(default.get_config(), 'fp', [object()] * 4,
                                   tpu_chips.CHIPS['v5e'], 1, log=lambda line: None)
  assert found['max_per_chip_batch'] == 96
  assert compiled == [8, 128, 96, 104]
  assert [p['fits'] for p in found['probes']] == [True, False, True, False]


def test_the_batch_search_bisects_without_figures(monkeypatch):
  """Out-of-memory errors without figures: halving, then bisection; 0 when 8 does not fit."""
  for limit, expected in ((50, 48), (5, 0)):
    compiled = []

    def fake_compile_steps(config, devices, chip, steps, limit=limit, compiled=compiled):
      per_chip = config.train.batch_size // len(devices)
      compiled.append(per_chip)
      if per_chip <= limit:
        return None, {'train': {'fits': True, 'compile_s': 1.0, 'hbm_bytes': {
            'total': 2**40, 'temporaries': 2**40}}}
      return None, {'train': {'fits': False, 'required_bytes': None, 'compile_s': 1.0,
                              'message': 'RESOURCE_EXHAUSTED'}}

    monkeypatch.setattr(preflight, 'compile_steps', fake_compile_steps)
    from configs import default  # pylint: disable=g-import-not-at-top
    found = preflight.find_max_batch(default.get_config(), 'fp', [object()] * 4,
                                     tpu_chips.CHIPS['v5e'], 64, log=lambda line: None)
    assert found['max_per_chip_batch'] == expected, compiled


def _documented_preflights() -> list[str]:
  """The concrete `python -m stompp_jax.preflight` commands of docs/preflight.md."""
  text = (REPO / 'docs' / 'preflight.md').read_text()
  return sorted({line.strip() for line in text.splitlines()
                 if line.strip().startswith('python -m stompp_jax.preflight --config=configs/')})


def _check_before_compiling(args: list[str]) -> None:
  """Preflight's arguments `args` as its command line takes them, through every check a
  preflight makes before libtpu is asked for anything (`preflight.check_request`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FlagValues()
  preflight.define_flags(values, sys_argv=['prog', *args])  # As its command line has them.
  values(['prog', *args])
  preflight.check_request(values.config, values.topology, values.methods,
                          per_chip_batch=values.per_chip_batch, max_batch=values.find_max_batch)


def test_the_documented_commands_parse_and_pass_the_checks_before_compiling():
  """Each concrete command of docs/preflight.md."""
  commands = _documented_preflights()
  assert len(commands) >= 2
  for command in commands:
    _check_before_compiling(command.split()[3:])


RUN_SH = REPO / 'benchmarks' / 'preflight' / 'run.sh'


def _run_sh(*args: str, out=None) -> subprocess.CompletedProcess:
  env = {**os.environ, **({'PREFLIGHT_OUT': str(out)} if out else {})}
  return subprocess.run(['bash', str(RUN_SH), *args], capture_output=True, text=True, env=env,
                        timeout=60, check=False)


def test_every_job_of_the_committed_preflights_passes_the_checks_before_compiling():
  """benchmarks/preflight/run.sh's jobs (`--list`), each with a committed JSON of its name."""
  jobs = dict(line.split('|', 1) for line in _run_sh('--list').stdout.splitlines())
  assert len(jobs) >= 10
  for name, args in jobs.items():
    _check_before_compiling(args.split())
    assert (RUN_SH.parent / f'{name}.json').is_file(), name


def test_run_sh_skips_the_jobs_that_have_a_json_and_refuses_an_unknown_name(tmp_path):
  names = [line.split('|')[0] for line in _run_sh('--list').stdout.splitlines()]
  for name in names:
    (tmp_path / f'{name}.json').write_text('{}')
  done = _run_sh(out=tmp_path)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == [f'{n}: done ({tmp_path}/{n}.json)' for n in names]
  unknown = _run_sh('--commit', names[0], 'r50_v4-32_typo', out=tmp_path)
  assert unknown.returncode == 2
  assert unknown.stderr.strip() == ('run.sh: no job named r50_v4-32_typo: use one of the names'
                                    ' that --list prints.')
  assert not unknown.stdout


@pytest.mark.parametrize('args, error', [
    (['--config=configs/tiny.py'], '--topology is required'),
    (['--config=configs/tiny.py', '--topology=v4-32', '--methods=fp,bnn'], '--methods=fp,bnn: use'),
    (['--config=configs/tiny.py', '--topology=v4-32', '--per_chip_batch=8', '--find_max_batch'],
     '--per_chip_batch and --find_max_batch: give one'),
    (['--config=configs/tiny.py', '--topology=v5e-256', '--config.train.batch_size=96'],
     'train.batch_size=96 does not split over the 256 chips of v5e-256'),
    (['--config=configs/tiny.py', '--topology=v4-32', '--config.model.name=resnet19'],
     "Unknown model.name 'resnet19'"),
])
def test_a_bad_request_is_refused_before_libtpu_is_asked(args, error):
  from stompp_jax import errors  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.SetupError, match=re.escape(error)):
    _check_before_compiling(args)
