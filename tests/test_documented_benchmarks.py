"""Every `python benchmarks/<script> ...` command that README.md, docs/*.md, the notebooks' text
cells and the module docstrings of benchmarks/**/*.py show parses with the script's own command
line and passes the checks the script makes before its work (those that need no data), without
running it.

How a script is parsed:
- one that has `parse_args(argv)`, its own or one it imports (torch_peer.py's, from
  torch_peer_args.py), by that function: every such command in one process (this file run as a
  script) where torch cannot be imported, as where it is not installed;
- one run by absl's `app.run`, started itself with `--only_check_args` (absl parses the flags,
  loads a --config file, checks the required ones and exits before main).
A script with neither fails here. A usage line is parsed as the command it shows with its
optional parts given (`[--breakdown]`) and a `...` word left out; its other placeholders
(`--doc=FILE`) are passed as they are, so they must be values the script takes as given.
`test_bad_commands_fail` proves that a made-up flag, method, model or variant fails.
"""

import ast
import contextlib
import glob
import importlib
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# A command: optional VAR=value assignments, `python benchmarks/<path>`, its arguments up to the
# end of the line, a backtick, a table cell, a shell separator or a closing parenthesis.
_COMMAND = re.compile(
    r"(?:\b[A-Z][A-Z0-9_]*=\S+ +)*python benchmarks/[\w/.-]+\.py(?![\w'])[^`\n|;)]*")
# Inline code (single backticks) that a paragraph wraps over up to four lines.
_INLINE_CODE_OVER_LINES = re.compile(r'(?<!`)`[^`\n]+(?:\n[^`\n]+){1,3}`(?!`)')
_OPTIONAL = re.compile(r'\[([^][]*)\]')
_APP_RUN = re.compile(r'\bapp\.run\(')


def _read(path: str) -> str:
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    return f.read()


def _documents() -> list[tuple[str, str]]:
  """(path, text that shows commands): README.md, docs/*.md, the notebooks' markdown cells, the
  module docstrings of benchmarks/**/*.py."""
  documents = [(path, _read(path))
               for path in ['README.md', *sorted(glob.glob('docs/*.md', root_dir=REPO))]]
  for path in sorted(glob.glob('notebooks/*.ipynb', root_dir=REPO)):
    cells = json.loads(_read(path))['cells']
    documents.append((path, '\n\n'.join(''.join(c['source']) for c in cells
                                        if c['cell_type'] == 'markdown')))
  for path in sorted(glob.glob('benchmarks/**/*.py', root_dir=REPO, recursive=True)):
    documents.append((path, ast.get_docstring(ast.parse(_read(path))) or ''))
  return documents


def commands_in(text: str) -> list[str]:
  """The commands `text` shows, each on one line: its lines joined where they end in a
  backslash or where a paragraph wraps its inline code; a trailing `# comment` left out."""
  text = re.sub(r'\s*\\\n\s*', ' ', text)
  text = _INLINE_CODE_OVER_LINES.sub(lambda m: ' '.join(m.group(0).split()), text)
  return [' '.join(m.group(0).split(' #')[0].split()) for m in _COMMAND.finditer(text)]


def documented_commands() -> dict[str, str]:
  """{command: the first file that shows it}."""
  found = {}
  for path, text in _documents():
    for command in commands_in(text):
      found.setdefault(command, path)
  return found


def split(command: str) -> tuple[str, list[str]]:
  """(script, arguments) of a command: its environment assignments left out, its optional
  parts given, a `...` word left out."""
  words = shlex.split(_OPTIONAL.sub(r'\1', command))
  start = words.index('python')
  return words[start + 1], [w for w in words[start + 2:] if w != '...']


def parse_args_file(script: str) -> str:
  """The file whose `parse_args` parses `script`'s command line: the script, or the module it
  imports `parse_args` from; '' when neither."""
  for node in ast.parse(_read(script)).body:
    if isinstance(node, ast.FunctionDef) and node.name == 'parse_args':
      return script
    if isinstance(node, ast.ImportFrom) and any(a.name == 'parse_args' for a in node.names):
      return os.path.join(os.path.dirname(script), *node.module.split('.')) + '.py'
  return ''


def _check_with_absl(script: str, args: list[str]) -> str:
  """'' when absl takes `args` for `script`, else its message."""
  result = subprocess.run([sys.executable, script, *args, '--only_check_args'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  return '' if result.returncode == 0 else result.stderr[-2000:]


def check(commands: list[str]) -> dict[str, str]:
  """{command: '' when its script parses it and its checks pass, else why not}."""
  errors, jobs = {}, {}
  for command in commands:
    script, args = split(command)
    if not os.path.isfile(os.path.join(REPO, script)):
      errors[command] = f'{script}: no such script'
    elif parsed_by := parse_args_file(script):
      jobs[command] = [parsed_by, *args]
    elif _APP_RUN.search(_read(script)):
      errors[command] = _check_with_absl(script, args)
    else:
      errors[command] = f'{script}: neither parse_args(argv) nor absl app.run to parse it with'
  result = subprocess.run([sys.executable, __file__], input=json.dumps(list(jobs.values())),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  errors.update(zip(jobs, json.loads(result.stdout.splitlines()[-1])))
  return errors


def parse_here(jobs: list[list[str]]) -> list[str]:
  """For each [file, *arguments]: '' when the file's `parse_args` takes the arguments, else
  what it raised and wrote; torch unimportable."""
  sys.modules['torch'] = None
  errors = []
  for path, *args in jobs:
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    module = importlib.import_module(pathlib.Path(path).stem)
    written = io.StringIO()
    try:
      with contextlib.redirect_stderr(written), contextlib.redirect_stdout(written):
        module.parse_args(args)
      errors.append('')
    except (SystemExit, Exception) as e:  # pylint: disable=broad-except
      errors.append(f'{type(e).__name__}: {e}\n{written.getvalue()}')
  return errors


# Commands that must fail, with what their script says.
BAD = {
    'python benchmarks/step_time.py --models=resnet18:32 --no_such_flag':
        'unrecognized arguments: --no_such_flag',
    'python benchmarks/step_time.py --models=resnet18:32 --methods=fp,stompp@when':
        "Unknown method 'stompp@when'",
    'python benchmarks/step_time.py --models=resnet19:32': "Unknown model.name 'resnet19'",
    'python benchmarks/torch_peer.py --model=resnet18 --no_such_flag':
        'unrecognized arguments: --no_such_flag',
    'python benchmarks/torch_peer.py --methods=ste,fp': 'choose from ste, stompp',
    'python benchmarks/cpu_throughput.py --variants=plain,nope': 'unknown variant(s) nope',
    'python benchmarks/study.py --groups=core,nope --plan': 'choose from core, reverse',
    'python benchmarks/recalibration.py --datasets=digits,cifar100 --analyze':
        '--datasets: unknown cifar100',
    'python benchmarks/preflight/table.py --write --no_such_flag':
        'unrecognized arguments: --no_such_flag',
    'python benchmarks/preflight/masks_check.py --config=configs/cifar.py:model=resnet20'
    ' --no_such_flag': "Unknown command line flag 'no_such_flag'",
    # It chooses its slices itself (--small, --large): preflight's --topology is not its flag.
    'python benchmarks/preflight/masks_check.py --config=configs/tiny.py --topology=v4-8':
        "Unknown command line flag 'topology'",
    'python benchmarks/missing_' + 'script.py': 'no such script',  # Two parts: no text names a missing file.
}


@pytest.fixture(scope='module')
def checked() -> dict[str, str]:
  return check([*documented_commands(), *BAD])


def test_commands_are_found_in_every_form_the_docs_use():
  text = '\n'.join([
      '```bash', 'python benchmarks/study.py --plan     # runs, hours left', '```',
      '    STOMPP_DATA_DIR=/data python benchmarks/cpu_throughput.py --rounds=2',
      '    python benchmarks/step_time.py --models=resnet18:32 \\', '        --reps=0   # memory',
      'as measured (`python benchmarks/torch_peer.py', '--batch=64 --breakdown`): the table',
      '<!-- written by python benchmarks/study.py --analyze --doc=FILE) -->',
      '| `python benchmarks/packed_conv.py` | `bash benchmarks/run_study.sh --commit` |'])
  assert commands_in(text) == [
      'python benchmarks/study.py --plan',
      'STOMPP_DATA_DIR=/data python benchmarks/cpu_throughput.py --rounds=2',
      'python benchmarks/step_time.py --models=resnet18:32 --reps=0',
      'python benchmarks/torch_peer.py --batch=64 --breakdown',
      'python benchmarks/study.py --analyze --doc=FILE',
      'python benchmarks/packed_conv.py']


def test_a_usage_line_is_parsed_with_its_optional_parts_given():
  assert split('A=1 python benchmarks/packed_conv.py [--shapes 8x8x64:2] [--reps 7] ...') == (
      'benchmarks/packed_conv.py', ['--shapes', '8x8x64:2', '--reps', '7'])


@pytest.mark.parametrize('command', sorted(documented_commands()))
def test_documented_command_parses_and_passes_the_checks_before_work(command, checked):
  assert not checked[command], (
      f'{command} ({documented_commands()[command]}) fails as shown:\n{checked[command]}')


@pytest.mark.parametrize('command', sorted(BAD))
def test_bad_commands_fail(command, checked):
  assert BAD[command] in checked[command], checked[command]


if __name__ == '__main__':
  print(json.dumps(parse_here(json.load(sys.stdin))))
