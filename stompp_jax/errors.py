"""The errors a user can act on and the exit statuses of the command lines.

Each of these errors carries one sentence, `what is wrong: what to do`; the command lines
(`python -m stompp_jax.main`, `python -m stompp_jax.export`) print it as `Error: <message>`
without a traceback and exit with the status of its kind. Nothing here imports the project.
"""

import contextlib
import errno

EXIT_OK = 0
EXIT_ERROR = 1  # Any other failure (after the run started, or not one of the errors below).
EXIT_BAD_INPUT = 2  # Bad input found before anything was written.
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: preempted by SIGTERM after saving; run again.


class SetupError(ValueError):
  """A problem with the config, the data or the workdir, found before the workdir is written."""


class NonFiniteError(FloatingPointError):
  """The loss, the gradients or the train state hold a NaN or an infinity."""


class DiskFullError(OSError):
  """A checkpoint could not be written for lack of space; older checkpoints are intact."""

  def __init__(self, message: str):
    super().__init__(message)
    self.errno = errno.ENOSPC


class ForeignCheckpointError(ValueError):
  """The checkpoints of a workdir hold the train state of another model or optimizer."""


# Errors the user can act on: the command lines print their one-line message, no traceback.
USER_ERRORS = (SetupError, NonFiniteError, DiskFullError)


@contextlib.contextmanager
def as_setup_errors():
  """Turns the ValueErrors and missing files of config and data checks into SetupError."""
  try:
    yield
  except SetupError:
    raise
  except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    raise SetupError(' '.join(str(e).split())) from e


def exit_status(error: BaseException) -> int:
  """The exit status of a user error: bad input before anything was written, or any other."""
  return EXIT_BAD_INPUT if isinstance(error, SetupError) else EXIT_ERROR
