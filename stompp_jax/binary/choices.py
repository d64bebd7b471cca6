"""Validation of config values, with one-line errors `what is wrong: what to do`. No imports."""


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
  """Raises ValueError naming `what` and the valid values when `value` is not one of them."""
  if value not in valid:
    raise ValueError(f'Unknown {what} {value!r}: use one of {", ".join(valid)}.')


def check_at_least(what: str, value: int, minimum: int) -> None:
  """Raises ValueError unless `value` is an integer >= `minimum` (e.g. 1 for a count)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    kind = 'a positive integer' if minimum == 1 else f'an integer >= {minimum}'
    raise ValueError(f'{what}={value!r} is not {kind}: set {what} to {kind}.')
