"""StoMPP on user Flax models (plain nn.Conv / nn.Dense: helpers.VGG, Nested here), binarized by
rules."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stompp_jax import analysis
from stompp_jax import errors
from stompp_jax import evaluate
from stompp_jax import experiment
from stompp_jax import models
from stompp_jax import optimizers
from stompp_jax import sites as sites_lib
from stompp_jax import state as state_lib
from stompp_jax import steps
from stompp_jax import train
from stompp_jax import workdir as workdir_lib
from stompp_jax.binary import context as bctx

from helpers import REPO, VGG, own_config, rows, sign  # pylint: disable=g-bad-import-order

IMAGE_SHAPE = (16, 16, 3)


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    y = nn.Conv(self.features, (3, 3), use_bias=False, name='conv')(x)
    return x + nn.BatchNorm(use_running_average=not train, name='bn')(y)


class Stage(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    for _ in range(2):
      x = Block(self.features)(x, train)  # Block_0, Block_1.
    return nn.Dense(self.features, name='mix')(x)


class Nested(nn.Module):
  """stem, stage/{Block_0,Block_1}/conv, stage/mix, Dense_0 (auto-named head)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name='stem')(x)
    x = Stage(8, name='stage')(x, train)
    return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


def binarization(module, config, total_steps=10):
  net = experiment.build_model(config, num_classes=4, image_shape=IMAGE_SHAPE, model=module)
  return net.model, experiment.binarization_config(config, net.sites, total_steps, 'cpu'), net.sites


def init(model, seed=0):
  images = jax.random.normal(jax.random.key(seed), (6, *IMAGE_SHAPE))
  return model.init(jax.random.key(1), images, train=False), images


def test_sites_of_a_vgg_net_follow_the_rules_in_forward_order():
  _, _, found = binarization(VGG(), own_config())
  assert [(s.path, s.kind, s.kernel_shape, s.input_shape) for s in found] == [
      (('conv1',), 'conv', (3, 3, 8, 8), (16, 16, 8)),
      (('conv2',), 'conv', (3, 3, 8, 16), (8, 8, 8)),
      (('dense',), 'dense', (256, 32), (256,))]
  assert sites_lib.site_table(found).splitlines()[1].split() == ['0', 'conv1', '3x3x8x8', '16x16x8']


def test_sites_of_nested_submodules_carry_their_full_paths():
  config = own_config()
  config.model.binary_include = ('^stage/',)
  config.model.binary_exclude = ('mix',)
  _, binary, found = binarization(Nested(), config)
  assert binary.sites == (('stage', 'Block_0', 'conv'), ('stage', 'Block_1', 'conv'))
  config.model.binary_exclude = ()
  config.model.binary_include = ('.*',)
  assert binarization(Nested(), config)[1].sites == (
      ('stem',), ('stage', 'Block_0', 'conv'), ('stage', 'Block_1', 'conv'), ('stage', 'mix'),
      ('Dense_0',))


def test_fully_binary_eval_equals_the_hand_binarized_network():
  model, binary, _ = binarization(VGG(), own_config(mode='bnn'))
  variables, images = init(model)
  ctx = bctx.BinarizationContext(step=jnp.int32(3), key=jax.random.key_data(jax.random.key(2)),
                                 config=binary, fully_binary=True)
  logits = model.apply(variables, images, train=False, ctx=ctx)
  by_hand = dict(variables['params'])
  for (name,) in binary.sites:
    by_hand[name] = {**by_hand[name], 'kernel': sign(by_hand[name]['kernel'])}
  reference = VGG(hand_signs=tuple(name for (name,) in binary.sites)).apply({**variables, 'params': by_hand}, images)
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
  float_logits = model.apply(variables, images, train=False)
  assert not np.allclose(logits, float_logits), 'ctx=None must run the float network'


def test_binary_weight_mode_binarizes_kernels_only_in_nested_submodules():
  config = own_config(mode='bwn')
  config.model.binary_include = ('^stage/',)
  model, binary, _ = binarization(Nested(), config)
  variables, images = init(model)
  ctx = bctx.BinarizationContext(step=jnp.int32(0), key=jax.random.key_data(jax.random.key(2)),
                                 config=binary, fully_binary=True)
  signed = jax.tree_util.tree_map_with_path(
      lambda path, x: sign(x) if path[0].key == 'stage' and path[-1].key == 'kernel' else x,
      variables['params'])
  np.testing.assert_allclose(model.apply(variables, images, ctx=ctx),
                             Nested().apply({**variables, 'params': signed}, images),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['bnn', 'bwn'])
def test_frozen_kernel_entries_get_zero_gradients_and_no_update(mode):
  config = own_config('stompp', mode)
  model, binary, found = binarization(VGG(), config, total_steps=10)
  images = jax.random.normal(jax.random.key(0), (8, *IMAGE_SHAPE))
  params = model.init(jax.random.key(0), images)['params']
  site_tree = sites_lib.site_tree(params, found)
  tx = optimizers.create_optimizer(
      config.optim, config.binary, lr_schedule=optax.constant_schedule(0.1), sites=site_tree,
      kernel_mask=experiment.kernel_mask(params))
  state = state_lib.create_train_state(model, tx, 0, images).replace(step=jnp.int32(4))
  ctx = bctx.BinarizationContext(step=state.step, key=state.mask_key, config=binary)
  batch = {'image': images, 'label': jnp.arange(8) % 4}

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                            train=True, ctx=ctx, mutable=['batch_stats', 'binary_stats'])
    return steps.cross_entropy(logits, batch['label']).mean()

  grads = jax.grad(loss)(state.params)
  # One momentum step first, so that a frozen entry's update could come from momentum.
  state, _, per_site = steps.train_step(state.replace(step=jnp.int32(3)), batch, model=model,
                                        binarization=binary, sites=site_tree, tx=tx,
                                        diagnostics=False)
  new_state, _, per_site = steps.train_step(state, batch, model=model, binarization=binary,
                                            sites=site_tree, tx=tx, diagnostics=False)
  fractions = np.asarray(per_site['frozen_fraction'])
  assert fractions.shape == (3,) and 0 < fractions[0] and fractions[-1] < 1, fractions
  for site, (path,) in enumerate(binary.sites):
    frozen = np.asarray(bctx.site_frozen_mask(ctx, site, 'kernel', found[site].kernel_shape))
    grad = np.asarray(grads[path]['kernel'])
    assert np.all(grad[frozen] == 0), path
    if not frozen.all():
      assert np.any(grad[~frozen] != 0), path
    kernel, new_kernel = state.params[path]['kernel'], new_state.params[path]['kernel']
    np.testing.assert_array_equal(np.asarray(new_kernel)[frozen], np.asarray(kernel)[frozen])
    assert frozen.all() or not np.array_equal(new_kernel, kernel), path


@pytest.fixture(scope='module')
def reference_run(own_model_run):
  return own_model_run  # The session's run (conftest.py); these tests only read it.


def test_train_and_evaluate_trains_a_user_model(reference_run):
  workdir, final = reference_run
  train_rows, eval_rows = rows(workdir, 'train'), rows(workdir, 'eval')
  assert [r['step'] for r in train_rows] == [3, 6, 9, 12]
  assert {'eval_fully_binary_accuracy', 'eval_accuracy'} <= set(eval_rows[-1])
  fractions = np.array([r['frozen_fraction'] for r in train_rows])
  assert fractions.shape == (4, 3) and np.all(np.diff(fractions, axis=0) >= 0)
  # Not exactly 1: with 3 sites the last window ends at x = 0.99999994 in float32 (schedule.py).
  np.testing.assert_allclose(fractions[-1], 1.0, atol=1e-6)
  assert json.loads((workdir / 'done.json').read_text())['step'] == final['step'] == 12


def test_a_user_model_run_resumes_exactly(reference_run, tmp_path, monkeypatch):
  _, reference = reference_run
  monkeypatch.setattr(train._Preemption, 'reached', lambda self, step: step == 6)
  first = train.train_and_evaluate(own_config(), str(tmp_path), model=VGG())
  assert first['preempted'] and first['step'] == 6
  monkeypatch.undo()
  second = train.train_and_evaluate(own_config(), str(tmp_path), model=VGG())
  assert second['step'] == 12 and not second['preempted']
  assert second['eval_fully_binary_loss'] == pytest.approx(reference['eval_fully_binary_loss'],
                                                           rel=1e-6)


def test_a_model_that_is_not_a_linen_module_is_refused(tmp_path):
  with pytest.raises(errors.SetupError, match='flax.linen.Module'):
    train.train_and_evaluate(own_config(), str(tmp_path), model=lambda x: x)
  assert not list(tmp_path.iterdir())


class _BuggyModel(nn.Module):
  """A user model with a bug of its own: a ValueError raised inside its __call__."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name='conv')(x)
    raise ValueError('shapes do not line up in my model')


@pytest.mark.parametrize('mode', ['fp', 'bnn'])
def test_a_bug_in_a_user_model_keeps_its_type_and_traceback(tmp_path, mode):
  """Not a one-line "bad input": the model's own ValueError, raised from its __call__."""
  config = own_config('fp' if mode == 'fp' else 'stompp', mode)
  with pytest.raises(ValueError, match='shapes do not line up in my model') as raised:
    train.train_and_evaluate(config, str(tmp_path / 'run'), model=_BuggyModel())
  assert not isinstance(raised.value, errors.SetupError)
  assert raised.traceback[-1].name == '__call__'
  assert str(raised.traceback[-1].path) == __file__
  assert not (tmp_path / 'run').exists()


def test_from_module_refuses_an_unknown_mode():
  with pytest.raises(ValueError, match="Unknown mode 'bn': use one of fp, bwn, bnn"):
    models.from_module(VGG(), 'bn')


def test_the_example_trains_its_own_model(tmp_path):
  # 4 steps: the example's own model and config compile programs no other test shares.
  out = subprocess.run(
      [sys.executable, '-m', 'examples.own_model', f'--workdir={tmp_path}',
       '--config.train.num_steps=4', '--config.train.eval_steps=1',
       '--config.train.log_every=2', '--config.data.synthetic_train_size=256'],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
  assert 'eval_fully_binary_accuracy' in out.stdout and 'step 4' in out.stdout, out.stdout
  assert (tmp_path / 'done.json').exists()


def test_a_user_model_run_is_evaluated_from_python(reference_run):
  workdir, final = reference_run
  results = evaluate.evaluate_run(str(workdir), model=VGG())
  assert results['eval_fully_binary_accuracy'] == final['eval_fully_binary_accuracy']
  assert results['eval_loss'] == pytest.approx(final['eval_loss'], rel=1e-5)


def test_a_user_model_run_records_its_class_and_the_commands_refuse_it_in_one_line(
    reference_run, tmp_path):
  workdir, _ = reference_run
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['own_class'] == 'helpers.VGG'
  assert analysis.depth_of({'config': saved}) is None  # Not the ResNet its model.name says.
  for command in (['stompp_jax.evaluate'], ['stompp_jax.export', f'--out={tmp_path / "out"}']):
    result = subprocess.run([sys.executable, '-m', *command, f'--workdir={workdir}'], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "Error: model.own_class='helpers.VGG': this run trained your own model, which the command"
        ' line cannot rebuild; evaluate or export it from Python with model=VGG(...)'
        ' (docs/own-model.md).']
  assert not (tmp_path / 'out').exists()


def test_a_run_saved_before_the_class_was_recorded_still_resumes():
  new = json.loads(models.with_own_class(own_config(), VGG()).to_json())
  old = json.loads(json.dumps(new))
  del old['model']['own_class']
  assert workdir_lib.config_differences(workdir_lib.upgrade_config(old), new) == []
