"""The original CIFAR-10/100 archives (python and binary versions): find, download, parse.

A data directory may hold any of, for CIFAR-10 (CIFAR-100 alike, with `cifar-100-*`):
`cifar-10-batches-py/` or `cifar-10-batches-bin/` (extracted folders), or the tarballs
`cifar-10-python.tar.gz` / `cifar-10-binary.tar.gz` (read without extracting). When none is
there, `load_cifar(..., download=True)` fetches the official python tarball over plain HTTPS,
checks its published md5 and keeps it in the directory.

File formats (https://www.cs.toronto.edu/~kriz/cifar.html): python pickles of a dict with
`data` (N, 3072) uint8 and `labels` (CIFAR-10) or `fine_labels`/`coarse_labels` (CIFAR-100);
binary records of 1 label byte (CIFAR-10) or coarse + fine bytes (CIFAR-100) then 3072 pixel
bytes. Pixels are three 32x32 planes R, G, B (CHW), returned here as HWC.
"""

import dataclasses
import functools
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request

import numpy as np

from stompp_jax import errors

URL_BASE = 'https://www.cs.toronto.edu/~kriz/'
_PIXELS = 3 * 32 * 32


@dataclasses.dataclass(frozen=True)
class ArchiveFormat:
  """One published version of one CIFAR dataset.

  Attributes:
    tarball: archive file name, e.g. 'cifar-10-python.tar.gz'.
    folder: the folder the archive extracts to.
    md5: the published md5 of the tarball.
    train_files, test_files: the split's files inside `folder`, read in this order.
    binary: binary records (else python pickles).
  """
  tarball: str
  folder: str
  md5: str
  train_files: tuple[str, ...]
  test_files: tuple[str, ...]
  binary: bool


_CIFAR10_BATCHES = tuple(f'data_batch_{i}' for i in range(1, 6))
# Per dataset, in the order they are looked for; the first one is the one downloaded.
FORMATS = {
    'cifar10': (
        ArchiveFormat('cifar-10-python.tar.gz', 'cifar-10-batches-py',
                      'c58f30108f718f92721af3b95e74349a', _CIFAR10_BATCHES, ('test_batch',),
                      binary=False),
        ArchiveFormat('cifar-10-binary.tar.gz', 'cifar-10-batches-bin',
                      'c32a1d4ab5d03f1284b67883e8d87530',
                      tuple(f + '.bin' for f in _CIFAR10_BATCHES), ('test_batch.bin',),
                      binary=True),
    ),
    'cifar100': (
        ArchiveFormat('cifar-100-python.tar.gz', 'cifar-100-python',
                      'eb9058c3a382ffc7106e4002c42a8d85', ('train',), ('test',), binary=False),
        ArchiveFormat('cifar-100-binary.tar.gz', 'cifar-100-binary',
                      '03b5dce01913d631647c71ecec9e9cb8', ('train.bin',), ('test.bin',),
                      binary=True),
    ),
}
DISPLAY_NAMES = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100'}


@functools.lru_cache(maxsize=4)
def load_cifar(directory: str, dataset: str, split: str, label_kind: str = 'fine',
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of CIFAR-10/100 from the original files in `directory`.

  Args:
    directory: local directory holding (or receiving) the archive or its extracted folder.
    dataset: 'cifar10' or 'cifar100'.
    split: 'train' or 'test'.
    label_kind: CIFAR-100 only: 'fine' (100 classes) or 'coarse' (20 superclasses).
    download: fetch the python tarball when nothing is found.

  Returns:
    images: uint8 (N, 32, 32, 3), read-only; labels: int64 (N,), read-only. Cached, so the
    dataset description and the pipeline read the files once.
  """
  fmt, location = _locate(directory, dataset, download)
  names = fmt.train_files if split == 'train' else fmt.test_files
  blobs = _read_members(location, fmt, names)
  parse = _parse_binary if fmt.binary else _parse_pickle
  parts = [parse(blob, dataset, label_kind, where=f'{location}:{name}')
           for name, blob in zip(names, blobs)]
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def is_present(directory: str, dataset: str) -> bool:
  """Whether `directory` holds one of `dataset`'s archives or extracted folders (no download)."""
  return _find(directory, dataset) is not None


def _find(directory: str, dataset: str) -> tuple[ArchiveFormat, str] | None:
  """The first format found in `directory` and its path (folder or tarball), or None."""
  for fmt in FORMATS[dataset]:
    for candidate in (fmt.folder, fmt.tarball):
      path = os.path.join(directory, candidate)
      if os.path.exists(path):
        return fmt, path
  return None


def _locate(directory: str, dataset: str, download: bool) -> tuple[ArchiveFormat, str]:
  """Returns the first format found in `directory` and its path, downloading if asked."""
  found = _find(directory, dataset)
  if found is not None:
    return found
  formats = FORMATS[dataset]
  looked_for = ', '.join(f'{f.tarball}, {f.folder}/' for f in formats)
  name = DISPLAY_NAMES[dataset]
  if not download:
    raise errors.SetupError(
        f'{name} not found in {directory} (looked for {looked_for}): put one there '
        f'(https://www.cs.toronto.edu/~kriz/cifar.html), set data.download=True, or set '
        f'data.source=npz or tfds')
  fmt = formats[0]
  path = os.path.join(directory, fmt.tarball)
  url = URL_BASE + fmt.tarball
  try:
    download_verified(url, fmt.md5, path)
  except OSError as err:
    raise errors.SetupError(
        f'{name} not found in {directory} (looked for {looked_for}) and downloading '
        f'{url} failed ({err}): copy {fmt.tarball} there by hand, or set '
        f'data.source=npz or tfds') from err
  return fmt, path


def download_verified(url: str, md5: str, path: str) -> None:
  """Downloads `url` to `path` if its md5 is `md5`; never leaves a partial or bad file.

  The bytes go to a temporary file next to `path`, renamed to `path` only after the checksum
  matched. Raises OSError when the transfer fails, ValueError on a wrong checksum.
  """
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  handle, partial = tempfile.mkstemp(dir=os.path.dirname(path) or '.',
                                     prefix=os.path.basename(path) + '.', suffix='.part')
  try:
    digest = hashlib.md5()
    with os.fdopen(handle, 'wb') as out, urllib.request.urlopen(url, timeout=60) as response:
      while chunk := response.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
    if digest.hexdigest() != md5:
      raise errors.SetupError(
          f'{url} downloaded with md5 {digest.hexdigest()}, expected {md5}; nothing was kept '
          f'in {os.path.dirname(path)}: retry, or copy the archive there by hand')
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _read_members(location: str, fmt: ArchiveFormat, names: tuple[str, ...]) -> list[bytes]:
  """Returns the bytes of `fmt.folder/<name>` for each name, from a folder or a tarball."""
  if os.path.isdir(location):
    blobs = []
    for name in names:
      path = os.path.join(location, name)
      if not os.path.isfile(path):
        raise errors.SetupError(
            f'{path} is missing: {location} is not a complete extracted {fmt.tarball}; '
            f'delete it and extract the archive again')
      with open(path, 'rb') as f:
        blobs.append(f.read())
    return blobs
  wanted = {f'{fmt.folder}/{name}': name for name in names}
  found = {}
  try:
    with tarfile.open(location, 'r:*') as tar:
      for member in tar:
        if member.name in wanted and member.isfile():
          found[wanted[member.name]] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError) as err:
    raise errors.SetupError(f'{location} is not a readable tar archive ({err}): delete it and '
                            f'download {fmt.tarball} again (md5 {fmt.md5})') from err
  missing = [f'{fmt.folder}/{n}' for n in names if n not in found]
  if missing:
    raise errors.SetupError(f'{location} lacks {", ".join(missing)}: it is not the official '
                            f'{fmt.tarball}; delete it and download it again (md5 {fmt.md5})')
  return [found[n] for n in names]


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles plain containers and numpy arrays, nothing that could run code."""

  _ALLOWED = {
      ('_codecs', 'encode'),  # How Python 3 writes bytes at protocol 2.
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
    return super().find_class(module, name)


def _parse_pickle(blob: bytes, dataset: str, label_kind: str, where: str):
  """Parses one python-version batch: (images uint8 (N,32,32,3), labels int64 (N,))."""
  label_key = b'labels' if dataset == 'cifar10' else f'{label_kind}_labels'.encode()
  try:
    batch = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding='bytes').load()
    data = np.asarray(batch[b'data'], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
  except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
    raise errors.SetupError(
        f'{where} is not a {DISPLAY_NAMES[dataset]} python batch (a pickled dict '
        f'with data and {label_key.decode()}; {err!r}): delete the archive and '
        f'download it again') from err
  if data.ndim != 2 or data.shape[1] != _PIXELS or len(labels) != len(data):
    raise errors.SetupError(
        f'{where} holds data of shape {data.shape} and {len(labels)} labels, not '
        f'(N, {_PIXELS}) and N: delete the archive and download it again')
  return _chw_rows_to_hwc(data), labels


def _parse_binary(blob: bytes, dataset: str, label_kind: str, where: str):
  """Parses one binary-version file: (images uint8 (N,32,32,3), labels int64 (N,))."""
  label_bytes = 1 if dataset == 'cifar10' else 2
  record = label_bytes + _PIXELS
  if not blob or len(blob) % record:
    raise errors.SetupError(
        f'{where} has {len(blob)} bytes, not a positive multiple of the '
        f'{record}-byte {DISPLAY_NAMES[dataset]} record: delete the archive and '
        f'download it again')
  rows = np.frombuffer(blob, dtype=np.uint8).reshape(-1, record)
  label_column = 1 if (dataset == 'cifar100' and label_kind == 'fine') else 0
  return _chw_rows_to_hwc(rows[:, label_bytes:]), rows[:, label_column].astype(np.int64)


def _chw_rows_to_hwc(rows: np.ndarray) -> np.ndarray:
  """(N, 3072) rows of R, G, B 32x32 planes -> contiguous uint8 (N, 32, 32, 3)."""
  return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
