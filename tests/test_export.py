"""Export of the fully binary network: packing, XNOR-popcount layers, threshold folds, and logits
equal to the training-time fully binary evaluation (on trained runs and on random BatchNorms)."""

import functools
import json
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stompp_jax import checkpoints
from stompp_jax import errors
from stompp_jax import experiment
from stompp_jax import models
from stompp_jax import storage
from stompp_jax import train
from stompp_jax.binary import context as bctx
from stompp_jax.data import pipeline
from stompp_jax.export import files
from stompp_jax.export import fold
from stompp_jax.export import inference
from stompp_jax.export import sources
from stompp_jax.models import resnet

from helpers import REPO, tiny_config  # pylint: disable=g-bad-import-order



@pytest.fixture
def rng(request):
  """A generator seeded by the test's own name, so a test's data do not depend on which tests ran
  before it (a module-wide generator made them depend on test selection and order)."""
  return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def signs(x):
  return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)


# ------------------------------------------------------------------------------- bit-level units


def test_packed_kernel_decodes_to_its_signs(rng):
  kernel = rng.normal(size=(3, 3, 13, 5)).astype(np.float32)
  kernel[0, 0, 0, 0] = 0.0  # sign(0) = +1
  packed = fold.pack_kernel(kernel)
  assert packed.dtype == np.uint8 and packed.shape == (3, 3, 2, 5)
  np.testing.assert_array_equal(inference.decode_signs(packed, 13), signs(kernel))
  # The documented layout: np.packbits along the input axis, bit 1 = +1, pad bits 0.
  np.testing.assert_array_equal(packed[1, 2, :, 4], np.packbits(kernel[1, 2, :, 4] >= 0))


@pytest.mark.parametrize('cin, size, strides, padding', [
    (13, 3, 1, 'SAME'),
    (13, 3, 2, 'SAME'),
    (40, 3, 2, 'SAME'),  # two 32-bit words
    (5, 7, 2, ((3, 3), (3, 3))),  # the ImageNet stem's explicit padding
    (9, 1, 2, 'VALID'),
])
def test_xnor_popcount_conv_equals_float_conv_of_signs(rng, cin, size, strides, padding):
  x = rng.normal(size=(2, 9, 8, cin)).astype(np.float32)
  kernel = rng.normal(size=(size, size, cin, 6)).astype(np.float32)
  conv = jax.jit(inference.binary_conv,
                 static_argnames=('in_channels', 'strides', 'padding'))
  packed_kernel = inference.kernel_words(fold.pack_kernel(kernel))
  y = conv(inference.pack_signs(x), packed_kernel, in_channels=cin,
           strides=(strides, strides), padding=padding)
  expected = inference.float_conv(signs(x), signs(kernel), strides=(strides, strides),
                                         padding=padding)
  assert y.dtype == jnp.int32
  np.testing.assert_array_equal(y, expected)


def test_xnor_popcount_dense_equals_matmul_of_signs(rng):
  x, kernel = rng.normal(size=(4, 37)), rng.normal(size=(37, 3))
  y = 37 - 2 * inference.xor_popcount(
      inference.pack_signs(x), inference.kernel_words(fold.pack_kernel(kernel)))
  np.testing.assert_array_equal(y, signs(x) @ signs(kernel))


def test_threshold_fold_equals_batch_norm_then_sign(rng):
  channels, taps = 64, 45
  multiplier = rng.normal(size=channels).astype(np.float32)
  multiplier[:4] = 0.0  # gamma = 0: a constant sign
  center = rng.normal(scale=10, size=channels).astype(np.float32)
  center[4:8] = np.round(center[4:8])  # BatchNorm exactly 0 at an integer: sign(0) = +1
  offset = rng.normal(size=channels).astype(np.float32)
  offset[:8] = 0.0
  threshold, flip = fold.fold_threshold(center, multiplier, offset, taps)
  y = np.arange(-taps, taps + 1)[:, None]
  expected = fold.batch_norm(y, center, multiplier, offset) >= 0
  np.testing.assert_array_equal((y >= threshold) != flip, expected)
  assert flip.any() and not flip.all()


# ------------------------------------------------------------------------------- whole models


def training_time_logits(config, variables, images):
  """What steps.eval_step(..., fully_binary=True) computes its metrics from: every mask = 1."""
  num_classes, image_shape = pipeline.input_shape(config.data)
  net = experiment.build_model(config, num_classes=num_classes, image_shape=image_shape)
  model = net.model
  binarization = experiment.binarization_config(config, net.sites, total_steps=1, platform='cpu')
  ctx = bctx.BinarizationContext(step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(0),
                                 config=binarization, fully_binary=True)
  return jax.jit(functools.partial(model.apply, train=False, ctx=ctx))(variables, images)


def assert_close_at_scale(got, expected, ulps=64):
  """Logits equal up to float32 rounding at the scale of their row.

  The export and the model sum the same terms in different orders (integer XNOR-popcounts and
  folded BatchNorms vs float convolutions), so they differ by a few float32 ulps of the largest
  values the sums pass through, not of the result: a logit of -308 in a row of magnitude 2e5 (random
  BatchNorms, BWN) came out 0.005 apart, 2.2 ulps of 2e5. Measured over this file: at most 3.3 ulps of
  the row's largest logit. Rows of magnitude below 1 are held to 1.
  """
  got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
  scale = np.maximum(np.abs(expected).max(axis=-1, keepdims=True), 1.0)
  ulps_off = np.abs(got - expected) / (scale * np.finfo(np.float32).eps)
  assert ulps_off.max() <= ulps, f'{ulps_off.max():.1f} float32 ulps of the row scale apart'


def assert_export_matches(export_dir, config, variables, images):
  exported = inference.load(export_dir)
  got, expected = exported(images), training_time_logits(config, variables, images)
  np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(expected, -1))
  assert_close_at_scale(got, expected)
  return exported


def assert_binary_layers_store_bits_only(manifest):
  tensors = manifest['tensors']
  binary_ops = [op for op in manifest['program'] if op.get('precision', 'float') != 'float']
  assert binary_ops
  for op in binary_ops:
    kernel = tensors[op['kernel']]
    assert kernel['precision'] == 'binary' and kernel['dtype'] == 'uint8'
    assert kernel['bytes'] == np.prod(kernel['stored_shape'])
    assert kernel['stored_shape'][-2] == -(-kernel['shape'][-2] // 8)
  assert manifest['size']['export_bytes'] == sum(t['bytes'] for t in tensors.values())


def random_batch_norms(variables, rng):
  """Random BatchNorm statistics, scales of both signs (some 0) and biases (classifier's too)."""
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.normal(size=x.shape) * (rng.random(x.shape) > 0.1)
                       if path[-1].key in ('scale', 'bias') else x), variables['params'])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.normal(scale=3, size=x.shape) if path[-1].key == 'mean'
                       else rng.uniform(0.1, 4, size=x.shape)), variables['batch_stats'])
  return jax.tree.map(lambda x: np.asarray(x, np.float32),
                      {'params': params, 'batch_stats': stats})


TINY_BOTTLENECK = functools.partial(resnet.ResNet, stage_sizes=(1, 1),
                                    block_cls=resnet.BottleneckBlock, num_filters=4)


@pytest.mark.parametrize('bnn_shortcut', ['real', 'binarized'])
@pytest.mark.parametrize('mode, rules, stem, bottleneck', [
    ('bnn', ((r'.*',), ()), 'cifar', False),  # binary stem (on sign(image)), shortcut, classifier
    ('bnn', None, 'imagenet', True),  # bottlenecks, max-pool, thresholds on two BatchNorms a block
    ('bwn', ((r'.*',), ()), 'imagenet', False),
])
def test_export_of_random_batch_norms_equals_model(tmp_path, monkeypatch, rng, mode, rules, stem,
                                                   bottleneck, bnn_shortcut):
  if bottleneck:  # A bottleneck ResNet small enough for a test, under the tiny model's name.
    monkeypatch.setitem(models._MODELS, 'tiny_resnet', TINY_BOTTLENECK)
  config = tiny_config('stompp')
  config.model.mode, config.model.stem = mode, stem
  config.model.bnn_shortcut = bnn_shortcut
  config.data.synthetic_image_shape = (24, 24, 3)
  if rules:
    config.model.binary_include, config.model.binary_exclude = rules
  num_classes, image_shape = pipeline.input_shape(config.data)
  model = models.create_model(config.model, num_classes=num_classes, image_shape=image_shape)
  init = jax.jit(model.init, static_argnames='train')
  variables = random_batch_norms(init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)),
                                      train=False), rng)
  manifest = sources.export_variables(str(tmp_path), config=config,
                                      variables=variables, num_classes=num_classes,
                                      image_shape=image_shape, source={'test': True})
  assert_binary_layers_store_bits_only(manifest)
  thresholds = [op for op in manifest['program'] if op['op'] == 'threshold']
  assert len(thresholds) == (0 if mode == 'bwn' else 4 if bottleneck else 2)
  binarized = [op for op in manifest['program'] if op['op'] == 'binarize']
  assert len(binarized) == (2 if mode == 'bnn' and bnn_shortcut == 'binarized' else 0)
  images = rng.normal(size=(16, *image_shape)).astype(np.float32)
  assert_export_matches(str(tmp_path), config, variables, images)


def test_mobilenet_v2_is_not_exported_yet(tmp_path):
  config = tiny_config('stompp')
  config.model.name = 'mobilenet_v2'
  with pytest.raises(NotImplementedError, match='mobilenet_v2 is not supported yet'):
    sources.export_config(config, str(tmp_path))


@pytest.fixture(scope='module')
def trained_runs(tmp_path_factory, tiny_run):
  """Tiny BNN and BWN runs trained with StoMPP: {mode: (workdir, config)}; the BNN run is the
  session's (conftest.py), the BWN run the same config in mode bwn."""
  runs = {'bnn': (str(tiny_run), tiny_config('stompp'))}
  config = tiny_config('stompp')
  config.model.mode = 'bwn'
  workdir = str(tmp_path_factory.mktemp('bwn'))
  train.train_and_evaluate(config, workdir)
  runs['bwn'] = workdir, config
  return runs


def eval_images(config):
  size = config.data.synthetic_eval_size
  return next(iter(pipeline.make_eval_iterator(config.data, global_batch_size=size)))['image']


def test_cli_export_of_trained_bnn_equals_fully_binary_eval(trained_runs, tmp_path):
  workdir, config = trained_runs['bnn']
  result = subprocess.run(
      [sys.executable, '-m', 'stompp_jax.export', f'--workdir={workdir}', f'--out={tmp_path}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'export total' in result.stdout and 'float32 model' in result.stdout, result.stdout
  _, variables, _ = checkpoints.read_variables(workdir)
  exported = assert_export_matches(str(tmp_path), config, variables, eval_images(config))
  manifest = exported.manifest
  assert manifest['source']['step'] == 12
  assert_binary_layers_store_bits_only(manifest)
  assert [op['layer'] for op in manifest['program'] if op['op'] == 'threshold'] == [
      'stage1_block0/bn1', 'stage2_block0/bn1']
  size = manifest['size']
  assert size['float32_model_bytes'] > 5 * size['export_bytes']
  assert size['checkpoint_state_bytes'] > size['float32_model_bytes']


def test_export_of_trained_bwn_equals_fully_binary_eval(trained_runs, tmp_path):
  workdir, config = trained_runs['bwn']
  manifest = sources.export_workdir(workdir, str(tmp_path))
  assert_binary_layers_store_bits_only(manifest)
  assert not [op for op in manifest['program'] if op['op'] in ('threshold', 'sign')]
  _, variables, _ = checkpoints.read_variables(workdir)
  assert_export_matches(str(tmp_path), config, variables, eval_images(config))
  assert json.loads((tmp_path / files.MANIFEST).read_text()) == manifest
  assert sorted(os.listdir(tmp_path)) == [files.MANIFEST, files.TENSORS]


def test_export_can_fold_recalibrated_batch_norm_statistics(trained_runs, tmp_path):
  workdir, config = trained_runs['bnn']
  manifest = sources.export_workdir(workdir, str(tmp_path), recalibrate_bn_batches=2)
  assert manifest['source']['recalibrated_bn_batches'] == 2
  variables = sources.read_run(workdir).variables
  recalibrated = sources.read_run(workdir, 2).variables
  running, estimated = (v['stage1_block0']['bn1']['mean'] for v in
                        (variables['batch_stats'], recalibrated['batch_stats']))
  assert not np.allclose(running, estimated)  # Other statistics than the running ones ...
  assert_export_matches(str(tmp_path), config, recalibrated, eval_images(config))  # ... folded.
  with pytest.raises(errors.SetupError, match='recalibrate_bn_batches=-1'):
    sources.export_workdir(workdir, str(tmp_path / 'no'), recalibrate_bn_batches=-1)


def test_a_rewrite_interrupted_at_any_file_leaves_no_manifest_beside_other_tensors(
    trained_runs, tmp_path, monkeypatch):
  old, new = (sources.fold_workdir(trained_runs[mode][0]) for mode in ('bnn', 'bwn'))

  def assert_one_export_whole():
    """No manifest, or a manifest with exactly the tensors written with it."""
    if not (tmp_path / files.MANIFEST).exists():
      return
    manifest, stored = files.read(str(tmp_path))
    written = next(tensors for m, tensors in (old, new) if m == manifest)
    assert stored.keys() == written.keys()
    for name, array in stored.items():
      np.testing.assert_array_equal(array, written[name].array)

  class Killed(BaseException):
    pass

  write_bytes = storage.write_bytes
  for killed_at in range(2):  # tensors.npz, then manifest.json
    files.write(str(tmp_path), *old)
    calls = []

    def dies(path, data, killed_at=killed_at, calls=calls):
      calls.append(path)
      if len(calls) > killed_at:
        raise Killed(path)
      write_bytes(path, data)

    monkeypatch.setattr(storage, 'write_bytes', dies)
    with pytest.raises(Killed):
      files.write(str(tmp_path), *new)
    monkeypatch.setattr(storage, 'write_bytes', write_bytes)
    assert_one_export_whole()
  files.write(str(tmp_path), *new)
  assert files.read(str(tmp_path))[0] == new[0]


@pytest.mark.parametrize('argv', [['--bogus=1'], ['--recalibrate_bn_batches=many'], ['extra'],
                                  ['--allow_unfinished=maybe']])
def test_cli_bad_flag_or_extra_argument_is_one_line_and_writes_nothing(tiny_run, tmp_path, argv):
  out = tmp_path / 'out'
  result = subprocess.run([sys.executable, '-m', 'stompp_jax.export', f'--workdir={tiny_run}',
                           f'--out={out}', *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == errors.EXIT_BAD_INPUT, result
  assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith('Error: '), result
  assert not out.exists()


@pytest.mark.parametrize('flag', ['--allow_unfinished', '--recalibrate_bn_batches=20'])
def test_cli_refuses_a_run_flag_with_config(tmp_path, flag):
  """They apply to the export of a run only; with --config they would be ignored."""
  out = tmp_path / 'out'
  result = subprocess.run([sys.executable, '-m', 'stompp_jax.export', '--config=configs/tiny.py',
                           f'--out={out}', flag], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == errors.EXIT_BAD_INPUT, result
  assert result.stderr == (f'Error: {flag.split("=")[0]} with --config: they apply to the export'
                           ' of a run; use --workdir=RUN, or drop them for the initialized'
                           ' model.\n'), result
  assert not out.exists()


# The export's command line with `sources.export_config` raising the exception given in argv[1].
_RAISING_EXPORT = '''
import runpy, sys
from stompp_jax.export import program, sources
raised = NotImplementedError if sys.argv.pop(1) == 'jax' else program.UnsupportedModelError
def export_config(*args, **kwargs):
  raise raised('raised inside the export')
sources.export_config = export_config
runpy.run_module('stompp_jax.export', run_name='__main__', alter_sys=True)
'''


@pytest.mark.parametrize('raised', ['jax', 'export'])
def test_cli_reports_only_the_exports_own_unsupported_model_as_bad_input(tmp_path, raised):
  out = tmp_path / 'out'
  result = subprocess.run([sys.executable, '-c', _RAISING_EXPORT, raised,
                           '--config=configs/tiny.py', f'--out={out}'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  if raised == 'export':  # A model the export cannot walk: bad input, one line.
    assert result.returncode == errors.EXIT_BAD_INPUT, result
    assert result.stderr == 'Error: Not exported: raised inside the export\n', result
  else:  # Any other NotImplementedError (JAX's, a bug): a traceback, exit status 1.
    assert result.returncode == errors.EXIT_ERROR, result
    assert 'Traceback' in result.stderr and 'NotImplementedError' in result.stderr, result
  assert not out.exists()
