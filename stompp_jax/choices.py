"""Validation of config values, with one-line errors `what is wrong: what to do`.

Imports only the project's error types (stompp_jax/errors.py, a leaf module): a bad value is a
SetupError where it is checked.
"""

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
