"""Executes notebooks/quickstart.ipynb then notebooks/analysis.ipynb top to bottom on the CPU.

Each notebook's `parameters` cell is followed by an injected cell (as papermill does) that sets a
tiny budget: the quickstart trains a tiny ResNet on synthetic data for a few steps per method
into a temporary directory, and the analysis notebook reads those runs. Any cell error fails.
The quickstart's install cell, which those runs skip (it installs only on Colab), runs as on
Colab against a file:// Git repository of this checkout, into a fresh virtual environment.
"""

import json
import os
import subprocess
import sys

import jax
import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO
import reliability_utils as ru

NOTEBOOKS = os.path.join(REPO, 'notebooks')
KERNEL = 'stompp_test_python'

QUICKSTART_BUDGET = {
    'MODEL': 'tiny_resnet',
    'DATA_SOURCE': 'synthetic',
    'NUM_STEPS': 12,
    'BATCH_SIZE': 32,
    'EVAL_BATCH_SIZE': 32,
    'LOG_EVERY': 2,
    'EVAL_EVERY': 6,
    'CONFIG_OVERRIDES': {
        'data.synthetic_image_shape': (16, 16, 3),
        'data.synthetic_num_classes': 4,
        'data.synthetic_train_size': 256,
        'data.synthetic_eval_size': 64,
        'binary.refresh_every': 4,
    },
}


def read_notebook(name):
  return nbformat.read(os.path.join(NOTEBOOKS, f'{name}.ipynb'), as_version=4)


def tagged_index(nb, tag):
  indices = [i for i, cell in enumerate(nb.cells) if tag in cell.metadata.get('tags', [])]
  assert len(indices) == 1, f'exactly one cell must be tagged "{tag}"'
  return indices[0]


def parameters_index(nb):
  return tagged_index(nb, 'parameters')


def execute(name, parameters):
  """Runs a notebook with `parameters` injected after its parameters cell; returns it executed."""
  nb = read_notebook(name)
  injected = nbformat.v4.new_code_cell(''.join(f'{k} = {v!r}\n' for k, v in parameters.items()))
  injected.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(parameters_index(nb) + 1, injected)
  NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                 resources={'metadata': {'path': NOTEBOOKS}}).execute()
  return nb


def outputs(nb):
  return [output for cell in nb.cells if cell.cell_type == 'code' for output in cell.get('outputs', [])]


def stdout_text(nb):
  return ''.join(o.get('text', '') for o in outputs(nb) if o.output_type == 'stream' and o.name == 'stdout')


def num_images(nb):
  return sum('image/png' in o.get('data', {}) for o in outputs(nb))


@pytest.fixture(scope='module')
def kernel_env(tmp_path_factory):
  """A kernelspec for this interpreter, and an environment for a small, quiet CPU kernel."""
  jupyter_dir = tmp_path_factory.mktemp('jupyter')
  spec_dir = jupyter_dir / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'stompp_jax tests', 'language': 'python'}))
  env = {
      'JUPYTER_PATH': str(jupyter_dir),
      'JAX_PLATFORMS': 'cpu',
      'MPLBACKEND': 'module://matplotlib_inline.backend_inline',
      # The kernel shares the tests' persistent compilation cache (conftest.py); XLA_FLAGS is
      # inherited from os.environ.
      'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir or '',
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.2',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update({k: v for k, v in env.items() if v})
  yield
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope='module')
def quickstart_runs(kernel_env, tmp_path_factory):
  root = tmp_path_factory.mktemp('quickstart_runs')
  nb = execute('quickstart', {**QUICKSTART_BUDGET, 'WORKDIR_ROOT': str(root)})
  return nb, root


@pytest.mark.parametrize('name', ['quickstart', 'analysis'])
def test_notebook_is_committed_clean(name):
  nb = read_notebook(name)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  parameters_index(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, f'{name}: clear the outputs before committing'
  assert any(cell.cell_type == 'markdown' for cell in nb.cells)


def test_quickstart_trains_ste_and_stompp_and_plots(quickstart_runs):
  nb, root = quickstart_runs
  text = stdout_text(nb)
  for method in ('ste', 'stompp'):
    assert (root / method / 'done.json').exists()
    assert f'--- {method}: done' in text
  assert 'fully binary acc' in text
  assert 'ste: every site is fully frozen' in text
  # Training curves, and the frozen-fraction figure of StoMPP.
  assert num_images(nb) >= 2


def test_analysis_reads_the_quickstart_runs(quickstart_runs):
  _, root = quickstart_runs
  nb = execute('analysis', {'RUN_DIRS': str(root / '*')})
  text = stdout_text(nb)
  lines = text.splitlines()
  assert any(line.startswith('| run ') and 'final fully binary acc' in line for line in lines), text
  assert any(line.startswith('| ste ') and '| 12 ' in line for line in lines), text
  assert any(line.startswith('| stompp ') and '| 12 ' in line for line in lines), text
  # Training dynamics, and one figure of frozen-fraction heatmaps.
  assert num_images(nb) >= 2


def _install_settings(nb) -> dict:
  """The values the quickstart's install-settings cell sets (outside Colab)."""
  values = {}
  exec(nb.cells[tagged_index(nb, 'install-settings')].source, values)  # pylint: disable=exec-used
  return values


def test_no_colab_badge_until_the_repository_has_a_public_url():
  """A badge would open a notebook at a URL that does not exist yet: neither the README nor the
  notebook shows one, and the notebook installs nothing unless asked (INSTALL False)."""
  nb = read_notebook('quickstart')
  settings = _install_settings(nb)
  assert settings['INSTALL'] is False and settings['JAX_BUILD'] == 'auto'
  assert 'colab.research.google.com' not in (REPO / 'README.md').read_text()
  assert not any('colab.research.google.com' in cell.source for cell in nb.cells)


def test_install_cell_installs_the_package_from_a_git_repository(tmp_path):
  """The install cell, as Colab runs it, with REPO_URL a file:// Git repository of this checkout
  (uncommitted changes included) and REPO_REF its branch, into a fresh virtual environment that
  sees the installed dependencies, offline; then, from another directory, the notebook's next
  code cell (imports from the installed package) and `python -m stompp_jax.main --helpfull`: the
package's install test (its pins and the user cache: test_package.py)."""
  repo = ru.copy_checkout(tmp_path / 'repo')
  for args in (('init', '-q', '-b', 'colab'), ('add', '-A'), ('commit', '-q', '-m', 'checkout')):
    subprocess.run(['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost', *args],
                   cwd=repo, check=True, capture_output=True, timeout=120)
  venv = tmp_path / 'venv'
  # Without its own pip: the base interpreter's pip, seen through the system site-packages,
  # installs into the venv.
  subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip',
                  str(venv)], check=True, timeout=120)
  nb = read_notebook('quickstart')
  install = tagged_index(nb, 'install')
  imports = next(c for c in nb.cells[install + 1:] if c.cell_type == 'code')
  # With a host: pip 23's requirement parser refuses git+file:///path.
  url = f'file://localhost{repo}'
  overrides = {'REPO_URL': url, 'REPO_REF': 'colab', 'JAX_BUILD': 'cpu', 'INSTALL': True}
  script = '\n'.join([nb.cells[tagged_index(nb, 'install-settings')].source,
                      ''.join(f'{k} = {v!r}\n' for k, v in overrides.items()),
                      nb.cells[install].source, imports.source])
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  # No index: the dependencies are installed already. No build isolation (pip reads this
  # variable inverted: 0 turns isolation off), so the build uses the installed setuptools.
  env = {**ru.cli_env(1), 'PIP_NO_INDEX': '1', 'PIP_NO_BUILD_ISOLATION': '0',
         'PIP_DISABLE_PIP_VERSION_CHECK': '1'}
  python = str(venv / 'bin' / 'python')
  run = lambda *args: subprocess.run([python, *args], cwd=elsewhere, env=env, capture_output=True,
                                     text=True, timeout=300)
  executed = run('-c', script)
  assert executed.returncode == 0, executed.stdout[-2000:] + executed.stderr[-3000:]
  assert f'Installed stompp_jax @ git+{url}@colab (JAX build: cpu).' in executed.stdout
  site = run('-c', 'import sysconfig; print(sysconfig.get_path("purelib"))').stdout.strip()
  assert site.startswith(str(venv))
  assert f'stompp_jax from: {os.path.join(site, "stompp_jax")}' in executed.stdout, executed.stdout
  # The package's files, and not the tests (the wheel pip built holds what is installed).
  for name in ('stompp_jax/main.py', 'stompp_jax/export/__main__.py', 'configs/default.py',
               'configs/imagenet.py'):
    assert os.path.isfile(os.path.join(site, name)), name
  assert not os.path.exists(os.path.join(site, 'tests'))
  helped = run('-m', 'stompp_jax.main', '--helpfull')  # absl's help flags exit with status 1.
  assert '--workdir' in helped.stdout and 'stompp_jax.main' in helped.stdout, helped.stderr[-2000:]
