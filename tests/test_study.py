"""benchmarks/study.py: its plan, its verdicts, and a tiny-budget run (tiny ResNet, synthetic data)."""

import json
import os

import pytest

from benchmarks import study

from helpers import REPO  # pylint: disable=g-bad-import-order


def plan(*flags):
  return study.plan_runs(study.parse_args(list(flags)))


def test_default_plan_covers_the_cells_seed_major():
  runs = plan()
  names = [r['name'] for r in runs]
  assert len(names) == len(set(names))
  cells = {(r['group'], r['model'], r['bnn_shortcut'], r['method'], r['order']) for r in runs}
  # main: resnet20 x 3 methods, resnet56 x ste/stompp, both readings; order: 2 orders x 2
  # readings; floor: 2 models x 2 readings; bwn: layerwise and reverse.
  assert len(cells) == 2 * 3 + 2 * 2 + 4 + 4 + 2
  assert len(names) == 3 * (6 + 4 + 4 + 4 + 2)
  assert [r['seed'] for r in runs] == sorted(r['seed'] for r in runs)
  assert 'resnet56_bnn_binarized_stompp_ste_layerwise_s0' not in names  # Cut: --deep_methods.
  assert 'resnet20_bnn_binarized_stompp_reverse_s1' in names
  assert 'resnet56_bnn_real_floor_layerwise_s0' in names
  assert 'resnet56_bnn_real_floor_layerwise_s1' in names
  assert {r['bnn_shortcut'] for r in runs if r['mode'] == 'bwn'} == {'real'}
  assert 'resnet20_bnn_real_ste_layerwise_s2' in names and 'resnet20_bnn_real_ste_layerwise_s3' not in names
  assert len(plan('--seeds=resnet20:3,resnet56:2')) == len(runs) - 4


def test_steps_scale_with_the_sites_and_the_floor_freezes_at_step_0():
  args = study.parse_args(['--steps_per_site=10', '--tail=0.2'])
  assert study.total_steps(18, args) == 225 and study.total_steps(54, args) == 675
  floor, main = (dict(name='x', group='g', model='resnet20', mode='bnn', bnn_shortcut='binarized',
                      method=m, order='layerwise', seed=1) for m in ('floor', 'stompp_ste'))
  config = study.make_config(floor, 18, args)
  assert (config.binary.method, config.binary.span_start, config.binary.span_end,
          config.binary.window_steps) == ('stompp', 0.0, 0.0, 0)
  config = study.make_config(main, 18, args)
  assert (config.binary.method, config.binary.window_steps, config.train.num_steps,
          config.model.bnn_shortcut, config.train.recalibrate_bn_batches, config.seed) == (
              'stompp_ste', 10, 225, 'binarized', 20, 1)


def test_plan_prints_the_estimate_and_writes_nothing(tmp_path, capsys):
  assert study.main([f'--summaries={tmp_path}', '--plan', '--groups=floor',
                     '--step_seconds=resnet20:1,resnet56:2']) == 0
  out = capsys.readouterr().out
  assert 'resnet56_bnn_binarized_floor_layerwise_s0 (floor): 405 steps x 64, 54 sites' in out
  assert '12 runs, 0 done, ~' in out and 'hours' in out and '(--step_seconds)' in out
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('flags, message', [
    (['--seeds=resnet20'], '--seeds'),
    (['--groups=main,nope'], 'unknown --groups'),
    (['--methods=sgd'], 'unknown methods'),
    (['--only=nothing', '--names'], '--only names'),
])
def test_bad_flags_are_one_line_errors(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    study.main(flags)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('Error: ') and message in err and '\n' not in err


def summary(model, reading, method, seed, accuracy, order='layerwise', mode='bnn', sites=18):
  group = ('floor' if method == 'floor' else 'bwn' if mode == 'bwn'
           else 'main' if order == 'layerwise' else 'order')
  run = dict(group=group, model=model, mode=mode, bnn_shortcut=reading, method=method,
             order=order, seed=seed)
  return dict(name=study.run_name(run), **run, sites=sites, steps_per_site=10, steps=225,
              batch=64, as_trained=accuracy, recalibrated=accuracy + 0.01, wall_seconds=1.0)


def test_verdicts_follow_the_seeds():
  rows = []
  for seed, (ste, stompp) in enumerate([(0.30, 0.34), (0.31, 0.33)]):
    rows += [summary('resnet20', 'binarized', 'ste', seed, ste),
             summary('resnet20', 'binarized', 'stompp', seed, stompp),
             summary('resnet20', 'binarized', 'stompp', seed, 0.25 + seed * 0.1, 'reverse'),
             summary('resnet20', 'binarized', 'floor', seed, 0.22 + seed * 0.01),
             summary('resnet56', 'binarized', 'ste', seed, 0.20, sites=54),
             summary('resnet56', 'binarized', 'stompp', seed, 0.30, sites=54),
             summary('resnet20', 'real', 'stompp', seed, 0.40, 'layerwise', 'bwn'),
             summary('resnet20', 'real', 'stompp', seed, 0.405, 'reverse', 'bwn')]
  lines = '\n'.join(study.verdicts(rows, 'as_trained'))
  assert '- StoMPP beats STE, resnet20 [binarized]: **reproduces** (+3.00 points' in lines
  assert "gain over STE grows with depth, resnet20 -> resnet56 [binarized]: **reproduces**" in lines
  assert 'STE falls with depth, resnet20 -> resnet56 [binarized]: **reproduces**' in lines
  # Reverse: 0.25 vs 0.34 (seed 0), 0.35 vs 0.33 (seed 1): not in every seed.
  assert 'layerwise beats reverse, resnet20 [binarized]: **cannot tell' in lines
  # The floor (0.22, 0.23) is below reverse (0.25, 0.35) in every seed: no collapse.
  assert ('reverse collapses (the floor beats it), resnet20 [binarized]: **does not** (-7.50'
          in lines)
  assert 'StoMPP beats STE, resnet20 [real]' not in lines  # Not among the summaries' cells.
  planned = '\n'.join(study.verdicts(rows, 'as_trained', plan()))
  assert 'StoMPP beats STE, resnet20 [real]: **not run**' in planned
  assert 'StoMPP+STE beats StoMPP, resnet56' not in planned  # Cut by --deep_methods.
  assert 'BWN is order-insensitive (layerwise = reverse within 1 point), resnet20: **reproduces**' in lines
  table = study.results_markdown(rows)
  assert '| main | resnet20 | bnn | binarized | stompp | layerwise | 18 | 10 | 225 | 2 | 33.50 ± 0.71 | 34.50 ± 0.71 | 1 |' in table
  assert 'Verdicts, accuracies recalibrated' in table
  assert study.mean_spread([0.25]) == '25.00' and study.mean_spread([]) == '-'


def test_order_insensitivity_needs_every_seed_within_the_tolerance():
  seeds = lambda *values: dict(enumerate(values))
  # The mean (-0.6 points) is within 1 point, two seeds are not.
  assert study.insensitive(seeds(0.309, 0.259, 0.313), seeds(0.300, 0.300, 0.300),
                           0.01)[0] == 'cannot tell at this budget'
  assert study.insensitive(seeds(0.305, 0.296), seeds(0.300, 0.300), 0.01)[0] == 'reproduces'
  assert study.insensitive(seeds(0.28, 0.27), seeds(0.30, 0.30), 0.01) == (
      'does not', '-2.50 points (seeds: -2.00, -3.00)')
  assert study.insensitive(seeds(0.30), seeds(0.30), 0.01)[0] == 'cannot tell at this budget'


def test_tiny_study_writes_summaries_analysis_and_skips_finished_runs(tmp_path, capsys):
  summaries = tmp_path / 'summaries'
  args = [f'--out={tmp_path / "runs"}', f'--summaries={summaries}', '--models=tiny_resnet',
          '--seeds=tiny_resnet:1', '--floor_seeds=1', '--methods=ste,stompp', '--groups=main,floor',
          '--steps_per_site=1',
          '--batch=16', '--eval_batch=16', '--recalibrate=2', '--data=synthetic',
          '--compile_cache=']
  assert study.main(args) == 0
  names = [f'tiny_resnet_bnn_{r}_{m}_layerwise_s0' for r in study.READINGS
           for m in ('ste', 'stompp', 'floor')]
  assert sorted(os.listdir(summaries)) == sorted(f'{n}.json' for n in names)
  for name in names:
    row = json.loads((summaries / f'{name}.json').read_text())
    assert row['steps'] == 5 and row['sites'] == 4  # ceil(4 sites x 1 step / 0.8).
    assert 0 <= row['as_trained'] <= 1 and 0 <= row['recalibrated'] <= 1
    assert row['curves']['train'][-1]['step'] == 5 and row['config']['binary']['window_steps'] in (0, 1)
  capsys.readouterr()
  assert study.main(args) == 0  # Every run has its summary: skipped.
  assert capsys.readouterr().out.count('done, skipped') == 6
  assert study.main(args + ['--analyze']) == 0
  results = (summaries / 'results.md').read_text()
  assert '| floor | tiny_resnet | bnn | binarized | floor | layerwise | 4 | 0 | 5 | 1 |' in results
  assert '- StoMPP beats STE, tiny_resnet [binarized]: **cannot tell at this budget**' in results
  assert '- STE is above the floor, tiny_resnet [real]: **cannot tell at this budget**' in results
  assert sorted(os.listdir(summaries / 'plots')) == ['accuracy_vs_depth.png', 'order.png']


def test_the_doc_block_has_the_status_the_tables_and_the_findings(tmp_path):
  planned = plan('--models=resnet20', '--groups=main,floor', '--methods=ste,stompp',
                 '--seeds=resnet20:2', '--floor_seeds=1')
  rows = [summary('resnet20', 'binarized', 'ste', seed, 0.30 + seed / 100) for seed in (0, 1)]
  rows += [summary('resnet20', 'binarized', 'stompp', seed, 0.34 + seed / 100) for seed in (0, 1)]
  rows += [summary('resnet20', 'real', 'stompp', 0, 0.40),
           summary('resnet20', 'real', 'ste', 5, 0.1)]  # Not a planned run: left out.
  block = study.doc_block(rows, planned)
  assert block.startswith('**Status: 5 of 10 runs done** (0.0 hours')
  assert 'resnet20_bnn_real_ste_layerwise_s0' in block.split('\n')[0]
  assert '| resnet20 (18 sites, 10 steps/site, 225 steps x 64) |' in block
  assert '| STE | not run yet | 30.50 ± 0.71 (31.50 ± 0.71) |' in block
  assert '| StoMPP layerwise | 40.00 (41.00), 1 of 2 seeds | 34.50 ± 0.71 (35.50 ± 0.71) |' in block
  assert '| floor (every site frozen from step 0) | not run yet | not run yet |' in block
  assert 'StoMPP global' not in block and 'BWN' not in block  # Not planned.
  assert ('| StoMPP beats STE, resnet20 | not run yet | reproduces: +4.00 points (seeds: +4.00,'
          ' +4.00); recalibrated +4.00 points' in block)
  assert 'over the finished runs: BNN ste +1.00 (2 runs, +1.00 to +1.00); BNN stompp +1.00 (3 runs' in block
  assert '`bnn_shortcut=real` minus `binarized`, as trained: resnet20 stompp +6.00 points (seeds: +6.00).' in block
  doc = tmp_path / 'results.md'
  doc.write_text(f'before\n{study.DOC_BEGIN}\nstale\n{study.DOC_END}\nafter\n')
  study.write_doc_block(str(doc), block)
  assert doc.read_text() == f'before\n{study.DOC_BEGIN}\n{block}{study.DOC_END}\nafter\n'
  study.write_doc_block(str(doc), block)  # Idempotent.
  assert doc.read_text() == f'before\n{study.DOC_BEGIN}\n{block}{study.DOC_END}\nafter\n'


def test_a_doc_without_the_markers_is_a_one_line_error_and_is_left_alone(tmp_path, capsys):
  doc = tmp_path / 'results.md'
  doc.write_text('no markers\n')
  with pytest.raises(SystemExit) as exit_info:
    study.main([f'--summaries={tmp_path / "none"}', '--analyze', f'--doc={doc}'])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('Error: --doc=') and study.DOC_BEGIN in err and '\n' not in err
  assert doc.read_text() == 'no markers\n' and os.listdir(tmp_path) == ['results.md']


def test_the_plan_estimates_from_finished_runs_and_only_keeps_the_given_order(tmp_path, capsys):
  summaries = tmp_path / 'summaries'
  summaries.mkdir()
  for seed, wall in ((0, 100.0), (1, 300.0)):
    row = summary('resnet20', 'real', 'floor', seed, 0.2, sites=18)
    row.update(steps=135, wall_seconds=wall)
    (summaries / f'{row["name"]}.json').write_text(json.dumps(row))
  assert study.main([f'--summaries={summaries}', '--plan', '--groups=floor', '--models=resnet20',
                     '--floor_seeds=3']) == 0
  out = capsys.readouterr().out
  assert 'resnet20_bnn_binarized_floor_layerwise_s2 (floor): 135 steps x 64, 18 sites x 6 steps, ~3 min (median of 2 finished)' in out
  assert 'resnet20_bnn_real_floor_layerwise_s0 (floor, done)' in out
  assert '6 runs, 2 done, ~0.2 hours' in out  # 4 runs left x 200 s.
  names = ['resnet20_bnn_binarized_floor_layerwise_s1', 'resnet20_bnn_real_floor_layerwise_s0']
  assert study.main(['--names', f'--only={",".join(names)}']) == 0
  assert capsys.readouterr().out.split() == names


def test_the_docs_block_is_the_committed_summaries():
  """docs/results.md shows what `--analyze --doc=docs/results.md` writes from the committed
  summaries (rerun it after a study run lands)."""
  args = study.parse_args([])
  head, tail = study.read_doc(os.path.join(REPO, 'docs', 'results.md'))
  text = open(os.path.join(REPO, 'docs', 'results.md'), encoding='utf-8').read()
  block = study.doc_block(study.load_summaries(os.path.join(REPO, args.summaries)),
                          study.plan_runs(args))
  assert text == head + block + tail
