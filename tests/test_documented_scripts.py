"""Every shell command the docs show that starts one of the project's scripts (launch/*.sh,
launch/gpu_slurm.sbatch, benchmarks/*.sh, benchmarks/preflight/run.sh, .ci/run), and the
sweep commands of launch/README.md, work as shown.

- The launchers' commands (`launch/tpu_vm.sh ...`, `launch/gpu_local.sh ...`, `sbatch ...
  launch/gpu_slurm.sbatch ...`) run here as shown, with the settings of launch/README.md's
  `export` lines, against fake `gcloud`, `srun`, `sbatch` and `python` executables that record
  their calls (tests/test_launch.py's recorders): each exits 0 and reaches what it drives. The
  training command that reaches a worker or a SLURM task is then checked as a run would check
  it before training (`test_documented_commands.validate`), as is the preflight's request.
- Every other script command names the test that runs it (SCRIPTS); that test must exist and
  name the script. A usage line (OUT_DIR, `...`) needs a placeholder. A script named without
  arguments in prose is a reference to the file, which must exist.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO  # pylint: disable=g-bad-import-order
import test_documented_commands as documented
from test_launch import Fakes
from test_launch import remote_command
from test_launch import run_remote
from test_launch import slurm_env
from test_launch import wait_for_calls
from test_preflight import _check_before_compiling

# A script command: VAR=value assignments, a starter (bash, sbatch and its options, nohup nice),
# the script's path, its arguments up to a comment, a backtick, a table cell, a redirection or
# a shell separator.
_SCRIPT = re.compile(
    r'(?:\b[A-Z][A-Z0-9_]*=\S+ +)*(?:(?:bash|sbatch|nohup nice -n \d+)(?: +--[\w-]+(?:=\S+)?)* +)?'
    r'(?:\./)?(?:launch/\w+\.(?:sh|sbatch)|benchmarks/[\w/]+\.sh|\.ci/run)\b[^`\n|;#&>"]*')
# A quoted option value holds a command for the script to start (`--launcher="sbatch ..."`),
# not one for the reader to run.
_QUOTED_VALUE = re.compile(r'="[^"\n]*"')
_LAUNCHERS = re.compile(r'^(?:\w+=\S+ +)*(?:launch/(?:tpu_vm|gpu_local)\.sh|sbatch\b)')
_USAGE = re.compile(r'\.\.\.|\b[A-Z][A-Z_]{2,}\b(?!=)')

# Script commands no launcher test runs here: the test that runs each one.
SCRIPTS = {
    '.ci/run': 'test_docs.py::test_the_readme_sets_up_a_fresh_machine_in_two_commands_and_ci_runs_the_second',
    'bash .ci/run': 'test_docs.py::test_the_readme_sets_up_a_fresh_machine_in_two_commands_and_ci_runs_the_second',
    'bash benchmarks/gpu_check.sh --tiny':
        'test_benchmarks.py::test_gpu_check_tiny_runs_end_to_end_on_cpu_and_writes_the_report',
    'bash benchmarks/gpu_prepare.sh --data=~/stompp_data/cifar10_16':
        'test_study_scripts.py::test_gpu_prepare_downloads_each_missing_wheel_for_python_3_12',
    'nohup nice -n 10 benchmarks/preflight/run.sh --commit':
        'test_preflight.py::test_run_sh_skips_the_jobs_that_have_a_json_and_refuses_an_unknown_name',
    'bash benchmarks/run_study.sh --commit':
        'test_study_scripts.py::test_run_study_trains_each_run_and_commits_each_summary',
    'bash benchmarks/run_study.sh --commit --data_dir=~/stompp_data/cifar10_16':
        'test_study_scripts.py::test_run_study_trains_each_run_and_commits_each_summary',
}


def script_commands() -> dict[str, tuple[str, str]]:
  """{command: (where it is shown, the text before it)} of every script command the documents
  show; a bare script path (a reference to the file) is left out."""
  found = {}
  for path, text in documented.joined_documents():
    text = _QUOTED_VALUE.sub('="..."', text)
    for match in _SCRIPT.finditer(text):
      command = ' '.join(match.group(0).split())
      if ' ' not in command and command != '.ci/run':
        assert os.path.isfile(os.path.join(REPO, command)), f'{path} names {command}: no such file'
        continue
      start = max(0, match.start() - documented._CONTEXT_CHARS)  # pylint: disable=protected-access
      found.setdefault(command, (path, text[start:match.end()]))
  return found


def _readme_settings() -> dict[str, str]:
  """The variables launch/README.md's `export` lines set."""
  text = (REPO / 'launch' / 'README.md').read_text()
  settings = {}
  for line in re.findall(r'^export (.*)$', text, re.M):
    settings.update(word.split('=', 1) for word in shlex.split(line.split('#')[0]) if '=' in word)
  return settings


def _is_launcher(command: str) -> bool:
  return bool(_LAUNCHERS.match(command))


def test_every_script_command_is_run_by_a_test():
  commands = script_commands()
  assert len([c for c in commands if _is_launcher(c)]) >= 15
  missing = {c: where for c, (where, _) in commands.items()
             if not _is_launcher(c) and c not in SCRIPTS and not _USAGE.search(c)}
  assert not missing, f'script commands no test runs (add them to SCRIPTS): {missing}'
  stale = sorted(set(SCRIPTS) - set(commands))
  assert not stale, f'SCRIPTS lists commands the docs no longer show: {stale}'


@pytest.mark.parametrize('command', sorted(SCRIPTS))
def test_the_test_that_runs_a_script_exists_and_names_it(command):
  file_name, test_name = SCRIPTS[command].split('::')
  text = (REPO / 'tests' / file_name).read_text()
  assert re.search(rf'^def {test_name}\(', text, re.M), SCRIPTS[command]
  script = next(w for w in command.split() if '/' in w)
  assert os.path.basename(script) in text, f'{file_name} does not name {script}'


def _validate_training(argv: list[str], where: str, context: str) -> None:
  """A recorded `python -m stompp_jax.main ARGS` checked as the run would check it."""
  assert argv[1:3] == ['-m', 'stompp_jax.main'], argv
  documented.validate(shlex.join(['python', *argv[1:]]), context, where)


@pytest.mark.parametrize('command', sorted(c for c in script_commands()
                                           if _is_launcher(c) and '...' not in c))
def test_a_documented_launch_command_runs_as_shown(command, tmp_path, monkeypatch):
  where, context = script_commands()[command]
  fakes = Fakes(tmp_path)
  for name in ('gcloud', 'srun', 'python', 'python3', 'scontrol'):
    fakes.add(name)
  # sbatch queues the script; here it runs it at once, as SLURM would in a job.
  (fakes.bin / 'sbatch').write_text(
      '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nscript=$1; shift\n'
      'exec bash "$script" "$@"\n')
  (fakes.bin / 'sbatch').chmod(0o755)
  env = slurm_env(fakes, **_readme_settings()) if command.startswith('sbatch') else fakes.env(
      **_readme_settings())
  result = subprocess.run(['bash', '-c', command], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  calls = fakes.calls()
  if command.endswith(' --help'):
    assert 'mount-data' in result.stdout
    return
  assert calls, f'{command} reached nothing'

  # What reaches the workers and tasks: the preflight's request, the training command.
  monkeypatch.chdir(REPO)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.delenv('STOMPP_DATA_DIR', raising=False)
  for call in calls:
    argv = call['argv']
    if argv[0] == 'srun':
      _validate_training(argv[argv.index('python'):], where, context)
    elif argv[0] == 'python' and 'stompp_jax.main' in argv:
      _validate_training(argv, where, context)
    elif argv[0] == 'python3' and 'stompp_jax.preflight' in argv:
      _check_before_compiling(argv[3:])
    elif argv[:2] == ['gcloud', 'compute'] and 'ssh' in argv and 'train' in command.split():
      home = tmp_path / 'worker'
      fakes.add('python', home / 'stompp_jax' / '.venv' / 'bin')
      fakes.log.unlink()
      assert run_remote(remote_command(argv), home, fakes).returncode == 0
      [started] = wait_for_calls(fakes, 1)
      _validate_training(started['argv'], where, context)


SWEEPS = [c for c in documented.documented_commands() if c.startswith('python -m launch.sweep')]


@pytest.mark.parametrize('command', SWEEPS)
def test_a_documented_sweep_command_runs_as_shown(command, tmp_path, monkeypatch):
  """Run from the repository root with fake `python` and `sbatch` on PATH (the default
  launcher and the README's): `--help` and `--list` print, `--print` lines run in bash start
  the launcher, `--run` starts each run; every run's arguments pass the checks before training."""
  fakes = Fakes(tmp_path)
  fakes.add('python')
  fakes.add('sbatch')
  words = shlex.split(command)
  result = subprocess.run([sys.executable, *words[1:]], cwd=REPO, env=fakes.env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  if '--help' in words:
    assert 'r50_bnn_cifar' in result.stdout
    return
  if '--list' in words:
    count = re.search(r'its (\d+) runs', documented.documented_commands()[command][1])
    assert len(result.stdout.splitlines()) == int(count.group(1)), result.stdout
    return
  if '--print' in words:
    for line in result.stdout.splitlines():
      subprocess.run(['bash', '-c', line], cwd=REPO, env=fakes.env(), check=True, timeout=60)
  runs = [c['argv'] for c in fakes.calls()]
  assert len(runs) >= 8, runs
  monkeypatch.chdir(REPO)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.delenv('STOMPP_DATA_DIR', raising=False)
  where, context = documented.documented_commands()[command]
  for argv in runs:
    args = argv[argv.index('launch/gpu_slurm.sbatch') + 1:] if argv[0] == 'sbatch' else argv[3:]
    documented.validate(shlex.join(['python', '-m', 'stompp_jax.main', *args]), context, where)


def test_the_documented_single_file_test_command_collects():
  """CONTRIBUTING.md's `python -m pytest tests/test_data_sources.py -q -x`, as pytest parses it
  (collection only: the suite runs that file anyway)."""
  result = subprocess.run([sys.executable, '-m', 'pytest', 'tests/test_data_sources.py', '-q',
                           '-x', '--collect-only', '-n', '0'], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-2000:]
  assert re.search(r'^\d+ tests? collected', result.stdout, re.M), result.stdout[-2000:]
