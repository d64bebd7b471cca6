"""One-line errors for the flags of `python -m stompp_jax.main` (exit status 2).

absl reports a bad flag, and ml_collections a bad --config file or override, with exceptions
whose text is written for developers (a traceback of the config file, `AttributeError: ...`).
`parse_flags` is absl's flag parsing (`app.run(..., flags_parser=parse_flags)`) that prints
`Error: what is wrong: what to do` instead.
"""

import os
import re

from absl import flags

from stompp_jax import errors


def _config_error(text: str, argv: list[str]) -> str:
  """One line for an error of --config's file: missing, or its get_config(arg) refused arg."""
  given = next((a.partition('=')[2] for a in argv[1:] if a.startswith('--config=')), '')
  path = given.partition(':')[0]
  if not os.path.isfile(path):
    return (f'--config={given}: no config file {path!r}: give a file of configs/ (e.g.'
            ' --config=configs/default.py or --config=configs/cifar.py:model=resnet20).')
  raised = re.findall(r'^\w*(?:Error|Exception): (.+)$', text, re.M)
  cause = raised[-1] if raised else text.strip().splitlines()[-1]
  return f'--config={given}: {cause}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors (exit 2): a missing config file, an argument its
  get_config refuses, an unknown flag, and an override of a config field that does not exist
  (ml_collections raises AttributeError or KeyError from inside the parser)."""
  try:
    remaining = flags.FLAGS(argv)
    flags.FLAGS.config.keys()  # ml_collections reports a missing config file when it is read.
    return remaining
  except OSError as e:
    errors.fail(_config_error(str(e), argv), errors.EXIT_BAD_INPUT)
  except (AttributeError, KeyError) as e:
    text = str(e).replace('\\n', '\n').replace("\\'", "'")
    names = re.findall(r"'(\w+)'", text)
    if not names:
      raise
    field = names[0]
    overrides = [a.split('=')[0].lstrip('-') for a in argv[1:] if a.startswith('--config.')]
    given = next((o for o in overrides if field in o.split('.')[1:]), f'config.…{field}')
    hint = re.search(r'Did you mean "(\w+)"', text)
    suggestion = f' (did you mean {hint.group(1)!r}?)' if hint else ''
    errors.fail(f'--{given}: the config has no field {field!r}{suggestion}: configs/default.py'
         ' lists every field.', errors.EXIT_BAD_INPUT)
  except flags.Error as e:
    text = str(e)
    if 'config file' in text or 'Attempted' in text:
      errors.fail(_config_error(text, argv), errors.EXIT_BAD_INPUT)
    errors.fail(f'{text.strip().splitlines()[0]}: python -m stompp_jax.main --helpshort lists'
         ' the flags.', errors.EXIT_BAD_INPUT)
