"""Test setup, before JAX starts: 8 fake CPU devices, fast compiles, a persistent cache."""

import os
import pathlib

# XLA's CPU backend optimizations cost 5-10x in compile time and buy nothing on tiny test
# models. Subprocesses started by tests inherit this.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('STOMPP_JAX_CACHE', str(pathlib.Path.home() / '.cache' / 'stompp_jax' / 'jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
