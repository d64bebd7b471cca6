"""The study's scripts end to end at a tiny budget (CPU): run_study.sh (chunks, commits),
gpu_study.sh --tiny, gpu_prepare.sh against a fake pip that records its calls, gpu_env.sh's
install from a wheel folder, and prepare_cifar16.py."""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np

from benchmarks import prepare_cifar16

from helpers import REPO, compile_cache  # pylint: disable=g-bad-import-order

TINY = ['--models=tiny_resnet', '--data=synthetic', '--epochs=1', '--batch=16', '--eval_batch=16',
        '--recalibrate=2', '--evals=1', '--seeds=1', '--compile_cache=']


def run(command, env=None, cwd=REPO, status=0):
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, 'XLA_FLAGS': '--xla_backend_optimization_level=0',
                               # The suite's cache, even where a script turns the study's off.
                               'JAX_COMPILATION_CACHE_DIR': compile_cache(), **(env or {})})
  assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout + result.stderr


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
  run(['bash', 'benchmarks/run_study.sh', '--foreground', '--commit', *flags])
  log = git('log', '--format=%s')
  for name in ('tiny_resnet_binarized_floor_layerwise_s0',):
    row = json.loads((summaries / f'{name}.json').read_text())
    assert row['method'] == 'floor' and row['chunks'] == 1
    assert f'Study: {name}' in log
  assert 'decisions, tables and curves' in log and (summaries / 'results.md').exists()
  assert not git('status', '--porcelain')
  out = run(['bash', 'benchmarks/run_study.sh', '--foreground', '--commit', *flags])
  assert 'committed: Study: tiny' not in out  # Nothing left to run.


def test_gpu_study_runs_each_cells_seeds_in_parallel_with_the_tiny_switch(tmp_path):
  out = run(['bash', 'benchmarks/gpu_study.sh', str(tmp_path), '--tiny'],
            env={'GPU_STUDY_BUDGET_S': '100000'})
  with tarfile.open(tmp_path / 'summaries.tar.gz') as archive:
    names = sorted(pathlib.Path(n).name for n in archive.getnames() if n.endswith('.json'))
  assert names == sorted(f'tiny_resnet_binarized_{m}_layerwise_s{s}.json'
                         for m in ('stompp', 'ste') for s in (0, 1))
  assert 'tiny_resnet stompp layerwise: ' in out and 'exit statuses 0 0' in out
  assert 'tiny_resnet_binarized_ste_layerwise_s1: step ' in out  # Its step time after 50 steps.
  out = run(['bash', 'benchmarks/gpu_study.sh', str(tmp_path / 'none'), '--tiny'],
            env={'GPU_STUDY_BUDGET_S': '0'})
  assert 'budget of 0 s spent: tiny_resnet stompp layerwise and later cells not started' in out
  assert '0 summaries' in out


def test_gpu_prepare_downloads_each_missing_wheel_for_python_3_12(tmp_path):
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  calls = tmp_path / 'calls.txt'
  # A stand-in python: `-m pip download` records its arguments and writes one small file per
  # requested wheel; anything else runs the real interpreter.
  (fake_bin / 'python').write_text(
      '#!/usr/bin/env bash\n'
      'if [[ "$1 $2 $3" == "-m pip download" ]]; then\n'
      f'  echo "$@" >> {calls}\n'
      '  while [[ $# -gt 0 ]]; do [[ $1 == -d ]] && dir=$2; [[ $1 == *==* ]] && touch "$dir/${1%%==*}.whl"; shift; done\n'
      '  exit 0\n'
      'fi\n'
      f'exec {sys.executable} "$@"\n')
  (fake_bin / 'python').chmod(0o755)
  repo = tmp_path / 'repo'
  subprocess.run(['git', 'clone', '-q', str(REPO), str(repo)], check=True)
  for name in ('benchmarks/gpu_prepare.sh', 'benchmarks/gpu_lacks.txt', 'requirements.txt'):
    (repo / name).write_text((REPO / name).read_text())
  out = run(['bash', 'benchmarks/gpu_prepare.sh'], cwd=repo,
            env={'PATH': f'{fake_bin}:{os.environ["PATH"]}'})
  args = calls.read_text().split()
  assert args[:3] == ['-m', 'pip', 'download'] and '--no-deps' in args
  assert args[args.index('--python-version') + 1] == '3.12'
  lacks = [l.split('#')[0].strip() for l in (REPO / 'benchmarks' / 'gpu_lacks.txt').read_text().splitlines()]
  pins = [a for a in args if '==' in a]
  assert [p.split('==')[0] for p in pins] == [name for name in lacks if name]
  assert 'grain==0.2.18' in pins and 'ml-collections==1.1.0' in pins  # requirements.txt's pins.
  assert f'wheels: {len(pins)} of {len(pins)}' in out and 'limit 64 MiB' in out
  out = run(['bash', 'benchmarks/gpu_prepare.sh', f'--data={tmp_path / "none"}'], cwd=repo,
            status=2)
  assert 'has no train.npz' in out


def test_gpu_env_installs_the_carried_wheels_without_an_index(tmp_path):
  """gpu_env.sh installs .gpu_carry/wheels with --no-index into its target and imports
  stompp_jax from there: here with a wheel of a package built on the spot."""
  package = tmp_path / 'src'
  (package / 'carried_probe').mkdir(parents=True)
  (package / 'carried_probe' / '__init__.py').write_text('VALUE = 42\n')
  (package / 'pyproject.toml').write_text(
      '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
      '[project]\nname = "carried_probe"\nversion = "1.0"\n')
  repo = tmp_path / 'repo'
  subprocess.run(['git', 'clone', '-q', str(REPO), str(repo)], check=True)
  (repo / 'benchmarks' / 'gpu_env.sh').write_text((REPO / 'benchmarks' / 'gpu_env.sh').read_text())
  wheels = repo / '.gpu_carry' / 'wheels'
  run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation', '-w',
       str(wheels), str(package)])
  target = tmp_path / 'site'
  out = run(['bash', '-c', 'source benchmarks/gpu_env.sh && python -c "import carried_probe, sys;'
             ' print(carried_probe.VALUE, carried_probe.__file__)"'], cwd=repo,
            env={'GPU_ENV_TARGET': str(target), 'JAX_PLATFORMS': 'cpu'})
  assert 'stompp_jax with jax ' in out and f'42 {target}' in out


def test_prepare_cifar16_pools_2x2_blocks(tmp_path):
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  for name in prepare_cifar16.SPLITS:
    np.savez(tmp_path / name, image=images, label=np.array([3, 7]))
  assert prepare_cifar16.main([f'--src={tmp_path}', f'--out={tmp_path / "out"}']) == 0
  with np.load(tmp_path / 'out' / 'train.npz') as data:
    pooled, labels = data['image'], data['label']
  assert pooled.shape == (2, 2, 2, 3) and labels.tolist() == [3, 7]
  block = images[1, 2:4, 0:2, 1].astype(float)  # Image 1, bottom-left block, channel 1.
  assert pooled[1, 1, 0, 1] == int(block.mean() + 0.5) == 81  # 80.5, rounded half up.
  assert prepare_cifar16.main([f'--src={tmp_path / "none"}', f'--out={tmp_path / "x"}']) == 2
