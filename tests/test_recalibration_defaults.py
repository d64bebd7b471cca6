"""benchmarks/recalibration.py: the per-method rule for re-estimating BatchNorm statistics and the
table it writes from summaries (its runs are a benchmark: 400 steps each)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))

import recalibration  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.parametrize('gains, verdict', [
    ([0.05, 0.04, 0.06], 'recalibrate'),  # Clearly above a point in every seed.
    ([0.001, -0.002, 0.0], 'as trained'),  # Upper bound well below a point.
    ([0.10, -0.05, 0.02], 'cannot tell'),  # Seeds disagree: the interval spans both.
    ([0.006, 0.004, 0.005], 'as trained'),  # Real but under a point: not worth the data.
    ([0.30], 'cannot tell'),  # One seed has no interval.
])
def test_rule(gains, verdict):
  assert recalibration.decide(gains)[0] == verdict


def _write(directory, dataset, method, seed, as_trained, recalibrated):
  with open(directory / f'{dataset}_{method}_s{seed}.json', 'w', encoding='utf-8') as f:
    json.dump({'as_trained': as_trained, 'recalibrated': recalibrated}, f)


def test_a_default_needs_every_dataset_to_agree(tmp_path, monkeypatch, capsys):
  for seed, noise in enumerate((0.0, 0.01, -0.01)):
    for method in recalibration.METHODS:
      _write(tmp_path, 'digits', method, seed, 0.90, 0.95 + noise)  # +5 points everywhere.
    _write(tmp_path, 'cifar10_16', 'ste', seed, 0.40, 0.50 + noise)  # +10 points.
    _write(tmp_path, 'cifar10_16', 'stompp', seed, 0.40, 0.40 + noise / 10)  # No change.
  monkeypatch.setattr(sys, 'argv', ['recalibration.py', '--analyze', f'--summaries={tmp_path}'])
  recalibration.main()
  out = capsys.readouterr().out
  assert '| cifar10_16 | ste | 3 | 40.00 | 50.00 |' in out
  assert '- ste: default recalibrate\n' in out
  assert '- stompp: default as trained (the datasets disagree)' in out
  assert '- stompp_ste: default as trained (not every dataset has run)' in out


def test_the_documented_table_is_the_committed_summaries(monkeypatch, capsys):
  """docs/results.md shows what `python benchmarks/recalibration.py --analyze` prints from the
  committed summaries (the command the page names)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  monkeypatch.chdir(root)
  monkeypatch.setattr(sys, 'argv', ['recalibration.py', '--analyze'])
  recalibration.main()
  table = capsys.readouterr().out.strip()
  assert table.count('\n| ') >= 2
  with open(os.path.join(root, 'docs', 'results.md'), encoding='utf-8') as f:
    assert table in f.read()
