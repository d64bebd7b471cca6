"""The package: a wheel built from a copy of the checkout's files holds stompp_jax and configs,
and, installed into a folder of its own, runs from another directory. Its pins are
requirements*.txt's."""

import subprocess
import sys
import tomllib
import zipfile

from helpers import REPO
import reliability_utils as ru


def _pins(name: str) -> list[str]:
  lines = (REPO / name).read_text().splitlines()
  return [line for line in lines if line.strip() and not line.startswith(('#', '-r'))]


def test_extras_pin_what_requirements_pin():
  pyproject = tomllib.loads((REPO / 'pyproject.toml').read_text())
  project = pyproject['project']
  assert project['optional-dependencies']['test'] == _pins('requirements-test.txt')
  # The tests build the package without build isolation, with the installed backend.
  assert set(pyproject['build-system']['requires']) <= set(_pins('requirements-test.txt'))
  runtime = _pins('requirements.txt')
  assert set(project['optional-dependencies']['gcs']) <= set(runtime)
  jax_pin = next(p for p in runtime if p.startswith('jax=='))
  for extra in ('tpu', 'cuda'):
    [pin] = project['optional-dependencies'][extra]
    assert pin.split('==')[1] == jax_pin.split('==')[1]


def test_wheel_installs_and_runs_from_another_directory(tmp_path):
  clone = ru.copy_checkout(tmp_path / 'clone')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                  '-w', str(tmp_path / 'wheel'), '.'], cwd=clone, check=True, timeout=300)
  [wheel] = (tmp_path / 'wheel').glob('stompp_jax-*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  for name in ('stompp_jax/main.py', 'stompp_jax/export/__main__.py', 'configs/default.py',
               'configs/imagenet.py'):
    assert name in names
  assert not [n for n in names if n.startswith('tests/')]
  target = tmp_path / 'site'
  subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target',
                  str(target), str(wheel)], check=True, timeout=300)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {**ru.cli_env(1), 'PYTHONPATH': str(target)}
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=elsewhere, env=env,
                                     capture_output=True, text=True, timeout=300)
  imported = run('-c', 'import stompp_jax.train, configs.default; print(stompp_jax.__file__)')
  assert imported.returncode == 0, imported.stderr
  assert imported.stdout.startswith(str(target))
  helped = run('-m', 'stompp_jax.main', '--helpfull')  # absl's help flags exit with status 1.
  assert '--workdir' in helped.stdout and 'stompp_jax.main' in helped.stdout, helped.stderr


def test_cli_compiles_once_into_the_user_cache(tmp_path):
  """Without JAX_COMPILATION_CACHE_DIR the CLI caches under $XDG_CACHE_HOME/stompp_jax; a second
  run of the same config loads every program from there (no new entries)."""
  cache = tmp_path / 'xdg' / 'stompp_jax' / 'jax_cache'
  env = {k: v for k, v in ru.cli_env(1).items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['XDG_CACHE_HOME'] = str(tmp_path / 'xdg')
  entries = []
  for run in ('first', 'second'):
    result = subprocess.run(ru.cli_command(tmp_path / run, **{'train.num_steps': 5}), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # A compiled program is written (again) on a miss; a hit only reads it.
    entries.append({p.name: p.stat().st_mtime_ns for p in cache.glob('*-cache')})
  assert entries[0], 'the first run cached nothing'
  assert entries[1] == entries[0], 'the second run compiled programs again'
