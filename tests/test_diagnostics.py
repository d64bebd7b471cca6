"""train.diagnostics and what a run logs to TensorBoard, through train_and_evaluate.

One tiny StoMPP run with diagnostics on; its metrics.jsonl and TensorBoard event files are read
back (the event records parsed with tensorboardX's protos, no TensorBoard needed).
"""

import json

import numpy as np
import pytest
from tensorboardX.proto import api_pb2
from tensorboardX.proto import plugin_hparams_pb2

from stompp_jax import train

from helpers import read_events, rows, tiny_config  # pylint: disable=g-bad-import-order


@pytest.fixture(scope='module')
def diagnostics_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('diagnostics')
  config = tiny_config('stompp', diagnostics=True)  # 12 steps, logged every 3, evaluated every 6.
  train.train_and_evaluate(config, str(workdir))
  return workdir


def test_diagnostics_are_per_site_values_in_range(diagnostics_run):
  train_rows = rows(diagnostics_run, 'train')
  assert [r['step'] for r in train_rows] == [3, 6, 9, 12]
  num_sites = len(train_rows[0]['frozen_fraction'])
  values = {k: np.array([r[k] for r in train_rows])
            for k in ('sign_flip_ratio', 'in_clip_fraction', 'grad_norm', 'frozen_fraction')}
  for name, array in values.items():
    assert array.shape == (4, num_sites), name
  for name in ('sign_flip_ratio', 'in_clip_fraction'):
    assert np.all((values[name] >= 0) & (values[name] <= 1)), (name, values[name])
  assert np.all(values['grad_norm'] >= 0)
  # Step 3: nothing is fully frozen yet, so kernels get gradients and an update flips signs.
  assert np.all(values['frozen_fraction'][0] < 1)
  assert np.all(values['grad_norm'][0] > 0)
  assert values['sign_flip_ratio'][0].max() > 0
  # Step 12: every site is fully frozen; STE-free StoMPP passes no gradient through a frozen
  # kernel and zeroes its update, so no sign flips.
  np.testing.assert_array_equal(values['frozen_fraction'][-1], 1.0)
  np.testing.assert_array_equal(values['grad_norm'][-1], 0.0)
  np.testing.assert_array_equal(values['sign_flip_ratio'][-1], 0.0)
  # The latent kernels start well inside [-1, 1] and StoMPP moves them little in 12 steps.
  assert values['in_clip_fraction'].min() > 0.5


def test_tensorboard_tags_have_no_stutter_and_sites_are_one_histogram(diagnostics_run):
  events = read_events(diagnostics_run / 'tensorboard')
  scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
             if v.WhichOneof('value') == 'simple_value'}
  histograms = {(v.tag, e.step): v.histo for e in events for v in e.summary.value
                if v.WhichOneof('value') == 'histo'}
  tags = {tag for tag, _ in scalars}
  assert {'train/loss', 'train/accuracy', 'train/learning_rate', 'eval/accuracy', 'eval/loss',
          'eval/fully_binary/accuracy', 'eval/fully_binary/loss'} <= tags
  assert not any('eval_' in tag or 'site_' in tag for tag in tags), sorted(tags)
  eval_rows = rows(diagnostics_run, 'eval')
  for row in eval_rows:
    assert scalars['eval/accuracy', row['step']] == pytest.approx(row['eval_accuracy'])
    assert scalars['eval/fully_binary/accuracy', row['step']] == pytest.approx(
        row['eval_fully_binary_accuracy'])
  per_site = ('frozen_fraction', 'sign_flip_ratio', 'in_clip_fraction', 'grad_norm')
  assert {tag for tag, _ in histograms} == {f'train/{name}' for name in per_site}
  for row in rows(diagnostics_run, 'train'):
    for name in per_site:
      histo = histograms[f'train/{name}', row['step']]
      np.testing.assert_allclose(list(histo.bucket), row[name], rtol=1e-6)
      np.testing.assert_allclose(list(histo.bucket_limit), np.arange(len(row[name])) + 0.5)


def test_tensorboard_has_the_config_as_text_and_hparams(diagnostics_run):
  config = json.loads((diagnostics_run / 'config.json').read_text())
  values = [v for e in read_events(diagnostics_run / 'tensorboard') for v in e.summary.value]
  text = [v for v in values if v.tag.startswith('config')]
  assert len(text) == 1
  shown = json.loads(text[0].tensor.string_val[0].decode())
  assert shown == config
  by_tag = {v.tag: v.metadata.plugin_data for v in values}
  start = plugin_hparams_pb2.HParamsPluginData.FromString(
      by_tag['_hparams_/session_start_info'].content).session_start_info
  assert start.hparams['binary.method'].string_value == 'stompp'
  assert start.hparams['train.batch_size'].number_value == config['train']['batch_size']
  assert start.hparams['train.diagnostics'].bool_value is True
  experiment = plugin_hparams_pb2.HParamsPluginData.FromString(
      by_tag['_hparams_/experiment'].content).experiment
  assert [m.name.tag for m in experiment.metric_infos] == [
      'eval/accuracy', 'eval/fully_binary/accuracy']
  assert isinstance(experiment, api_pb2.Experiment)
