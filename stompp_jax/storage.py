"""The files of a run directory on any filesystem: local paths and gs:// alike (etils.epath).

`gs://` paths go through gcsfs (fsspec); orbax writes its checkpoints there through tensorstore.
Object stores have no append and no rename, but an object appears whole or not at all:
`write_text` is atomic everywhere (a temporary file and a rename on local disks, one upload on
object stores), and files that grow are `PartLog`s (bounded parts, each rewritten whole).
"""

import os
import tempfile

from etils import epath

from stompp_jax import errors

# A part of a PartLog is closed, and the next begun, once it holds this many bytes: a flush
# uploads at most this much, so logging costs O(total size), never O(size^2).
PART_BYTES = 1 << 20


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as a path object: a local path (made absolute) or a gs:// URI."""
  if is_local(p):
    return epath.Path(os.path.abspath(os.fspath(p)))
  return epath.Path(p)


def is_local(p: str | os.PathLike) -> bool:
  """Whether `p` names a local file (no scheme://)."""
  return '://' not in os.fspath(p)


def check_output_directory(path: str, flag: str) -> None:
  """Refuses a local directory `path` (given as `flag`, e.g. '--workdir') that is a file, lies
  under a file or cannot be created or written; writes nothing. A URI (gs://...) passes.

  Raises:
    errors.SetupError: one line saying which, and what to give instead.
  """
  if not is_local(path):
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.SetupError(f'{flag}={path} is a file, not a directory: give a directory path'
                            ' (it is created if missing).')
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise errors.SetupError(f'{flag}={path} is under {existing}, which is a file: give a'
                            ' directory path (it is created if missing).')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.SetupError(f'{flag}={path}: {existing} is not writable: give a directory you'
                            ' can write to.')


def write_bytes(p: epath.Path, data: bytes) -> None:
  """Writes `data` to `p` so a reader never sees it half-written (parents are created)."""
  p.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(p):
    p.write_bytes(data)  # One upload: the object appears whole or not at all.
    return
  with tempfile.NamedTemporaryFile('wb', dir=os.fspath(p.parent), delete=False,
                                   prefix='.tmp_') as f:
    tmp = f.name
    try:
      f.write(data)
    except BaseException:  # A full disk, say: leave no temporary file behind.
      f.close()
      os.unlink(tmp)
      raise
  os.replace(tmp, os.fspath(p))


def write_text(p: epath.Path, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def read_text(p: epath.Path) -> str | None:
  """The text of `p`, or None when there is no such file."""
  try:
    return p.read_text(encoding='utf-8')
  except FileNotFoundError:
    return None


class PartLog:
  """A growing log stored as parts `directory/{prefix}{k:05d}{suffix}`, k = first_part, ...

  `append` buffers; `flush` rewrites the current part whole (at most PART_BYTES + one record);
  a part past PART_BYTES is closed and the next one begun. Nothing is ever appended to a file,
  and a kill loses only what was appended since the last flush.
  """

  def __init__(self, directory: epath.Path, prefix: str, suffix: str, first_part: int = 0,
               header: bytes = b''):
    """`header` starts every part (e.g. a TensorBoard file-version record)."""
    self._directory, self._prefix, self._suffix = directory, prefix, suffix
    self._part, self._header = first_part, header
    self._buffer = bytearray(header)
    self._dirty = False

  def append(self, data: bytes) -> None:
    self._buffer += data
    self._dirty = True

  def flush(self) -> None:
    if not self._dirty:
      return
    write_bytes(self._directory / f'{self._prefix}{self._part:05d}{self._suffix}',
                bytes(self._buffer))
    self._dirty = False
    if len(self._buffer) >= PART_BYTES:
      self._part += 1
      self._buffer = bytearray(self._header)


def parts(directory: epath.Path, prefix: str, suffix: str) -> list[epath.Path]:
  """The parts of a PartLog in order ([] when there are none)."""
  if not directory.exists():
    return []
  return sorted((p for p in directory.iterdir()
                 if p.name.startswith(prefix) and p.name.endswith(suffix)), key=lambda p: p.name)
