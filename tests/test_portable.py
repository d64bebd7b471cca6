"""The portable export: a jax.export artefact run in a process that cannot import the project."""

import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from stompp_jax import evaluate
from stompp_jax import recalibrate
from stompp_jax.binary import context as bctx
from stompp_jax.data import pipeline
from stompp_jax.export import inference
from stompp_jax.export import portable
from stompp_jax.export import sources
from stompp_jax.export import __main__ as export_cli

import helpers  # pylint: disable=g-bad-import-order

# Run with `python -I` (no cwd, no PYTHONPATH on sys.path) from a directory without the project,
# and stompp_jax blocked (an installed copy, editable ones too, would be importable): only jax.
STANDALONE = '''
import sys
sys.modules['stompp_jax'] = None  # `import stompp_jax` raises ImportError from here on.
import jax, numpy as np
pixels = np.load('pixels.npy')
for name in sys.argv[1:]:
  with open(name, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  np.save(name + '.logits.npy', np.asarray(exported.call(pixels)))
'''


@pytest.fixture(scope='module')
def runs(tiny_run, own_model_run):
  """Two finished runs of the session (conftest.py): the zoo's tiny ResNet BNN and the
  VGG-style model of helpers.py."""
  return tiny_run, own_model_run[0]


def run_standalone(directory, names, pixels):
  np.save(directory / 'pixels.npy', pixels)
  (directory / 'run.py').write_text(STANDALONE)
  result = subprocess.run([sys.executable, '-I', 'run.py', *names], cwd=directory,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return [np.load(directory / f'{name}.logits.npy') for name in names]


def fully_binary_logits(run, images):
  ctx = bctx.BinarizationContext(step=run.state.step, key=run.state.mask_key,
                                 config=run.binarization, fully_binary=True)
  return np.asarray(run.model.apply({'params': run.state.params,
                                     'batch_stats': run.state.batch_stats},
                                    images, train=False, ctx=ctx))


def test_the_artefacts_run_without_the_project_and_match_the_reference(runs, tmp_path):
  zoo, own = runs
  pixels = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
  zoo_out, own_out = tmp_path / 'zoo', tmp_path / 'own'
  paths = [portable.export_run(str(zoo), str(zoo_out)),
           portable.export_run(str(own), str(own_out), model=helpers.VGG())]
  standalone = tmp_path / 'standalone'
  standalone.mkdir()
  for i, path in enumerate(paths):
    os.replace(path, standalone / f'{i}.jax_export')
  zoo_logits, own_logits = run_standalone(standalone, ['0.jax_export', '1.jax_export'], pixels)
  offset, scale = pipeline.normalization(helpers.tiny_config().data)
  images = (pixels.astype(np.float32) - offset) * scale
  # The zoo model against the bit-packed export's reference inference (XNOR-popcount).
  sources.export_workdir(str(zoo), str(zoo_out))
  reference = np.asarray(inference.load(str(zoo_out))(images))
  assert zoo_logits.shape == (7, 4)
  np.testing.assert_allclose(zoo_logits, reference, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(zoo_logits.argmax(-1), reference.argmax(-1))
  # The user model, which the bit-packed export cannot walk, against its fully binary eval.
  run = evaluate.load_run(str(own), model=helpers.VGG())
  np.testing.assert_allclose(own_logits, fully_binary_logits(run, images), rtol=1e-4, atol=1e-4)


def test_the_artefact_takes_any_batch_size_and_lists_its_platforms(runs, tmp_path):
  path = portable.export_run(str(runs[0]), str(tmp_path))
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  assert exported.platforms == portable.PLATFORMS
  assert str(exported.in_avals[0].shape[0]) == 'batch' and exported.in_avals[0].dtype == np.uint8
  for batch in (1, 3):
    assert exported.call(np.zeros((batch, 16, 16, 3), np.uint8)).shape == (batch, 4)


def test_the_command_writes_both_exports_and_refuses_a_missing_run(runs, tmp_path):
  def export(workdir, out):
    return subprocess.run([sys.executable, '-m', 'stompp_jax.export', f'--workdir={workdir}',
                           f'--out={out}'], cwd=helpers.REPO, capture_output=True, text=True,
                          timeout=600)

  out = export(runs[0], tmp_path / 'zoo')
  assert out.returncode == 0, out.stderr
  assert sorted(os.listdir(tmp_path / 'zoo')) == ['manifest.json', 'model.jax_export',
                                                  'tensors.npz']
  assert f'wrote {tmp_path / "zoo" / portable.FILE}' in out.stdout
  missing = export(tmp_path / 'nothing', tmp_path / 'none')
  assert missing.returncode == 2 and missing.stderr.startswith('Error: '), missing
  assert not (tmp_path / 'none').exists()


def test_an_unfinished_run_is_exported_only_with_allow_unfinished(tiny_run, tmp_path):
  preempted = tmp_path / 'preempted'  # Killed after its checkpoint at step 6 of 12.
  shutil.copytree(tiny_run, preempted)
  (preempted / 'done.json').unlink()
  shutil.rmtree(preempted / 'checkpoints' / '12')
  out = tmp_path / 'out'

  def export(*flags):
    return subprocess.run([sys.executable, '-m', 'stompp_jax.export', f'--workdir={preempted}',
                           f'--out={out}', *flags], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=600)

  refused = export()
  assert refused.returncode == 2, refused
  assert refused.stderr == (f'Error: {preempted} is unfinished (no done.json; newest checkpoint'
                            ' at step 6): rerun its training command to finish it, or pass'
                            ' --allow_unfinished to export step 6.\n'), refused
  assert not out.exists()
  exported = export('--allow_unfinished')
  assert exported.returncode == 0, exported.stderr
  assert sorted(os.listdir(out)) == ['manifest.json', 'model.jax_export', 'tensors.npz']
  assert inference.load(str(out)).manifest['source']['step'] == 6


def test_a_failed_rewrite_keeps_the_previous_artefact(runs, tmp_path, monkeypatch):
  (tmp_path / portable.FILE).write_bytes(b'the previous export')

  def serialize():
    raise RuntimeError('killed while writing')

  monkeypatch.setattr(portable, 'export_inference',
                      lambda *args: types.SimpleNamespace(serialize=serialize))
  with pytest.raises(RuntimeError, match='killed while writing'):
    portable.export_run(str(runs[0]), str(tmp_path))
  assert (tmp_path / portable.FILE).read_bytes() == b'the previous export'


def test_both_exports_fold_the_same_statistics_re_estimated_once(runs, tmp_path, monkeypatch):
  """`--recalibrate_bn_batches`: the artefact computes what the bit-packed export computes,
  from one re-estimation (the command's `export_run`)."""
  zoo = str(runs[0])
  estimations = []
  estimate = recalibrate.recalibrate_variables
  monkeypatch.setattr(recalibrate, 'recalibrate_variables',
                      lambda *args: estimations.append(args[-1]) or estimate(*args))
  export_cli.export_run(zoo, str(tmp_path), recalibrate_bn_batches=2, allow_unfinished=False)
  assert estimations == [2]
  pixels = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  offset, scale = pipeline.normalization(helpers.tiny_config().data)
  packed = np.asarray(inference.load(str(tmp_path))((pixels.astype(np.float32) - offset) * scale))
  with open(tmp_path / portable.FILE, 'rb') as f:
    artefact = np.asarray(jax.export.deserialize(bytearray(f.read())).call(pixels))
  np.testing.assert_allclose(artefact, packed, rtol=1e-4, atol=1e-4)
  running = np.asarray(portable.exported_run(zoo).call(pixels))
  assert np.abs(running - packed).max() > 1e-3  # The statistics changed what it computes.
