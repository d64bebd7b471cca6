"""benchmarks/study.py: its plan and budget, the pre-registered rules on constructed results
(expected values worked out by hand from docs/study.md), and a tiny run (tiny ResNet, synthetic
data) that is stopped by SIGTERM, resumed, summarized and analyzed."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import study

from helpers import REPO, compile_cache  # pylint: disable=g-bad-import-order

SITES = {'resnet20': 18, 'resnet56': 54}


def args_of(*flags):
  return study.parse_args(list(flags))


def test_the_plan_is_every_cell_seed_major_in_the_readings_order():
  default = study.plan_runs(args_of())  # Both readings, `real` first (the plan's amendment).
  assert [r['reading'] for r in default[:16]] == ['real'] * 8 + ['binarized'] * 8
  runs = study.plan_runs(args_of('--readings=binarized,real'))
  names = [r['name'] for r in runs]
  assert len(names) == len(set(names)) == 8 * 2 * 3  # 8 cells x 2 readings x 3 seeds.
  assert [r['seed'] for r in runs] == sorted(r['seed'] for r in runs)
  first_seed = runs[:16]
  assert [r['reading'] for r in first_seed] == ['binarized'] * 8 + ['real'] * 8
  assert names[:8] == [
      'resnet56_binarized_stompp_layerwise_s0', 'resnet56_binarized_ste_layerwise_s0',
      'resnet20_binarized_stompp_layerwise_s0', 'resnet20_binarized_ste_layerwise_s0',
      'resnet56_binarized_stompp_reverse_s0', 'resnet56_binarized_floor_layerwise_s0',
      'resnet20_binarized_floor_layerwise_s0', 'resnet20_binarized_stompp_layerwise_w_s0']
  cut = study.plan_runs(args_of('--readings=binarized', '--groups=core,reverse,floor'))
  assert len(cut) == 7 * 3 and {r['reading'] for r in cut} == {'binarized'}


def test_equal_epochs_give_the_window_steps_of_each_depth():
  args = args_of()  # 10 epochs of 50,000 images at batch 128, span 0.8.
  run = lambda model, group='core', method='stompp': dict(
      name='x', group=group, model=model, reading='binarized', method=method, order='layerwise',
      seed=1)
  assert study.budget(run('resnet20'), SITES, args) == study.Budget(3900, 173)  # 0.8*3900/18
  assert study.budget(run('resnet56'), SITES, args) == study.Budget(3900, 57)  # 0.8*3900/54
  assert study.budget(run('resnet20', 'window'), SITES, args) == study.Budget(3900, 57)
  assert study.budget(run('resnet56', 'floor', 'floor'), SITES, args) == study.Budget(3900, 0)
  config = study.make_config(run('resnet56', 'floor', 'floor'), SITES, args)
  assert (config.binary.method, config.binary.span_end, config.binary.window_steps,
          config.model.bnn_shortcut, config.train.num_steps, config.seed) == (
              'stompp', 0.0, 0, 'binarized', 3900, 1)
  config = study.make_config(run('resnet20', 'window'), SITES, args)
  assert (config.binary.window_steps, config.data.source, config.train.batch_size,
          config.train.recalibrate_bn_batches, config.model.mode) == (57, 'npz', 128, 20, 'bnn')


def test_one_sided_bounds_are_students_t():
  # [0.01, 0.02, 0.03]: mean 0.02, sd 0.01, t(0.95, 2) = 2.920: 0.02 -+ 2.920 x 0.01 / sqrt(3).
  e = study.one_sample([0.01, 0.02, 0.03])
  assert e.n == 3 and e.mean == pytest.approx(0.02)
  assert (e.lower, e.upper) == (pytest.approx(0.003142, abs=1e-6), pytest.approx(0.036858, abs=1e-6))
  # Welch: variances 1e-4/3 each, se 0.008165, df = 4: t 2.132.
  w = study.welch([0.05, 0.06, 0.07], [0.01, 0.02, 0.03])
  assert w.mean == pytest.approx(0.04) and w.lower == pytest.approx(0.04 - 2.132 * 0.0081650, abs=1e-6)
  assert study.one_sample([0.5]) is None and study.t95(45.7) == study.T95[20]


def summary(model, reading, method, seed, accuracy, order='layerwise', group=None, loss=1.2,
            as_trained=None):
  group = group or ('floor' if method == 'floor' else 'core' if order == 'layerwise' else 'reverse')
  run = dict(group=group, model=model, reading=reading, method=method, order=order, seed=seed)
  return dict(name=study.run_name(run), **run, sites=SITES[model], window_steps=57, steps=3900,
              batch=128, data='npz', recalibrated=accuracy,
              as_trained=accuracy if as_trained is None else as_trained,
              final_train_loss=loss, wall_seconds=10.0, curves={'train': [], 'eval': []},
              machine='Linux-6.1-x86_64, Some CPU @ 2.80GHz, 2 cores')


def results(gains20, gains56, reverse=(0.30, 0.31, 0.29), reading='binarized', loss=1.2):
  """Summaries of three seeds: floors 0.20, layerwise 0.50 at both depths, STE below it by
  the given gains, and ResNet-56 reverse."""
  rows = []
  for seed in range(3):
    for model, gains in (('resnet20', gains20), ('resnet56', gains56)):
      rows += [summary(model, reading, 'floor', seed, 0.20),
               summary(model, reading, 'stompp', seed, 0.50, loss=loss),
               summary(model, reading, 'ste', seed, 0.50 - gains[seed])]
    rows.append(summary('resnet56', reading, 'stompp', seed, reverse[seed], 'reverse'))
  return rows


def verdict(rows, decision, reading='binarized'):
  return study.decide(rows, args_of('--readings=binarized,real'), decision, reading).verdict


def test_depth_grows_does_not_or_cannot_tell():
  # Growth 6 points, tight: lower bound > 0 and >= 3 points.
  assert verdict(results((0.02, 0.03, 0.04), (0.08, 0.09, 0.10)), 'depth') == 'grows'
  # Growth 0, tight: upper bound < 3 points.
  assert verdict(results((0.02, 0.03, 0.04), (0.02, 0.03, 0.04)), 'depth') == 'does not grow'
  # Growth 4 points but seeds spread over 12 points: neither bound decides.
  assert verdict(results((0.02, 0.03, 0.04), (0.01, 0.07, 0.13)), 'depth') == 'cannot tell'
  # Growth 2 points, tight (lower bound > 0 but under 3 points; upper bound above 3): cannot tell.
  assert verdict(results((0.02, 0.03, 0.04), (0.03, 0.05, 0.07)), 'depth') == 'cannot tell'
  assert verdict(results((0.02, 0.03, 0.04), (0.08, 0.09, 0.10)), 'depth', 'real') == 'not run'


def test_reverse_collapses_does_not_or_cannot_tell():
  gains = (0.02, 0.03, 0.04)
  # r = (0.30 - 0.20) / (0.50 - 0.20) = 1/3 on average; 0.25 -> r = 1/6.
  assert verdict(results(gains, gains, (0.25, 0.24, 0.26)), 'reverse') == 'collapses'
  assert verdict(results(gains, gains, (0.45, 0.44, 0.46)), 'reverse') == 'does not collapse'
  assert verdict(results(gains, gains, (0.30, 0.31, 0.29)), 'reverse') == 'cannot tell'


def test_a_gate_that_fails_on_complete_cells_decides_undertrained_before_the_other_runs():
  rows = [r for r in results((0.02, 0.03, 0.04), (0.08, 0.09, 0.10), loss=1.7)
          if r['model'] == 'resnet20']  # No ResNet-56 run yet.
  assert verdict(rows, 'depth') == 'undertrained'
  assert 'train loss 1.700 (gate <= 1.6)' in study.decide(rows, args_of(), 'depth',
                                                           'binarized').gates[0]
  assert verdict([r for r in rows if r['seed'] < 2], 'depth') == 'not run'  # A seed may pass it.
  passing = [r for r in results((0.02, 0.03, 0.04), (0.08, 0.09, 0.10)) if r['model'] == 'resnet20']
  assert verdict(passing, 'depth') == 'not run'


def test_gates_and_the_check_metric_come_before_a_verdict():
  grows = ((0.02, 0.03, 0.04), (0.08, 0.09, 0.10))
  assert verdict(results(*grows, loss=1.7), 'depth') == 'undertrained'  # Train loss > 1.6.
  rows = results(*grows)
  for row in rows:
    if row['method'] == 'floor':
      row['recalibrated'] = 0.40  # Layerwise only 10 points above the floor.
  assert verdict(rows, 'depth') == 'undertrained' and verdict(rows, 'reverse') == 'undertrained'
  rows = results(*grows)
  for row in rows:
    if row['model'] == 'resnet56' and row['method'] == 'ste':
      row['as_trained'] = 0.495  # As trained, the growth vanishes: the two metrics disagree.
  assert verdict(rows, 'depth') == 'cannot tell'
  gate = study.decide(results(*grows), args_of(), 'depth', 'binarized').gates
  assert gate[0] == 'resnet20 layerwise - floor +30.00 points (gate >= 15), train loss 1.200 (gate <= 1.6)'


def test_extra_seeds_only_for_an_undecided_decision_once_its_seeds_are_in():
  args = args_of('--readings=binarized')
  # Depth cannot tell; reverse collapses (r about 1/6).
  undecided = results((0.02, 0.03, 0.04), (0.01, 0.07, 0.13), reverse=(0.25, 0.24, 0.26))
  extra = [r['name'] for r in study.plan_runs(args, undecided) if r['seed'] >= 3]
  assert len(extra) == 6 * 2  # The depth decision's six cells, seeds 3 and 4.
  assert 'resnet56_binarized_ste_layerwise_s4' in extra
  assert 'resnet56_binarized_stompp_reverse_s3' not in extra
  decided = results((0.02, 0.03, 0.04), (0.08, 0.09, 0.10), reverse=(0.45, 0.44, 0.46))
  assert all(r['seed'] < 3 for r in study.plan_runs(args, decided))
  missing = [r for r in undecided if r['name'] != 'resnet56_binarized_ste_layerwise_s2']
  assert all(r['seed'] < 3 for r in study.plan_runs(args, missing))  # Not all seeds in yet.


def test_the_results_lead_with_the_decisions(tmp_path):
  rows = results((0.02, 0.03, 0.04), (0.08, 0.09, 0.10), reverse=(0.25, 0.24, 0.26))
  text = study.results_markdown(rows, args_of('--readings=binarized', '--groups=core,reverse,floor'))
  assert text.startswith('**21 of 21 runs done**')
  assert 'Runs by machine (wall times compare only within one): 21 on Some CPU @ 2.80GHz, 2 cores.' in text
  lines = text.splitlines()
  depth = next(l for l in lines if l.startswith("| StoMPP's gain over STE grows with depth"))
  assert '| binarized | **grows** | +6.00 points (one-sided 95%: >' in depth
  assert any('reverse order collapses at resnet56' in l and '**collapses**' in l for l in lines)
  assert '| core | resnet20 | binarized | stompp | layerwise | 57 | 3900 | 3 | 50.00 ± 0.00 |' in text
  assert '- StoMPP - STE, resnet56, binarized: +9.00 points' in text


def _tiny(tmp_path, *extra):
  return [f'--out={tmp_path / "runs"}', f'--summaries={tmp_path / "summaries"}',
          '--models=tiny_resnet', '--data=synthetic', '--batch=16', '--eval_batch=16',
          '--recalibrate=2', '--evals=2', f'--compile_cache={compile_cache()}',
          '--readings=binarized', *extra]


def test_a_chunk_killed_without_its_sigterm_is_counted_as_lost(tmp_path):
  workdir = str(tmp_path / 'run')
  study.start_chunk(workdir)
  assert study.add_wall(workdir, 5.0) == {'seconds': 5.0, 'chunks': 1, 'lost_chunks': 0}
  study.start_chunk(workdir)  # Killed: no add_wall follows.
  study.start_chunk(workdir)
  assert study.add_wall(workdir, 2.0) == {'seconds': 7.0, 'chunks': 2, 'lost_chunks': 1}


def test_a_tiny_run_stops_on_sigterm_resumes_and_sums_its_wall_time(tmp_path):
  name = 'tiny_resnet_binarized_stompp_layerwise_s0'
  command = [sys.executable, 'benchmarks/study.py', *_tiny(tmp_path, '--epochs=40'),
             f'--only={name}']
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  checkpoints = tmp_path / 'runs' / name / 'checkpoints'  # The first: at step 64 of 640.
  deadline = time.time() + 600
  while not (checkpoints.exists() and os.listdir(checkpoints)) and time.time() < deadline:
    assert process.poll() is None, process.stdout.read()
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=600)
  assert process.returncode == study.EXIT_PREEMPTED, out
  assert 'stopped at step' in out and 'in 1 chunks' in out
  assert not (tmp_path / 'summaries' / f'{name}.json').exists()
  first = json.loads((tmp_path / 'runs' / name / 'study_wall.json').read_text())
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  row = json.loads((tmp_path / 'summaries' / f'{name}.json').read_text())
  assert row['chunks'] == 2 and row['wall_seconds'] > first['seconds']
  assert row['lost_chunks'] == 0
  assert row['steps'] == 40 * (256 // 16) and row['curves']['train'][-1]['step'] == row['steps']
  assert row['window_steps'] == math.floor(0.8 * row['steps'] / row['sites'])
  assert math.isfinite(row['final_train_loss']) and row['recalibrated'] is not None
  skipped = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert 'done, skipped' in skipped.stdout
  assert study.main(_tiny(tmp_path, '--analyze')) == 0
  text = (tmp_path / 'summaries' / 'results.md').read_text()
  assert text.startswith('**1 of ') and '| depth' not in text
  assert '| core | tiny_resnet | binarized | stompp | layerwise |' in text
  assert os.listdir(tmp_path / 'summaries' / 'plots') == ['curves.png']


@pytest.mark.parametrize('flags, message', [
    (['--groups=core,nope'], '--groups=core,nope: choose from'),
    (['--readings=both'], '--readings=both: choose from'),
    (['--epochs=0'], 'epochs > 0'),
    (['--models=a,b,c'], 'name one or two models'),
    (['--only=nothing', '--names'], '--only names'),
])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    study.main(flags)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('Error: ') and message in err and '\n' not in err


def test_a_doc_without_the_markers_is_a_one_line_error_and_is_left_alone(tmp_path, capsys):
  doc = tmp_path / 'results.md'
  doc.write_text('no markers\n')
  with pytest.raises(SystemExit) as exit_info:
    study.main([f'--summaries={tmp_path / "none"}', '--analyze', f'--doc={doc}'])
  assert exit_info.value.code == 2
  assert doc.read_text() == 'no markers\n' and os.listdir(tmp_path) == ['results.md']


def test_the_docs_block_is_the_committed_summaries():
  """docs/results.md shows what `study.py --analyze --doc=docs/results.md` writes from the
  committed summaries (rerun it after merging finished runs)."""
  args = args_of()
  head, tail = study.read_doc(os.path.join(REPO, 'docs', 'results.md'))
  text = open(os.path.join(REPO, 'docs', 'results.md'), encoding='utf-8').read()
  block = study.results_markdown(study.load_summaries(os.path.join(REPO, args.summaries)), args)
  assert text == head + block + tail
