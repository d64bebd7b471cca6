"""docs/configuration.md is what docs/make_configuration_md.py writes from configs/default.py."""

import os
import subprocess
import sys

from helpers import REPO


def test_configuration_reference_is_current():
  result = subprocess.run([sys.executable, os.path.join('docs', 'make_configuration_md.py'),
                           '--check'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr


def test_every_field_has_a_row_with_its_default():
  sys.path.insert(0, str(REPO / 'docs'))
  try:
    import make_configuration_md  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(REPO / 'docs'))
  text = (REPO / 'docs' / 'configuration.md').read_text()
  defaults = make_configuration_md._flatten(  # pylint: disable=protected-access
      make_configuration_md.default.get_config().to_dict())
  for field, value in defaults.items():
    assert f'| `{field}` | `{value!r}` |' in text, field
