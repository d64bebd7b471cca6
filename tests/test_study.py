"""A tiny-budget run of benchmarks/study.py (tiny ResNet, synthetic data) and its plan."""

import json
import os

from benchmarks import study


def test_plan_is_seed_major_with_ablations_on_the_first_model():
  runs = study.plan_runs(['resnet20', 'resnet56'], seeds=2, ablation_seeds=1,
                         groups=['main', 'order', 'bwn'])
  names = [r['name'] for r in runs]
  assert len(names) == len(set(names)) == 2 * 2 * 3 + 2 + 2
  assert all(r['seed'] == 0 for r in runs[:10]) and all(r['seed'] == 1 for r in runs[10:])
  assert 'resnet20_bnn_stompp_reverse_s0' in names and 'resnet20_bnn_stompp_global_s0' in names
  assert 'resnet20_bwn_ste_layerwise_s0' in names and 'resnet56_bwn_ste_layerwise_s0' not in names
  assert 'resnet56_bnn_stompp_ste_layerwise_s1' in names


def test_dry_run_prints_the_plan(tmp_path, capsys):
  assert study.main([f'--out={tmp_path}', '--models=resnet20', '--seeds=1', '--groups=order',
                     '--steps=100', '--dry_run']) == 0
  out = capsys.readouterr().out
  assert 'resnet20_bnn_stompp_global_s0' in out and 'steps=100' in out
  assert not os.listdir(tmp_path)


def test_tiny_study_writes_table_and_plots_and_skips_finished_runs(tmp_path, capsys):
  args = [f'--out={tmp_path}', '--models=tiny_resnet', '--seeds=1', '--groups=main',
          '--steps=4', '--evals=2', '--batch=16', '--eval_batch=16', '--data=synthetic',
          '--compile_cache=']
  assert study.main(args) == 0
  names = [f'tiny_resnet_bnn_{m}_layerwise_s0' for m in study.MAIN_METHODS]
  table = (tmp_path / 'results.md').read_text()
  for name in names:
    assert os.path.exists(tmp_path / name / 'done.json')
    assert f'| {name} |' in table
  rows = json.loads((tmp_path / 'results.json').read_text())
  assert {r['name'] for r in rows} == set(names)
  assert all(r['done'] and r['step'] == 4 and r['fully_binary_accuracy'] is not None for r in rows)
  assert '| tiny_resnet | bnn | stompp | layerwise | 1 |' in table
  plots = sorted(os.listdir(tmp_path / 'plots'))
  assert plots == ['accuracy_vs_depth.png', 'curves_tiny_resnet_bnn.png',
                   'frozen_tiny_resnet_bnn_stompp_layerwise_s0.png',
                   'frozen_tiny_resnet_bnn_stompp_ste_layerwise_s0.png']
  capsys.readouterr()
  assert study.main(args) == 0  # Everything is finished: skipped, only the table is rewritten.
  assert capsys.readouterr().out.count('done, skipped') == 3
