"""Smoke tests of the performance benchmarks (they run; speed is never asserted here)."""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / 'benchmarks' / 'gpu_check.sh'


@pytest.mark.parametrize('script', sorted(p.name for p in (ROOT / 'benchmarks').glob('*.sh')))
def test_benchmark_scripts_pass_shellcheck(script):
  result = subprocess.run(['shellcheck', str(ROOT / 'benchmarks' / script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_gpu_check_tiny_runs_end_to_end_on_cpu_and_writes_the_report(tmp_path):
  """The script's tiny mode on the CPU (one device: the suite's device count is a jax.config
  setting, not an environment variable; the fast-compile XLA flag of conftest.py is kept). The
  report's rows must be the measurements of its JSON files: median, min, max and img/s."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}
  result = subprocess.run(['bash', str(GPU_CHECK), '--tiny', str(tmp_path / 'out')], env=env,
                          capture_output=True, text=True, timeout=1900)
  report = (tmp_path / 'out' / 'report.md').read_text()
  assert result.returncode == 0, result.stdout + result.stderr
  assert '- JAX backend: cpu' in report
  for name, batch in (('tiny_resnet', 4), ('tiny_resnet', 2)):
    measured = json.loads((tmp_path / 'out' / f'{name}_{batch}.json').read_text())
    results = measured['models'][f'{name}:{batch}']
    assert sorted(results) == ['fp', 'ste', 'stompp']
    assert results['fp']['sites'] == 0 and results['ste']['sites'] == results['stompp']['sites'] > 0
    section = report.split(f'## {name}:{batch}\n')[1].split('\n## ')[0]
    for method, r in results.items():
      times = r['times']
      assert len(times) >= 2 and all(t > 0 for t in times)
      median = statistics.median(times)
      row = (f'| {method} | {1e3 * median:.1f} | {1e3 * min(times):.1f} |'
             f' {1e3 * max(times):.1f} | {batch / median:.1f} |')
      assert row in section, (row, section)


def test_gpu_check_without_a_gpu_says_so_and_fails(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'GPU_CHECK_TINY': '0'}
  result = subprocess.run(['bash', str(GPU_CHECK), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 1
  assert 'No GPU backend' in (tmp_path / 'report.md').read_text()


def test_step_time_builds_the_run_and_times_the_pieces(tmp_path, capsys):
  from benchmarks import step_time  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'step_time.json'
  step_time.main(['--models=tiny_resnet:2', '--methods=ste,stompp', '--reps=1', '--steps=1',
                  '--warmup=0', '--pieces', f'--json={out}'])
  printed = capsys.readouterr().out
  assert '| stompp |' in printed and '| ste |' in printed
  measured = json.loads(out.read_text())
  results = measured['models']['tiny_resnet:2']
  assert results['stompp']['sites'] == results['ste']['sites'] > 0
  assert all(t > 0 for r in results.values() for t in r['times'])
  assert 'compiled step HLO' in printed
  assert all(0 < r['hlo']['fusions'] < r['hlo']['instructions'] for r in results.values())
  pieces = measured['pieces_ms']['tiny_resnet:2']
  assert len(pieces) == 5 and all(ms > 0 for ms in pieces.values())
  assert any(name.startswith('binary convs alone') for name in pieces)


@pytest.mark.parametrize('name,binary_convs', [('resnet20', 18), ('resnet18', 16)])
def test_torch_peer_is_the_same_network_and_trains(name, binary_convs):
  pytest.importorskip('torch')
  from benchmarks import step_time  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_peer  # pylint: disable=import-outside-toplevel
  from stompp_jax import models  # pylint: disable=import-outside-toplevel
  config = step_time.make_config(name, 'ste', 'float32')
  model = models.create_model(config.model, num_classes=10, image_shape=(32, 32, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3))))
  jax_sizes = sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(params['params']))
  bench = torch_peer.TorchBench(batch_size=4, model=name)
  torch_sizes = sorted(p.numel() for p in bench.model.parameters())
  assert torch_sizes == jax_sizes
  # Every 3x3 conv of the blocks; stem, shortcuts, head are float.
  assert len(bench.convs) == binary_convs
  before = [c.weight.detach().clone() for c in bench.convs]
  assert bench.run(1) > 0
  assert all(float(c.weight.detach().abs().max()) <= 1 for c in bench.convs)
  assert any(not bool((c.weight == b).all()) for c, b in zip(bench.convs, before))


def test_torch_peer_stompp_freezes_as_the_schedule_says():
  torch = pytest.importorskip('torch')
  from benchmarks import torch_peer  # pylint: disable=import-outside-toplevel
  # Step 420 of 1000, span 0.8 over 18 sites: 44.4 steps a site, so sites 0-8 are frozen, site 9
  # is 20 / 44.4 = 0.45 into its window (cubic: 0.091), sites 10-17 are float.
  fractions = torch_peer.site_fractions('resnet20', 'stompp')
  assert fractions[:9] == [1.0] * 9 and fractions[10:] == [0.0] * 8
  assert fractions[9] == pytest.approx(0.45 ** 3, abs=1e-6)
  bench = torch_peer.TorchBench(batch_size=4, method='stompp')
  frozen_site, float_site = bench.sites[0], bench.sites[-1]
  x = torch.linspace(-2, 2, 9)
  assert torch.equal(torch_peer.masked_sign(x, None, 1.0), torch.where(x >= 0, 1.0, -1.0))
  assert torch.equal(torch_peer.masked_sign(x, None, 0.0), x.clamp(-1, 1))
  before = {s: s.conv.weight.detach().clone() for s in (frozen_site, float_site)}
  assert bench.run(2) > 0
  assert torch.equal(frozen_site.conv.weight, before[frozen_site])  # Frozen: never updated.
  assert not torch.equal(float_site.conv.weight, before[float_site])


def test_cpu_throughput_parses_the_cli_log():
  from benchmarks import cpu_throughput  # pylint: disable=import-outside-toplevel
  log = '\n'.join([
      'I1201 13:59:31.152608 1 train.py:198] Compiled in 139.9 s.',
      'I1201 14:05:13.895475 1 train.py:261] step 25/50 | loss 2.2 | acc 19.03% | 10 img/s | ETA 0:16:38',
      'I1201 14:10:17.223443 1 train.py:261] step 50/50 | loss 2.0 | acc 23.69% | 11.5 img/s | ETA 0:00:00',
      'I1201 14:10:17.500000 1 train.py:214] Evaluating at step 50...',
      'I1201 14:10:19.500000 1 train.py:223] eval at step 50 | eval_accuracy 20.00% | eval_fully_binary_accuracy 10.00%'])
  assert cpu_throughput.parse_log(log) == {'train_img_per_s': 11.5, 'eval_seconds': 2.0,
                                           'eval_functions': 2}


def test_cpu_throughput_runs_the_cli_and_prints_the_table(capsys):
  from benchmarks import cpu_throughput  # pylint: disable=import-outside-toplevel
  # The suite's tiny config (one eval batch of 32): the benchmark turns the compilation cache
  # off, so each variant compiles its run afresh, and the tiny model compiles fastest.
  cpu_throughput.main(['--variants=plain,cli', '--rounds=1', '--steps=2', '--eval_steps=1',
                       '--eval_examples=32', '--config=configs/tiny.py'])
  out = capsys.readouterr().out
  for variant in ('plain', 'cli'):
    assert f'| {variant} |' in out
  assert 'system s' in out and 'minor faults' in out


def test_cpu_throughput_refuses_an_unknown_variant(capsys):
  from benchmarks import cpu_throughput  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as exit_info:
    cpu_throughput.main(['--variants=plain,nope'])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.startswith('Error: unknown variant(s) nope: use ')
