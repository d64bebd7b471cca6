"""The errors a user can act on and the exit statuses of the command lines.

Each of these errors carries one sentence, `what is wrong: what to do`; the command lines
(`python -m stompp_jax.main`, `python -m stompp_jax.export`, `python -m stompp_jax.evaluate`)
print it as `Error: <message>` without a traceback and exit with the status of its kind. A check
raises its error where it checks; no exception is reclassified by its type, so any other error
(a bug in a user's model or in this package) keeps its traceback. Nothing here imports the
project.
"""

import errno
import sys

from absl import logging

EXIT_OK = 0
EXIT_ERROR = 1  # Any other failure (after the run started, or not one of the errors below).
EXIT_BAD_INPUT = 2  # Bad input found before anything was written.
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: preempted by SIGTERM after saving; run again.


class SetupError(ValueError):
  """A problem with the config, the data or the workdir, found before the workdir is written."""


class NonFiniteError(FloatingPointError):
  """The loss, the gradients, the new BatchNorm statistics or the train state hold a NaN or an
  infinity."""


class DiskFullError(OSError):
  """A checkpoint could not be written for lack of space; older checkpoints are intact."""

  def __init__(self, message: str):
    super().__init__(message)
    self.errno = errno.ENOSPC


class ForeignCheckpointError(SetupError):
  """The checkpoints of a workdir hold the train state of another model or optimizer."""


# Errors the user can act on: the command lines print their one-line message, no traceback.
USER_ERRORS = (SetupError, NonFiniteError, DiskFullError)

def exit_status(error: BaseException) -> int:
  """The exit status of a user error: bad input before anything was written, or any other."""
  return EXIT_BAD_INPUT if isinstance(error, SetupError) else EXIT_ERROR


def fail(message: str, status: int) -> None:
  """Prints `Error: <message>` on one line to stderr and exits with `status`; the traceback of
  the error being handled, if any, is logged at verbosity 1 (`-v 1`)."""
  logging.debug('The error in full:', exc_info=True)
  print(f'Error: {" ".join(message.split())}', file=sys.stderr, flush=True)
  sys.exit(status)
