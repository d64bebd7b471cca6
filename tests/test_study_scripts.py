"""benchmarks/run_study.sh and benchmarks/gpu_study.sh end to end at a tiny budget (CPU)."""

import json
import os
import subprocess

from helpers import REPO

TINY = ['--models=tiny_resnet', '--seeds=tiny_resnet:1', '--floor_seeds=1', '--data=synthetic',
        '--steps_per_site=1', '--batch=16', '--eval_batch=16', '--recalibrate=2', '--compile_cache=']


def run(command, env=None, cwd=REPO):
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, 'XLA_FLAGS': '--xla_backend_optimization_level=0',
                               **(env or {})})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_run_study_trains_each_run_and_commits_each_summary(tmp_path):
  repo = tmp_path / 'repo'
  summaries = repo / 'study'
  summaries.mkdir(parents=True)
  git = lambda *a: subprocess.run(['git', '-C', str(repo), *a], check=True, capture_output=True,
                                  text=True).stdout
  git('init', '-q')
  git('config', 'user.email', 'test@example.com')
  git('config', 'user.name', 'test')
  flags = [*TINY, '--groups=floor', f'--out={tmp_path / "runs"}', f'--summaries={summaries}']
  out = run(['bash', 'benchmarks/run_study.sh', '--foreground', '--commit', *flags])
  names = [f'tiny_resnet_bnn_{r}_floor_layerwise_s0' for r in ('real', 'binarized')]
  log = git('log', '--format=%s')
  for name in names:
    assert json.loads((summaries / f'{name}.json').read_text())['method'] == 'floor'
    assert f'Study (issue 15): {name}' in log
  assert 'tables, plots and verdicts' in log and (summaries / 'results.md').exists()
  assert not git('status', '--porcelain')
  out = run(['bash', 'benchmarks/run_study.sh', '--foreground', '--commit', *flags])
  assert out.count('done, skipped') == 2 and 'committed' not in out  # Resumed: nothing new.


def test_gpu_study_runs_end_to_end_with_the_tiny_switch(tmp_path):
  # No budget cut on a slow CI machine (the default 540 s is for a GPU).
  out = run(['bash', 'benchmarks/gpu_study.sh', str(tmp_path), '--tiny'],
            env={'GPU_STUDY_BUDGET_S': '100000'})
  files = sorted(os.listdir(tmp_path / 'summaries'))
  assert files == sorted([f'tiny_resnet_bnn_{r}_{m}_layerwise_s0.json' for r in ('binarized', 'real')
                          for m in ('ste', 'stompp')] + ['plots', 'results.md'])
  assert 'StoMPP beats STE, tiny_resnet [binarized]' in out
  # A spent budget starts no run; the analysis still runs.
  out = run(['bash', 'benchmarks/gpu_study.sh', str(tmp_path / 'none'), '--tiny'],
            env={'GPU_STUDY_BUDGET_S': '0'})
  assert 'budget of 0 s spent' in out
  assert os.listdir(tmp_path / 'none' / 'summaries') == ['results.md']
