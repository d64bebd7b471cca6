"""Test setup, before JAX starts: 8 fake CPU devices, fast compiles, a persistent cache."""

import os
import pathlib

# XLA's CPU backend optimizations cost 5-10x in compile time and buy nothing on tiny test
# models. Subprocesses started by tests inherit this.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

# The test requirements install libtpu (the TPU preflight's compiler): without this, every JAX
# start here would look for a TPU (libtpu's lines on stderr) and the CLI's CPU-only settings
# (stompp_jax/allocator.py) would be skipped. The preflight compiles for TPU devices anyway.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('STOMPP_JAX_CACHE', str(pathlib.Path.home() / '.cache' / 'stompp_jax' / 'jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


def pytest_addoption(parser):
  parser.addoption('--canary', action='store_true',
                   help='Also run the canaries: tests that pin a third-party behaviour (the'
                   ' summation order of a collective), not one of this project.')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: takes minutes on a 2-core machine (still in the'
                          ' default run; deselect with -m "not slow").')
  config.addinivalue_line('markers', 'multiprocess: starts several JAX processes (jax.distributed'
                          ' over gloo on loopback; still in the default run).')
  config.addinivalue_line('markers', 'canary: pins a third-party behaviour; runs only with'
                          ' --canary.')


@pytest.hookimpl(tryfirst=True)  # Before pytest-xdist reads the groups (--dist loadgroup).
def pytest_collection_modifyitems(config, items):
  for item in items:
    # The tests of a module that share a module-scoped fixture (a run, a server) go to one
    # worker, which builds it once; the other tests spread over the workers.
    fixtures = getattr(item, '_fixtureinfo', None)
    if fixtures and any(d.scope == 'module' for defs in fixtures.name2fixturedefs.values()
                        for d in defs):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
  if config.getoption('--canary'):
    return
  skip = pytest.mark.skip(reason='a canary of third-party behaviour: run with --canary')
  for item in items:
    if 'canary' in item.keywords:
      item.add_marker(skip)


# Finished runs shared by the whole test session. Read them in place; a test that writes into a
# run copies it first (shutil.copytree to its tmp_path).


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """A finished run of helpers.tiny_config('stompp') (12 steps, checkpoints at 6 and 12)."""
  import helpers  # pylint: disable=g-import-not-at-top  # After the JAX settings above.
  from stompp_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('tiny_run') / 'run'
  train.train_and_evaluate(helpers.tiny_config('stompp'), str(workdir))
  return workdir


@pytest.fixture(scope='session')
def own_model_run(tmp_path_factory):
  """A finished run of helpers.own_config() on helpers.VGG(): (workdir, its final row)."""
  import helpers  # pylint: disable=g-import-not-at-top
  from stompp_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('own_model_run') / 'run'
  return workdir, train.train_and_evaluate(helpers.own_config(), str(workdir),
                                           model=helpers.VGG())
