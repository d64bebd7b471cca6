"""Validation of string options, with one-line errors that list the valid values."""


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
  """Raises ValueError naming `what` and the valid values when `value` is not one of them."""
  if value not in valid:
    raise ValueError(f'Unknown {what} {value!r}: use one of {", ".join(valid)}.')
