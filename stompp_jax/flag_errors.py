"""One-line errors for the flags and arguments of the absl command lines (exit status 2).

absl reports a bad flag, and ml_collections a bad --config file or override, with exceptions
whose text is written for developers (a traceback of the config file, `AttributeError: ...`),
and `app.UsageError` prints the whole usage text. `parse_flags` is absl's flag parsing
(`app.run(..., flags_parser=parse_flags)`) that prints `Error: what is wrong: what to do`
instead; `run(main, command)` is `app.run` with it.
"""

import functools
import os
import re
from typing import Any, Callable

from absl import app
from absl import flags

from stompp_jax import errors


def _given_config(argv: list[str]) -> str:
  """The value of --config in `argv` as absl parses it (--config=X, --config X, -config X...),
  or '' when there is none."""
  config_only = flags.FlagValues()
  flags.DEFINE_string('config', '', 'The --config flag alone.', flag_values=config_only)
  config_only(argv, known_only=True)
  return config_only.config


def _config_error(text: str, argv: list[str]) -> str:
  """One line for an error of --config's file: missing, or its get_config(arg) refused arg."""
  given = _given_config(argv)
  path = given.partition(':')[0]
  if not os.path.isfile(path):
    return (f'--config={given}: no config file {path!r}: give a file of configs/ (e.g.'
            ' --config=configs/default.py or --config=configs/cifar.py:model=resnet20).')
  raised = re.findall(r'^\w*(?:Error|Exception): (.+)$', text, re.M)
  cause = raised[-1] if raised else text.strip().splitlines()[-1]
  return f'--config={given}: {cause}'


def parse_flags(argv: list[str], command: str = 'python -m stompp_jax.main') -> list[str]:
  """absl's flag parsing with one-line errors (exit 2): a missing config file, an argument its
  get_config refuses, an unknown flag or a bad flag value, an override of a config field that
  does not exist (ml_collections raises AttributeError or KeyError from inside the parser), and
  any argument that is not a flag (`command` takes flags only).

  Returns:
    [argv[0]], what absl passes on to `main`.
  """
  try:
    remaining = flags.FLAGS(argv)
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if config is not None:  # None: the command's --config is optional and not given.
      config.keys()  # ml_collections reports a missing config file when it is read.
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
    missing = re.search(r'Flag --(\w+) must have a value other than None', text)
    if missing:
      errors.fail(f'--{missing.group(1)} is required: {command} --helpshort lists the flags.',
                  errors.EXIT_BAD_INPUT)
    errors.fail(f'{text.strip().splitlines()[0]}: {command} --helpshort lists the flags.',
                errors.EXIT_BAD_INPUT)
  if len(remaining) > 1:
    errors.fail(f'Unexpected arguments {" ".join(remaining[1:])!r}: {command} takes flags only'
                ' (--flag=value); --helpshort lists them.', errors.EXIT_BAD_INPUT)
  return remaining


def run(main: Callable[[list[str]], Any], command: str) -> None:
  """`app.run(main)` with `parse_flags`'s one-line errors, `command` (e.g. 'python -m
  stompp_jax.evaluate') naming the command line in them."""
  app.run(main, flags_parser=functools.partial(parse_flags, command=command))
