"""Re-estimated BatchNorm statistics of the fully binary network (stompp_jax/recalibrate.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stompp_jax import errors
from stompp_jax import evaluate
from stompp_jax import parallel
from stompp_jax import recalibrate
from stompp_jax import sites
from stompp_jax import state as state_lib
from stompp_jax import steps
from stompp_jax import train
from stompp_jax.binary import context as bctx
from stompp_jax.binary import schedule
from stompp_jax.models import inspect
from stompp_jax.models import resnet

from helpers import rows, tiny_config  # pylint: disable=g-bad-import-order

IMAGE = (8, 8, 3)
RULES = bctx.BinaryRules(exclude=('^stem', '^classifier', 'shortcut'))
BATCH = 64


def setup(num_devices):
  """(model, binarization, state, state shardings, abstract batch, mesh) of a tiny BNN."""
  model = resnet.TinyResNet(num_classes=4, mode='bnn', bnn_shortcut='binarized')
  found = sites.discover_sites(inspect.trace_model(model, IMAGE), RULES)
  binarization = bctx.BinarizationConfig(
      method='stompp', schedule=schedule.ScheduleConfig(total_steps=100),
      sites=tuple(s.path for s in found))
  variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)))
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                               batch_stats=variables['batch_stats'], opt_state=(),
                               mask_key=jax.random.key_data(jax.random.key(3)))
  mesh = parallel.make_mesh(num_devices)
  shardings = parallel.state_sharding(jax.eval_shape(lambda: state), mesh, False)
  state = jax.device_put(state, shardings)
  batch_sharding = parallel.batch_sharding(mesh)
  abstract = {'image': jax.ShapeDtypeStruct((BATCH, *IMAGE), jnp.float32, sharding=batch_sharding)}
  return model, binarization, state, shardings, abstract, mesh


def images(seed, n=BATCH):
  return 0.5 + jax.random.normal(jax.random.key(seed), (n, *IMAGE))


def global_batches(mesh, seeds):
  return [parallel.global_batch({'image': np.asarray(images(s))}, mesh) for s in seeds]


@pytest.mark.parametrize('num_devices', [1, 8])
def test_average_equals_numpy_average_of_flax_batch_statistics(num_devices):
  model, binarization, state, shardings, abstract, mesh = setup(num_devices)
  recalibrator = recalibrate.Recalibrator(model, binarization, state, shardings, abstract, 3)
  got = recalibrator(state, global_batches(mesh, [10, 11, 12, 13]))  # The 4th is not used.
  # Reference: flax's own running update from zeroed statistics with momentum 0.9 is
  # 0.1 x (the batch's mean, biased variance); averaged with numpy over the 3 batches.
  ctx = bctx.BinarizationContext(step=state.step, key=state.mask_key, config=binarization,
                                 fully_binary=True)
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  per_batch = []
  for seed in (10, 11, 12):
    _, updated = model.apply({'params': state.params, 'batch_stats': zeros}, images(seed),
                             train=True, ctx=ctx, mutable=['batch_stats', 'binary_stats'])
    per_batch.append(jax.tree.map(lambda a: np.asarray(a, np.float64) / 0.1,
                                  updated['batch_stats']))
  expected = jax.tree.map(lambda *a: np.mean(a, axis=0), *per_batch)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(g), e, rtol=1e-4, atol=1e-5)
  assert jax.tree.map(lambda a: a.sharding, got) == shardings.batch_stats
  with pytest.raises(ValueError, match='only 2 batches'):
    recalibrator(state, global_batches(mesh, [1, 2]))


def test_a_network_with_stale_statistics_gets_its_accuracy_back():
  # Its running statistics are stale: those of the continuous network it was at step 0. The
  # labels are what the fully binary network decides with its population statistics (a long
  # average over 64 other batches), on the half of the examples it decides with the larger
  # margin. With the stale statistics it loses most of them; 16 re-estimation batches give
  # them back.
  model, binarization, state, shardings, abstract, mesh = setup(1)
  continuous = bctx.BinarizationContext(step=state.step, key=state.mask_key, config=binarization)
  stale = state.batch_stats
  for seed in range(20, 40):
    _, updated = model.apply({'params': state.params, 'batch_stats': stale}, images(seed),
                             train=True, ctx=continuous, mutable=['batch_stats', 'binary_stats'])
    stale = updated['batch_stats']
  stale_state = state.replace(batch_stats=stale)
  population = recalibrate.Recalibrator(model, binarization, state, shardings, abstract, 64)(
      stale_state, global_batches(mesh, range(100, 164)))
  x = images(99, 512)
  logits = model.apply({'params': state.params, 'batch_stats': population}, x,
                       ctx=bctx.BinarizationContext(step=state.step, key=state.mask_key,
                                                    config=binarization, fully_binary=True))
  top2 = jnp.sort(logits, -1)[:, -2:]
  margin = top2[:, 1] - top2[:, 0]
  eval_batch = {'image': x, 'label': jnp.argmax(logits, -1),
                'mask': (margin >= jnp.median(margin)).astype(jnp.float32)}

  def accuracy(s):
    m = steps.eval_step(s, eval_batch, model=model, binarization=binarization, fully_binary=True)
    return float(m.compute()['accuracy'])

  recalibrated = recalibrate.Recalibrator(model, binarization, state, shardings, abstract, 16)(
      stale_state, global_batches(mesh, range(16)))
  before, after = accuracy(stale_state), accuracy(stale_state.replace(batch_stats=recalibrated))
  assert before <= 0.5 and after >= 0.8, (before, after)


def test_training_logs_recalibrated_eval_rows_sharded_without_changing_the_run(tmp_path,
                                                                               tiny_run):
  """The tiny run again with recalibrate_bn_batches=2, on 8 devices: the same training (the
  session's tiny_run is the run without it), one more eval row per evaluation, and that row is
  what `evaluate_run` computes from the final checkpoint on one device."""
  train.train_and_evaluate(tiny_config('stompp', recalibrate_bn_batches=2), str(tmp_path))
  eval_rows, train_rows = rows(tmp_path, 'eval'), rows(tmp_path, 'train')
  plain_eval, plain_train = rows(tiny_run, 'eval'), rows(tiny_run, 'train')
  assert [r['step'] for r in eval_rows] == [6, 12]
  for row, plain in zip(eval_rows, plain_eval):
    assert 'eval_fully_binary_recalibrated_accuracy' not in plain
    assert row['eval_fully_binary_accuracy'] == plain['eval_fully_binary_accuracy']
  assert [r['loss'] for r in train_rows] == [r['loss'] for r in plain_train]  # State unchanged.
  one_device = evaluate.evaluate_run(str(tmp_path), recalibrate_bn_batches=2)
  assert (one_device['eval_fully_binary_recalibrated_accuracy']
          == eval_rows[-1]['eval_fully_binary_recalibrated_accuracy'])
  assert one_device['eval_fully_binary_recalibrated_loss'] == pytest.approx(
      eval_rows[-1]['eval_fully_binary_recalibrated_loss'], rel=1e-4)
  assert one_device['eval_fully_binary_recalibrated_loss'] != pytest.approx(
      one_device['eval_fully_binary_loss'], rel=1e-4)  # The statistics did change.


def test_negative_batch_count_is_a_setup_error(tmp_path):
  with pytest.raises(errors.SetupError, match='recalibrate_bn_batches=-1'):
    train.train_and_evaluate(tiny_config(recalibrate_bn_batches=-1), str(tmp_path))
  assert not list(tmp_path.iterdir())
