"""Validation of config values, with one-line errors `what is wrong: what to do`.

Imports only the project's error types (stompp_jax/errors.py, a leaf module): a bad value is a
SetupError where it is checked.
"""

import math

from stompp_jax.errors import SetupError


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
  """Raises SetupError naming `what` and the valid values when `value` is not one of them."""
  if value not in valid:
    raise SetupError(f'Unknown {what} {value!r}: use one of {", ".join(valid)}.')


def check_at_least(what: str, value: int, minimum: int) -> None:
  """Raises SetupError unless `value` is an integer >= `minimum` (e.g. 1 for a count)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    kind = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
    raise SetupError(f'{what}={value!r} is not {kind}: set {what} to {kind}.')


def check_number(what: str, value, low: float, high: float = math.inf, *, above_low: bool = False,
                 below_high: bool = False, hint: str = '') -> None:
  """Raises SetupError unless `value` is a finite real number from `low` to `high` (excluding
  `low` when `above_low`, `high` when `below_high`); `hint` ends the message (' (0 = off)')."""
  if high == math.inf:
    kind = f'a finite number {">" if above_low else ">="} {low:g}'
  else:
    kind = f'a number in {"(" if above_low else "["}{low:g}, {high:g}{")" if below_high else "]"}'
  fits = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if above_low else value >= low)
          and (value < high if below_high else value <= high))
  if not fits:
    raise SetupError(f'{what}={value!r} is not {kind}: set {what} to {kind}{hint}.')
