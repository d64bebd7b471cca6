"""XLA compiler options by backend: the one home for them, used by every compile of the project.

Every `jax.jit` of a step that holds convolutions (train, eval, BatchNorm recalibration,
evaluate, the export's inference, the benchmarks) goes through `jit`, which passes the options
of the platform it compiles for as per-compilation options; the process environment is left
alone.

CPU (`CPU_OPTIONS`): XLA hands YNNPACK every convolution with more than 16 channels by default
(the `individual_convolution` fusion; every weight-gradient conv, whose feature dim is the
batch, qualifies), and YNNPACK's convolution is slower than Eigen's on the CPUs measured here:
removing it from the fusion set made the CIFAR ResNet-20 BNN train step 1.8x faster on a 2-core
AMD EPYC (benchmarks/torch_peer.py; docs/performance.md). Dots and reductions stay in YNNPACK.

What the user sets wins:
- an option named in XLA_FLAGS (e.g. `--xla_cpu_experimental_ynn_fusion_type=...`) is not
  passed again, so the flag keeps its effect;
- STOMPP_JAX_CPU_COMPILER_OPTIONS=xla turns the project's CPU options off (XLA's defaults).
"""

import os
import re
from typing import Any, Callable, Optional

import jax

from stompp_jax import errors

# XLA's default set is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE (jaxlib 0.10.2).
CPU_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}
SETTING = 'STOMPP_JAX_CPU_COMPILER_OPTIONS'
SETTING_VALUES = ('project', 'xla')  # project: CPU_OPTIONS (the default); xla: XLA's defaults.


def _flags_set_by_user() -> set[str]:
  """The option names that XLA_FLAGS sets (`--name=value` or `--name`)."""
  return set(re.findall(r'--(\w+)', os.environ.get('XLA_FLAGS', '')))


def check_setting() -> str:
  """The value of STOMPP_JAX_CPU_COMPILER_OPTIONS, one of SETTING_VALUES ('project' when unset);
  `experiment.check_config` calls it before a run writes anything.

  Raises:
    errors.SetupError: it is set to something else.
  """
  setting = os.environ.get(SETTING, 'project').strip().lower() or 'project'
  if setting not in SETTING_VALUES:
    raise errors.SetupError(f'{SETTING}={os.environ[SETTING]!r} is not one of'
                            f' {", ".join(SETTING_VALUES)}: unset it for the project\'s CPU'
                            ' options, or set it to xla for XLA\'s defaults.')
  return setting


def options(platform: str) -> Optional[dict[str, str]]:
  """The compiler options of the project for `platform` ('cpu', 'gpu', 'tpu'...), or None.

  Raises:
    errors.SetupError: STOMPP_JAX_CPU_COMPILER_OPTIONS is not one of SETTING_VALUES.
  """
  if platform != 'cpu' or check_setting() == 'xla':
    return None
  chosen = {name: value for name, value in CPU_OPTIONS.items()
            if name not in _flags_set_by_user()}
  return chosen or None


def jit(fun: Callable, *, platform: Optional[str] = None, **jit_kwargs: Any) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` with the compiler options of `platform`.

  Args:
    fun: the function to compile.
    platform: the platform of the devices it runs on (`platform_of(sharding)`); the default
      backend's when None.
    **jit_kwargs: anything else of `jax.jit` (shardings, donation, static arguments).
  """
  platform = platform or jax.default_backend()
  return jax.jit(fun, compiler_options=options(platform), **jit_kwargs)


def _computations(hlo: str) -> dict[str, str]:
  """{name: body} of every computation in an HLO module's text."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    if name is None and line.startswith('%') and line.endswith('{'):
      name = line[1:].split(' ', 1)[0]
      bodies[name] = ''
    elif line == '}':
      name = None
    elif name is not None:
      bodies[name] += line + '\n'
  return bodies


def platform_of(sharding: jax.sharding.Sharding) -> str:
  """The platform ('cpu', 'tpu'...) of the devices a sharding places data on."""
  return next(iter(sharding.device_set)).platform


def ynn_convolutions(compiled_hlo: str) -> int:
  """How many convolutions of a compiled program (`compiled.as_text()`) run in YNNPACK."""
  bodies = _computations(compiled_hlo)
  ynn_calls = re.findall(r'calls=%([\w.\-]+).*"kind":"__ynn_fusion"', compiled_hlo)
  return sum(' convolution(' in bodies.get(name, '') for name in ynn_calls)
