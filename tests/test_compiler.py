"""The backend compiler options (stompp_jax/compiler.py): accepted by the pinned jaxlib, they
keep every convolution of the compiled train step out of YNNPACK; the user's settings win."""

import jax
import jax.numpy as jnp
import pytest

from stompp_jax import compiler
from stompp_jax import experiment
import helpers

OPTION = 'xla_cpu_experimental_ynn_fusion_type'


@pytest.fixture
def project_options(monkeypatch):
  monkeypatch.delenv(compiler.SETTING, raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0')


def _train_step_hlo() -> str:
  """The tiny train step on one device: its weight-gradient convs have the batch (32) as
  feature dim, more than the 16 channels from which XLA hands a conv to YNNPACK."""
  config = helpers.tiny_config('stompp')
  config.mesh.num_devices = 1
  exp = experiment.build(config)
  return exp.compile_train_step().as_text()


def test_the_pinned_jaxlib_accepts_the_cpu_options(project_options):
  assert compiler.options('cpu') == compiler.CPU_OPTIONS
  compiled = jax.jit(lambda x: x * 2, compiler_options=compiler.CPU_OPTIONS).lower(1.0).compile()
  assert float(compiled(jnp.float32(1.5))) == 3.0


def test_the_train_step_holds_no_ynnpack_convolution(project_options, monkeypatch):
  assert compiler.ynn_convolutions(_train_step_hlo()) == 0
  monkeypatch.setenv(compiler.SETTING, 'xla')  # XLA's defaults hand these convs to YNNPACK.
  assert compiler.ynn_convolutions(_train_step_hlo()) > 0


def test_an_option_in_xla_flags_is_not_passed_again(project_options, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', f'--{OPTION}=-individual_dot')
  assert compiler.options('cpu') is None


def test_the_project_setting_turns_the_options_off_or_is_refused(project_options, monkeypatch):
  monkeypatch.setenv(compiler.SETTING, 'xla')
  assert compiler.options('cpu') is None
  monkeypatch.setenv(compiler.SETTING, 'fast')
  with pytest.raises(ValueError, match=f"{compiler.SETTING}='fast' is not one of"):
    compiler.options('cpu')


@pytest.mark.parametrize('platform', ['tpu', 'gpu', 'cuda'])
def test_other_backends_get_no_cpu_options(project_options, platform):
  assert compiler.options(platform) is None
