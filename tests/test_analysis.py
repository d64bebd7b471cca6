"""Tests of stompp_jax.analysis on hand-written run directories (no training)."""

import json
import os
import re

import numpy as np
import pytest

from stompp_jax import analysis
from stompp_jax import errors
from stompp_jax import models


def write_run(root, name, *, model='resnet20', mode='bnn', method='stompp', order='layerwise',
              seed=0, num_sites=3, accuracies=(0.3, 0.5), done=True):
  """A run directory like train_and_evaluate's: config.json, metrics.jsonl, done.json."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  config = {'seed': seed, 'model': {'name': model, 'mode': mode},
            'binary': {'method': method, 'order': order},
            'train': {'num_steps': 8, 'batch_size': 4}}
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f)
  rows = []
  for step in range(1, 9):
    # Site i starts freezing at step 2 + 2 i (STE: always frozen; fp: no sites).
    fractions = [1.0 if method == 'ste' else float(np.clip((step - 1 - 2 * i) / 2, 0, 1))
                 for i in range(num_sites)]
    row = {'step': step, 'split': 'train', 'loss': 2.0 - 0.1 * step, 'accuracy': 0.1 * step,
           'learning_rate': 0.1, 'images_per_second': 10.0, 'eta_seconds': 1.0}
    if mode != 'fp':
      row['frozen_fraction'] = fractions
    rows.append(row)
  for step, accuracy in zip((4, 8), accuracies):
    row = {'step': step, 'split': 'eval', 'eval_loss': 1.0, 'eval_accuracy': accuracy + 0.01}
    if mode != 'fp':
      row.update(eval_fully_binary_loss=1.0, eval_fully_binary_accuracy=accuracy)
    rows.append(row)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  if done:
    with open(os.path.join(workdir, 'done.json'), 'w', encoding='utf-8') as f:
      json.dump({'step': 8}, f)
  return workdir


def test_load_run_and_derived_values(tmp_path):
  run = analysis.load_run(write_run(tmp_path, 'r20_stompp'))
  assert run['name'] == 'r20_stompp' and run['done'] == {'step': 8}
  assert len(analysis.split_rows(run, 'train')) == 8
  assert [r['step'] for r in analysis.split_rows(run, 'eval')] == [4, 8]
  steps, fractions = analysis.frozen_fractions(run)
  assert fractions.shape == (8, 3) and steps[0] == 1
  assert analysis.freeze_starts(run) == [2, 4, 6]
  assert analysis.final_accuracy(run) == pytest.approx(0.5)
  assert analysis.depth_of(run) == 20
  assert analysis.method_of(run) == 'bnn stompp'


def test_a_last_line_cut_short_by_a_kill_is_skipped(tmp_path):
  workdir = write_run(tmp_path, 'killed', done=False)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('{"step": 9, "split": "train", "lo')
  run = analysis.load_run(workdir)
  assert [r['step'] for r in analysis.split_rows(run, 'train')] == list(range(1, 9))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('ss": 1.0}')  # Complete JSON, still without its newline.
  assert analysis.split_rows(analysis.load_run(workdir), 'train')[-1] == {
      'step': 9, 'split': 'train', 'loss': 1.0}


def test_fp_run_and_the_depth_of_models_without_one_in_their_name(tmp_path):
  fp = analysis.load_run(write_run(tmp_path, 'fp', mode='fp', method='fp', accuracies=(0.4, 0.6)))
  assert analysis.final_accuracy(fp) == pytest.approx(0.61)  # eval_accuracy: no binary eval.
  assert analysis.freeze_starts(fp) == []
  tiny = analysis.load_run(write_run(tmp_path, 'tiny', model='tiny_resnet', num_sites=4))
  assert analysis.depth_of(tiny) == 6  # Stem, two blocks of two convs, classifier.
  mobilenet = analysis.load_run(write_run(tmp_path, 'mobilenet', model='mobilenet_v2'))
  assert analysis.depth_of(mobilenet) is None  # Not 2: no ResNet depth.
  reverse = analysis.load_run(write_run(tmp_path, 'rev', order='reverse'))
  assert analysis.method_of(reverse) == 'bnn stompp reverse'


def test_every_resnet_of_the_zoo_has_a_depth():
  assert set(analysis.RESNET_DEPTHS) == set(models.MODEL_NAMES) - {'mobilenet_v2'}


def test_accuracy_by_depth_groups_seeds(tmp_path):
  runs = [analysis.load_run(write_run(tmp_path, f'{m}_{d}_{s}', model=f'resnet{d}', method=m,
                                      seed=s, accuracies=(0.1, 0.2 + 0.1 * s)))
          for m in ('ste', 'stompp') for d in (20, 32) for s in (0, 1)]
  table = analysis.accuracy_by_depth(runs)
  assert set(table) == {'bnn ste', 'bnn stompp'}
  assert table['bnn ste'][32] == pytest.approx([0.2, 0.3])


def test_main_writes_pngs(tmp_path):
  dirs = [write_run(tmp_path / 'runs', 'ste', method='ste'),
          write_run(tmp_path / 'runs', 'stompp', method='stompp'),
          write_run(tmp_path / 'runs', 'stompp_ste', method='stompp_ste', done=False),
          write_run(tmp_path / 'runs', 'r32', model='resnet32', method='stompp')]
  out = tmp_path / 'plots'
  analysis.main([*dirs, f'--out={out}'])
  names = sorted(os.listdir(out))
  assert names == ['accuracy_vs_depth.png', 'curves.png', 'frozen_r32.png', 'frozen_stompp.png',
                   'frozen_stompp_ste.png']
  for name in names:
    with open(out / name, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('case', ['missing', 'no metrics'])
def test_a_directory_without_metrics_is_refused_before_any_plot(tmp_path, case):
  good = write_run(tmp_path / 'runs', 'stompp')
  bad = tmp_path / 'runs' / 'bad'
  if case == 'no metrics':
    bad.mkdir()
  out = tmp_path / 'plots'
  message = 'does not exist' if case == 'missing' else 'holds no metrics'
  with pytest.raises(errors.SetupError, match=re.escape(f'Run directory {bad} {message}')):
    analysis.write_plots([good, str(bad)], str(out))
  assert not out.exists()
