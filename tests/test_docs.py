"""The user documentation: a README that is a front door, no ticket numbers or placeholders, the
table of our choices complete and true to configs/default.py, the README's own-model example
runnable as shown."""

import glob
import json
import re

import pytest

from configs import default

from helpers import REPO  # pylint: disable=g-bad-import-order

README = REPO / 'README.md'
# The fields the "Choices that are ours" table must hold besides those marked [ours] in
# configs/default.py's comments.
REQUIRED_CHOICES = ('model.bnn_shortcut', 'binary.window_steps', 'train.recalibrate_bn_batches',
                    'train.num_epochs', 'binary.refresh_every', 'binary.shape')


def _user_documents() -> dict[str, str]:
  """{path: text} of README.md, docs/*.md and the notebooks' markdown cells."""
  texts = {'README.md': README.read_text()}
  for path in sorted(glob.glob('docs/*.md', root_dir=REPO)):
    texts[path] = (REPO / path).read_text()
  for path in sorted(glob.glob('notebooks/*.ipynb', root_dir=REPO)):
    cells = json.loads((REPO / path).read_text())['cells']
    texts[path] = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'markdown')
  return texts


def test_the_readme_is_a_front_door():
  text = README.read_text()
  assert len(text.encode()) <= 10_500 and len(text.splitlines()) <= 180
  first_screen = '\n'.join(text.splitlines()[:40])
  for needed in ('2601.22660', '2606.27759', 'nofficial', 'Results beside the papers'):
    assert needed in first_screen, needed


def test_no_ticket_numbers_in_user_documentation():
  found = {path: m.group(0) for path, text in _user_documents().items()
           for m in [re.search(r'(?i)\bissues? ?-?#?\d+', text)] if m}
  assert not found, found


@pytest.mark.parametrize('placeholder', ['<your-org>', '9X.XX', 'github.com/you/', 'TODO',
                                         'TBD', 'colab-badge'])
def test_no_placeholders_in_user_documentation(placeholder):
  assert not [path for path, text in _user_documents().items() if placeholder in text]


def _choices_rows() -> list[tuple[list[str], str]]:
  """(fields, default cell) of each row of docs/method.md's "Choices that are ours" table."""
  text = (REPO / 'docs' / 'method.md').read_text()
  table = text.split('## Choices that are ours', 1)[1].split('\n## ', 1)[0]
  rows = []
  for line in table.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 4 and cells[0] not in ('choice', '---'):
      rows.append((re.findall(r'`([a-z_]+\.[a-z_]+)`', cells[1]), cells[2]))
  return rows


def _flat_defaults() -> dict:
  flat = {}
  for section, fields in default.get_config().to_dict().items():
    if isinstance(fields, dict):
      flat.update({f'{section}.{k}': v for k, v in fields.items()})
  return flat


def _ours_fields() -> set[str]:
  """The fields whose comments in configs/default.py say [ours]."""
  lines = (REPO / 'configs' / 'default.py').read_text().splitlines()
  fields, pending = set(), False
  for line in lines:
    pending = pending or ('[ours' in line and line.strip().startswith('#'))
    match = re.match(r'\s*c\.(\w+\.\w+) = ', line)
    if match:
      if pending or '[ours' in line:
        fields.add(match.group(1))
      pending = False
  return fields


def test_the_choices_table_names_every_choice_of_ours_with_its_default():
  rows = _choices_rows()
  defaults = _flat_defaults()
  named = {field for fields, _ in rows for field in fields}
  assert not named - set(defaults), f'not fields of configs/default.py: {named - set(defaults)}'
  missing = (set(REQUIRED_CHOICES) | _ours_fields()) - named
  assert not missing, f'docs/method.md, "Choices that are ours", lacks {sorted(missing)}'
  for fields, default_cell in rows:
    if len(fields) != 1 or defaults[fields[0]] is None:
      continue
    value = defaults[fields[0]]
    shown = f'{value:g}' if isinstance(value, float) else str(value)
    assert shown in default_cell, f'{fields[0]}: default {shown}, the table says {default_cell}'


def test_the_readme_sets_up_a_fresh_machine_in_two_commands_and_ci_runs_the_second():
  """Install + the quickstart (run by test_train.py's quickstart test), install + the tests:
  the README's first two code lines; `.ci/run` runs the second one exactly."""
  section = README.read_text().split('\n## Install, train, test\n')[1].split('\n## ')[0]
  first, second = re.findall(r'^    (\S.*)$', section, re.M)[:2]
  assert first == ('pip install -r requirements.txt && python -m stompp_jax.main'
                   ' --config=configs/quickstart.py --workdir=/tmp/stompp_quickstart')
  assert second.startswith('pip install -r requirements-test.txt && python -m pytest ')
  assert second in (REPO / '.ci' / 'run').read_text().splitlines()


def test_the_quickstart_time_is_stated_in_the_readme_only():
  readme = README.read_text()
  assert re.search(r'took \*\*\d+ min \d+ s\*\*', readme)
  docstring = (REPO / 'configs' / 'quickstart.py').read_text().split('"""')[1]
  notebook = _user_documents()['notebooks/quickstart.ipynb']
  for text in (docstring, notebook):
    assert 'README' in text and not re.search(r'\d+ (?:min|minutes|s)\b', text)


def test_the_readme_own_model_example_runs_as_shown(tmp_path, monkeypatch):
  [code] = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  assert "'/tmp/own_model_readme'" in code
  monkeypatch.chdir(REPO)
  namespace = {}
  code = code.replace("'/tmp/own_model_readme'", repr(str(tmp_path)))
  exec(code, namespace)  # pylint: disable=exec-used
  assert (tmp_path / 'done.json').exists()


def _slug(heading: str) -> str:
  """GitHub's anchor of a markdown heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def test_every_link_to_a_section_finds_its_heading():
  broken = []
  for path in ['README.md', *sorted(glob.glob('docs/*.md', root_dir=REPO))]:
    text = (REPO / path).read_text()
    for target, fragment in re.findall(r'\]\(([^)#\s]*)#([\w-]+)\)', text):
      file = (REPO / path).parent / target if target else REPO / path
      headings = re.findall(r'^#+ (.+)$', file.read_text(), re.M)
      if fragment not in {_slug(h) for h in headings}:
        broken.append(f'{path}: {target}#{fragment}')
  assert not broken, broken


def test_every_test_a_page_names_exists():
  """`FILE.py::test_name` and `::test_name` (a test of the page's test file) in the docs."""
  defined = {path.name: set(re.findall(r'^def (test_\w+)\(', path.read_text(), re.M))
             for path in (REPO / 'tests').glob('test_*.py')}
  everywhere = set().union(*defined.values())
  pages = [README, REPO / 'CONTRIBUTING.md', REPO / 'launch' / 'README.md',
           *sorted((REPO / 'docs').glob('*.md'))]
  missing = []
  for page in pages:
    for file_name, test in re.findall(r'(test_\w+\.py)?::(test_\w+)', page.read_text()):
      if test not in (defined.get(file_name, set()) if file_name else everywhere):
        missing.append(f'{page.name}: {file_name}::{test}')
  assert not missing, missing
