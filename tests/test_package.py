"""The package: its pins are requirements*.txt's, and its CLI compiles into the user's cache. Its
install from a Git repository, run from another directory:
test_notebooks.py::test_install_cell_installs_the_package_from_a_git_repository."""

import subprocess
import sys
import tomllib

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


def test_cli_compiles_once_into_the_user_cache(tmp_path):
  """Without JAX_COMPILATION_CACHE_DIR the CLI caches under $XDG_CACHE_HOME/stompp_jax; a second
  run of the same config loads every program from there (no new entries)."""
  cache = tmp_path / 'xdg' / 'stompp_jax' / 'jax_cache'
  env = {k: v for k, v in ru.cli_env(1).items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['XDG_CACHE_HOME'] = str(tmp_path / 'xdg')
  # JAX caches only programs that took at least 1 s to compile: a program near that line under a
  # changing load would be cached by one run and not the other. Cache every program.
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  entries = []
  for run in ('first', 'second'):
    # 5 steps: this test's cache starts empty, so no program of the suite's can serve it.
    result = subprocess.run(ru.cli_command(tmp_path / run, **{'train.num_steps': 5}), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # A compiled program is written (again) on a miss; a hit only reads it.
    entries.append({p.name: p.stat().st_mtime_ns for p in cache.glob('*-cache')})
  assert entries[0], 'the first run cached nothing'
  assert entries[1] == entries[0], 'the second run compiled programs again'
