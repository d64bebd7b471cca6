"""glibc malloc settings for CPU training, set by the command line before JAX starts its threads.

XLA's CPU runtime allocates each step's temporaries afresh, and glibc serves any block over
32 MB with a new mmap, so every step page-faulted its whole temporary buffer in again (system
time; benchmarks/cpu_throughput.py, docs/results.md). `keep_freed_memory` makes malloc keep
freed memory for reuse. Any malloc setting of the user's own (GLIBC_TUNABLES, MALLOC_*_
variables, LD_PRELOAD of another allocator) leaves it untouched.
"""

import ctypes
import importlib.metadata
import importlib.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (glibc malloc.h).
_USER_MALLOC_SETTINGS = ('GLIBC_TUNABLES', 'LD_PRELOAD', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_',
                         'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_', 'MALLOC_TRIM_THRESHOLD_')


def cpu_only() -> bool:
  """Whether JAX can only run on the CPU here: JAX_PLATFORMS=cpu, or no accelerator plugin
  (jax_plugins package or entry points, libtpu) is installed. Decided without starting a backend."""
  if os.environ.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return True
  return (not importlib.metadata.entry_points(group='jax_plugins')
          and all(importlib.util.find_spec(name) is None for name in ('jax_plugins', 'libtpu')))


def keep_freed_memory() -> bool:
  """glibc malloc with one arena, no mmap and no trimming, so freed blocks are reused; True if set.

  Skipped when the user's environment sets any of _USER_MALLOC_SETTINGS, or malloc is not
  glibc's. The process's RSS then stays at its high-water mark instead of shrinking between
  steps.
  """
  if any(name in os.environ for name in _USER_MALLOC_SETTINGS):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  # One arena: a thread arena serves a block larger than its 64 MB heap with mmap whatever
  # M_MMAP_MAX says (seen: Eigen's conv packing buffers, 72 MB each, 12 per ResNet-20 step).
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
