"""Every jitted function of a run (train step, eval steps, BatchNorm recalibration) lowers for
CUDA GPUs through jax.export, on this CPU-only machine: no CPU-only op and no host callback.

The functions are caught where the run makes them, `compiler.jit` (experiment.py and
recalibrate.py jit through it), with the arguments their `.lower` gets; jax.export then lowers
each for platforms=('cuda',) and refuses any custom call that is not stable across platforms
(a CPU-only kernel); a host callback does not even lower for another platform than the
machine's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stompp_jax import compiler
from stompp_jax import experiment
from stompp_jax import recalibrate
import helpers


def exported_for_cuda(jitted, args) -> jax.export.Exported:
  return jax.export.export(jitted, platforms=('cuda',))(*args)


@pytest.fixture
def jitted_functions(monkeypatch):
  """[(name, jitted function, lowering arguments)] that `compiler.jit` hands out from now on."""
  caught = []
  make = compiler.jit

  def catching(fun, **kwargs):
    jitted = make(fun, **kwargs)
    name = getattr(getattr(fun, 'func', fun), '__name__', repr(fun))

    class Lowerable:
      def lower(self, *args):
        caught.append((name, jitted, args))
        return jitted.lower(*args)

    return Lowerable()

  monkeypatch.setattr(compiler, 'jit', catching)
  return caught


@pytest.mark.parametrize('method', ['fp', 'stompp_ste'])
def test_every_jitted_function_of_a_run_lowers_for_cuda(jitted_functions, method):
  config = helpers.tiny_config(method, recalibrate_bn_batches=1)
  config.mesh.num_devices = 2
  exp = experiment.build(config)
  exp.compile_train_step()
  exp.compile_eval_steps()
  if method != 'fp':  # A run recalibrates the fully binary network only.
    recalibrate.Recalibrator(exp.model, exp.binarization, exp.abstract_state,
                             exp.state_shardings, exp.abstract_batch(config.train.batch_size), 1)
  names = [name for name, _, _ in jitted_functions]
  binary = ['eval_step', 'add'] if method != 'fp' else []  # eval_fully_binary, recalibration.
  assert sorted(names) == sorted(['train_step', 'eval_step', *binary])
  for name, jitted, args in jitted_functions:
    exported = exported_for_cuda(jitted, args)
    assert exported.platforms == ('cuda',), name
    assert exported.nr_devices == 2, name
    text = exported.mlir_module()
    assert 'callback' not in text, name


def test_a_host_callback_in_a_step_is_caught():
  """The check above can fail: a step with a host callback does not export for CUDA."""
  def step(x):
    y = jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return y + 1

  with pytest.raises(ValueError, match='different from the lowering platform cuda'):
    exported_for_cuda(jax.jit(step), (jnp.zeros((4,), jnp.float32),))
