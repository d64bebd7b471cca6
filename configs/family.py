"""Shared parsing of family-config arguments: 'key=value,key=value'."""

from typing import Mapping


def parse_args(arg: str | None, defaults: Mapping[str, str]) -> dict[str, str]:
  """Parses `arg` over `defaults`; unknown keys are an error listing the valid ones."""
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(f'Bad config argument {item!r}: use key=value with keys {", ".join(defaults)}.')
    values[key] = value
  return values


def apply_method(config, *, mode: str, method: str, order: str, shape: str, refresh: str) -> None:
  """Sets the model mode and the binarization fields shared by every family."""
  config.model.mode = mode
  config.binary.method = method
  config.binary.order = order
  config.binary.shape = shape
  config.binary.refresh_every = int(refresh)
