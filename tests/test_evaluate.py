"""python -m stompp_jax.evaluate: the newest checkpoint's accuracy and loss, and its errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from stompp_jax import evaluate
from stompp_jax import recalibrate

import helpers  # pylint: disable=g-bad-import-order

LINE = re.compile(r'^(fully binary|recalibrated|as trained): +accuracy (\d+\.\d\d)%  loss (\d+\.\d{4})'
                  r'  \(test split, 96 examples, step 12 of 12\)$')


@pytest.fixture(scope='module')
def finished_run(tiny_run):
  return tiny_run  # The session's tiny run (conftest.py); these tests only read it.


def run_command(*args):
  return subprocess.run([sys.executable, '-m', 'stompp_jax.evaluate', *args],
                        cwd=helpers.REPO, capture_output=True, text=True, timeout=600)


def test_evaluate_run_reproduces_the_final_evaluation(finished_run):
  done = json.loads((finished_run / 'done.json').read_text())
  results = evaluate.evaluate_run(str(finished_run))
  assert (results['step'], results['examples']) == (12, 96)
  for key in ('eval_fully_binary', 'eval'):
    assert results[f'{key}_accuracy'] == done[f'{key}_accuracy']
    assert results[f'{key}_loss'] == pytest.approx(done[f'{key}_loss'], rel=1e-5)
  train_split = evaluate.evaluate_run(str(finished_run), split='train')
  assert train_split['examples'] == 512


def test_command_prints_one_line_per_network(finished_run):
  out = run_command(f'--workdir={finished_run}')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert [LINE.match(line).group(1) for line in lines] == ['fully binary', 'as trained'], lines
  done = json.loads((finished_run / 'done.json').read_text())
  accuracy = float(LINE.match(lines[0]).group(2))
  assert accuracy == pytest.approx(100 * done['eval_fully_binary_accuracy'], abs=0.006)


def test_recalibrated_line_uses_the_re_estimated_statistics(finished_run):
  out = run_command(f'--workdir={finished_run}', '--recalibrate_bn_batches=2')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert [LINE.match(line).group(1) for line in lines] == [
      'fully binary', 'recalibrated', 'as trained'], lines
  results = evaluate.evaluate_run(str(finished_run), recalibrate_bn_batches=2)
  recalibrated = evaluate.load_run(str(finished_run))
  variables = recalibrate.recalibrate_variables(
      recalibrated.config, recalibrated.model, recalibrated.binarization,
      {'params': recalibrated.state.params, 'batch_stats': recalibrated.state.batch_stats}, 2)
  # The re-estimated statistics differ from the running ones, so the recalibrated loss does too.
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(variables['batch_stats']),
      jax.tree.leaves(jax.device_get(recalibrated.state.batch_stats))))
  assert results['eval_fully_binary_recalibrated_loss'] != results['eval_fully_binary_loss']
  assert float(LINE.match(lines[1]).group(2)) == pytest.approx(
      100 * results['eval_fully_binary_recalibrated_accuracy'], abs=0.006)


def test_missing_and_unfinished_runs_are_one_line_errors(finished_run, tmp_path):
  unfinished = tmp_path / 'unfinished'
  shutil.copytree(finished_run, unfinished)
  os.remove(unfinished / 'done.json')
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text((finished_run / 'config.json').read_text())
  for workdir, message in [(tmp_path / 'nothing', 'is not a run directory'),
                           (empty, 'has no checkpoints/ directory'),
                           (unfinished, 'is unfinished')]:
    out = run_command(f'--workdir={workdir}')
    assert out.returncode == 2 and out.stdout == '', out
    assert out.stderr.startswith('Error: ') and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  out = run_command(f'--workdir={unfinished}', '--allow_unfinished')
  assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 2, out
