"""End-to-end tests of train_and_evaluate on a tiny model and synthetic data."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from stompp_jax import errors
from stompp_jax import evaluate
from stompp_jax import experiment
from stompp_jax import parallel
from stompp_jax import train
from stompp_jax import workdir as workdir_lib

from helpers import REPO, rows, tiny_config  # pylint: disable=g-bad-import-order


@pytest.mark.parametrize('method', ['fp', 'ste', 'stompp', 'stompp_ste'])
def test_every_method_trains_and_logs(tmp_path, method, request):
  if method == 'stompp':  # The session's run of this config (conftest.py).
    workdir = request.getfixturevalue('tiny_run')
    final = json.loads((workdir / 'done.json').read_text())
  else:
    workdir = tmp_path
    final = train.train_and_evaluate(tiny_config(method), str(workdir))
  train_rows, eval_rows = rows(workdir, 'train'), rows(workdir, 'eval')
  assert [r['step'] for r in train_rows] == [3, 6, 9, 12]
  assert [r['step'] for r in eval_rows] == [6, 12]
  expected_train = {'loss', 'accuracy', 'nonfinite', 'learning_rate', 'images_per_second', 'eta_seconds'}
  expected_eval = {'eval_loss', 'eval_accuracy'}
  if method != 'fp':
    expected_train.add('frozen_fraction')
    expected_eval |= {'eval_fully_binary_loss', 'eval_fully_binary_accuracy'}
  assert expected_train <= set(train_rows[0])
  assert expected_eval <= set(eval_rows[0])
  assert train_rows[-1]['loss'] < train_rows[0]['loss'], [r['loss'] for r in train_rows]
  if method != 'fp':
    fractions = np.array([r['frozen_fraction'] for r in train_rows])
    assert fractions.shape[1] >= 2
    assert np.all(np.diff(fractions, axis=0) >= 0), 'frozen fractions must not decrease'
    # Step 11 is past span_end * 12 steps: every site is fully frozen (STE: always).
    np.testing.assert_array_equal(fractions[-1], 1.0)
  done = json.loads((workdir / 'done.json').read_text())
  assert done['step'] == 12 and final['step'] == 12
  assert json.loads((workdir / 'config.json').read_text())['binary']['method'] == method
  assert os.listdir(workdir / 'tensorboard')


def test_eight_devices_match_one_device(tmp_path, tiny_run):
  """The session's run (8 devices) and the same config on one device (a count of its own: the
  point of the test) log the same losses."""
  config = tiny_config('stompp')
  config.mesh.num_devices = 1
  train.train_and_evaluate(config, str(tmp_path))
  losses = [r['loss'] for r in rows(tmp_path, 'train')]
  assert len(losses) == 4
  np.testing.assert_allclose(losses, [r['loss'] for r in rows(tiny_run, 'train')], rtol=2e-4)


def test_sharded_params_train_like_replicated_ones(tmp_path, monkeypatch, tiny_run):
  """mesh.shard_params=True on the 8 devices. tiny_resnet's kernels are all under the size from
  which parameters are split (parallel.MIN_SHARDED_SIZE), so the test lowers it: then kernels,
  their momenta and the checkpoints are sharded, and the losses follow the session's replicated
  run of the same config."""
  monkeypatch.setattr(parallel, 'MIN_SHARDED_SIZE', 256)
  config = tiny_config('stompp')
  config.mesh.shard_params = True
  exp = experiment.build(config)
  specs = [s.spec for s in jax.tree.leaves(exp.state_shardings.params)]
  assert sum('data' in spec for spec in specs) >= 4, specs
  assert train.train_and_evaluate(config, str(tmp_path))['step'] == 12
  losses = [r['loss'] for r in rows(tmp_path, 'train')]
  assert len(losses) == 4
  np.testing.assert_allclose(losses, [r['loss'] for r in rows(tiny_run, 'train')], rtol=1e-5)


def test_resume_continues_at_saved_step(tmp_path, monkeypatch, tiny_run):
  config = tiny_config('stompp')
  reference = json.loads((tiny_run / 'done.json').read_text())

  calls = []
  original = train._Preemption.reached

  def preempt_at_step_5(self, step):
    calls.append(step)
    return step == 5 or original(self, step)

  monkeypatch.setattr(train._Preemption, 'reached', preempt_at_step_5)
  first = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert first['preempted'] and first['step'] == 5
  assert not (tmp_path / 'resumed' / 'done.json').exists()
  calls.clear()
  second = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert calls[0] == 6, 'the resumed run must start after the saved step 5'
  assert second['step'] == 12 and not second['preempted']
  resumed_rows = rows(tmp_path / 'resumed', 'train')
  assert [r['step'] for r in resumed_rows] == [3, 6, 9, 12]
  reference_rows = rows(tiny_run, 'train')
  # Masks, data order and optimizer state continue exactly: the same losses after the resume.
  np.testing.assert_allclose([r['loss'] for r in resumed_rows[2:]],
                             [r['loss'] for r in reference_rows[2:]], rtol=1e-6)
  assert second['eval_fully_binary_accuracy'] == reference['eval_fully_binary_accuracy']


@pytest.mark.parametrize('eval_logged', [True, False])
def test_a_run_stopped_before_done_json_finishes_with_its_final_eval(tmp_path, tiny_run,
                                                                     eval_logged):
  """Killed between the last checkpoint and done.json: the rerun writes done.json with the
  final eval, the logged row when there is one (no second row), else a new evaluation."""
  shutil.copytree(tiny_run, tmp_path / 'run')
  reference = json.loads((tiny_run / 'done.json').read_text())
  (tmp_path / 'run' / 'done.json').unlink()
  if not eval_logged:
    metrics = tmp_path / 'run' / 'metrics.jsonl'
    metrics.write_text(''.join(line + '\n' for line in metrics.read_text().splitlines()
                               if not ('"split": "eval"' in line and '"step": 12,' in line)))
  final = train.train_and_evaluate(tiny_config('stompp'), str(tmp_path / 'run'))
  assert final == reference
  assert json.loads((tmp_path / 'run' / 'done.json').read_text()) == reference
  assert [r['step'] for r in rows(tmp_path / 'run', 'eval')] == [
      r['step'] for r in rows(tiny_run, 'eval')]


def test_a_run_made_before_a_field_existed_is_read_with_the_value_it_used(tmp_path, tiny_run):
  """config.json of a run made before binary.window_steps, model.bnn_shortcut and the binary
  package's cost switches existed: every reader sees the values that run used (0, 'real', 'cond',
  'auto', 'full'; workdir.upgrade_config), so the same command resumes it, and a run asking for
  the other shortcut is refused. The cost switches may differ on resume (they change how, not
  what, a step computes)."""
  workdir = shutil.copytree(tiny_run, tmp_path / 'run')
  old = json.loads((workdir / 'config.json').read_text())
  del old['binary']['window_steps'], old['model']['bnn_shortcut']
  for field in ('masks_by', 'residuals', 'committed_backward'):
    del old['binary'][field]
  (workdir / 'config.json').write_text(json.dumps(old))
  read = workdir_lib.read_config(str(workdir))
  assert (read['binary']['window_steps'], read['model']['bnn_shortcut']) == (0, 'real')
  assert [read['binary'][f] for f in ('masks_by', 'residuals', 'committed_backward')] == [
      'cond', 'auto', 'full']
  workdir_lib.check_same_run(str(workdir), tiny_config())  # The same run: accepted.
  switched = tiny_config()
  switched.binary.update(masks_by='select', residuals='bool', committed_backward='skip')
  workdir_lib.check_same_run(str(workdir), switched)
  other = tiny_config()
  other.model.bnn_shortcut = 'binarized'
  with pytest.raises(errors.SetupError, match=r"model.bnn_shortcut \('real' -> 'binarized'\)"):
    workdir_lib.check_same_run(str(workdir), other)
  assert evaluate.load_run(str(workdir)).config.model.bnn_shortcut == 'real'


@pytest.mark.slow
def test_cli_trains_imagenet_r50_on_synthetic_data(tmp_path):
  """The README's ImageNet smoke command (ResNet-50, ImageNet stem, synthetic data) through the
  real command line, on 64x64 images instead of 224x224. Its 16 bottleneck blocks have 3 binary
  convs each under the default rules (stem, shortcut projections and classifier stay float):
  48 sites, each with a frozen fraction in the logged rows."""
  command = [
      sys.executable, '-m', 'stompp_jax.main', '--config=configs/imagenet_r50.py:smoke',
      f'--workdir={tmp_path}', '--config.data.synthetic_image_shape=(64, 64, 3)',
      '--config.model.stem=imagenet']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'step 2/2' in result.stderr
  assert json.loads((tmp_path / 'done.json').read_text())['step'] == 2
  train_rows = rows(tmp_path, 'train')
  assert [r['step'] for r in train_rows] == [1, 2]
  assert all(len(r['frozen_fraction']) == 48 for r in train_rows)
  assert all(np.isfinite(r['loss']) for r in train_rows)
