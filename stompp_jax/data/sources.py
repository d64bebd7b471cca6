"""Random-access data sources: tfds array_record, original CIFAR archives, npz arrays, synthetic.

`data.source=auto` (the CIFAR family configs) reads a prepared tfds dataset when `data.dir` holds
one, else the original CIFAR archive (downloaded and checksummed when missing): a fresh machine
without TensorFlow trains on CIFAR-10/100. `resolved_source` says which one a config reads, and
the `Data:` line of a run names it.

Every source has `__len__`, `__getitem__(i) -> {'image': uint8 (H, W, C) array or encoded image
bytes, 'label': int}` and a `__repr__` naming what it reads with no memory addresses, so it is
the same in every process (grain worker processes and checkpoints rely on that).
`make_source(data_config, split)` builds the one the config asks for; `describe(data_config)`
gives sizes and shapes without reading images where the format allows.
"""

import dataclasses
import glob
import os
import zipfile

import numpy as np

from stompp_jax import errors
from stompp_jax import storage
from stompp_jax.choices import check_at_least
from stompp_jax.data import cifar_archive

SOURCES = ('tfds', 'cifar_archive', 'npz', 'synthetic', 'auto')
SPLITS = ('train', 'eval')


@dataclasses.dataclass(frozen=True)
class _Dataset:
  """What the code knows about one dataset `data.name` may name: the one home of these facts.

  Attributes:
    num_classes: labels are in [0, num_classes) (cifar100: the fine labels; see num_classes()).
    image_shape: (H, W, C) of the images as stored; H and W None when they vary between images.
    tfds_splits: our split ('train', 'eval') -> the tfds split it reads.
    split_sizes: (train, eval) example counts of the full splits, from the tfds catalog; the TPU
      preflight's stand-in data takes them (they set the step count and cap the eval batch as
      the real data would). None where only the files say (the built-in digits).
    auto_augment: the train augmentation `data.augment=auto` picks (transforms.AUGMENTS).
    mean_std: (mean, std) of the training images' pixels, per channel, in [0, 1] units
      (pixels / 255); the batches are normalized with them. CIFAR: computed over the training
      split; ImageNet: the customary values (as torchvision's); digits:
      stompp_jax/data/builtin/README.md.
  """
  num_classes: int
  image_shape: tuple
  tfds_splits: dict
  split_sizes: tuple | None
  auto_augment: str
  mean_std: tuple


_TRAIN_TEST = {'train': 'train', 'eval': 'test'}
DATASETS = {
    'cifar10': _Dataset(
        num_classes=10, image_shape=(32, 32, 3), tfds_splits=_TRAIN_TEST,
        split_sizes=(50000, 10000), auto_augment='cifar',
        mean_std=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    'cifar100': _Dataset(
        num_classes=100, image_shape=(32, 32, 3), tfds_splits=_TRAIN_TEST,
        split_sizes=(50000, 10000), auto_augment='cifar',
        mean_std=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    'imagenet2012': _Dataset(
        num_classes=1000, image_shape=(None, None, 3),
        tfds_splits={'train': 'train', 'eval': 'validation'},
        split_sizes=(1281167, 50000), auto_augment='imagenet',
        mean_std=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    'digits': _Dataset(  # Built in (BUILTIN_DIRS).
        num_classes=10, image_shape=(8, 8, 1), tfds_splits=_TRAIN_TEST, split_sizes=None,
        auto_augment='none', mean_std=((0.3049,), (0.3757,))),
}
# The synthetic source (data.source=synthetic; dataset_name 'synthetic') has no entry: its class
# count, image shape and split sizes come from data.synthetic_*. data.augment=auto picks no
# augmentation for it, and its images are normalized with one mean and std for every channel, in
# [0, 1] units, roughly those of SyntheticSource's pixels.
SYNTHETIC_AUTO_AUGMENT = 'none'
SYNTHETIC_MEAN_STD = (0.5, 0.25)
# Datasets that ship in the repository as npz files (stompp_jax/data/builtin/README.md):
# read with data.source=npz and data.dir=BUILTIN_DIRS[name].
BUILTIN_DIRS = {'digits': os.path.join(os.path.dirname(os.path.abspath(__file__)), 'builtin',
                                       'digits')}
_CIFAR100_COARSE_CLASSES = 20
_DEFAULT_IMAGENET_SIZE = 224  # Synthetic ImageNet-like images when data.image_size is 0.
_NPZ_FILES = {'train': 'train.npz', 'eval': 'test.npz'}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about the data.

  Attributes:
    name: 'cifar10', 'cifar100', 'imagenet2012', 'digits' or 'synthetic'.
    num_classes: labels are in [0, num_classes).
    image_shape: (H, W, C) of the images: as stored from `describe` (H and W None when they
      vary), after the transforms from `pipeline.dataset_info`.
    train_size, eval_size: examples in the train and eval splits.
  """
  name: str
  num_classes: int
  image_shape: tuple
  train_size: int
  eval_size: int


def summary_line(data_config, info: DatasetInfo) -> str:
  """One line naming what a run reads, e.g. 'digits (npz in DIR): 1437 train / 360 eval
  images of 8x8x1, 10 classes'; with data.source=auto also what it found."""
  source = resolved_source(data_config)
  where = '' if source == 'synthetic' else f' in {data_dir(data_config)}'
  if data_config.source == 'auto':
    found = 'found a' if source == 'tfds' else 'found no'
    where += f'; data.source=auto {found} prepared tfds dataset there'
  shape = 'x'.join('?' if d is None else str(d) for d in info.image_shape)
  return (f'{info.name} ({source}{where}): {info.train_size} train / '
          f'{info.eval_size} eval images of {shape}, {info.num_classes} classes')


def tfds_prepared(directory: str, name: str) -> bool:
  """Whether the tfds data_dir `directory` holds `name` prepared in array_record format
  (`NAME/[CONFIG/]VERSION/dataset_info.json` beside `*.array_record*` shards). Reads no data."""
  if not storage.is_local(directory):
    return False
  for pattern in ('*', '*/*'):
    for info in glob.glob(os.path.join(glob.escape(directory), name, pattern,
                                       'dataset_info.json')):
      if glob.glob(os.path.join(glob.escape(os.path.dirname(info)), '*.array_record*')):
        return True
  return False


def resolved_source(data_config) -> str:
  """The source a run of `data_config` reads: `data.source`, or for `auto` tfds when `data.dir`
  holds a prepared tfds dataset of `data.name` (or is a bucket, or the dataset has no original
  archive here), else cifar_archive."""
  if data_config.source != 'auto':
    return data_config.source
  directory = data_dir(data_config)
  if (data_config.name not in cifar_archive.FORMATS or not storage.is_local(directory)
      or tfds_prepared(directory, data_config.name)):
    return 'tfds'
  return 'cifar_archive'


def check_data_location(data_config) -> None:
  """Refuses a data directory the chosen source cannot read (one-line ValueError), before any
  data is read: a Cloud Storage URI with the tfds source (mount the bucket instead), or any URI
  with the sources that read local files."""
  source = resolved_source(data_config)
  directory = data_dir(data_config)
  if source == 'tfds' and directory.startswith('gs://'):
    raise errors.SetupError(
        f'data.dir={directory}: the pinned array-record cannot read Cloud Storage'
        ' directly: mount the bucket on every host with Cloud Storage FUSE (launch/tpu_vm.sh'
        ' mount-data) and set data.dir to the mounted folder, e.g.'
        ' /mnt/stompp_data/tensorflow_datasets (docs/data.md)')
  if source in ('cifar_archive', 'npz') and not storage.is_local(directory):
    raise errors.SetupError(f'data.source={source} reads a local directory, not '
                            f'{directory}: copy the files to local disk or use data.source=tfds')


def requirement(data_config) -> str | None:
  """What must be put on disk before a run of `data_config` can read its data, as a phrase;
  None when a fresh machine has it or fetches it itself (synthetic, the built-in digits, a CIFAR
  archive with data.download=True). Reads nothing but directory listings."""
  source = resolved_source(data_config)
  directory = data_dir(data_config)
  if source == 'synthetic':
    return None
  if source == 'npz':
    if directory in BUILTIN_DIRS.values():
      return None
    return f'train.npz and test.npz in {directory}'
  if source == 'cifar_archive':
    if data_config.download:
      return None
    return f'the original {data_config.name} archive in {directory}'
  return f'{data_config.name} prepared by tfds in array_record format in {directory}'


def data_dir(data_config) -> str:
  """`data.dir`, else $STOMPP_DATA_DIR, else ~/stompp_data; local paths made absolute."""
  directory = data_config.dir or os.environ.get('STOMPP_DATA_DIR') or '~/stompp_data'
  if not storage.is_local(directory):
    return directory
  return os.path.abspath(os.path.expanduser(directory))


def dataset_name(data_config) -> str:
  """The dataset the config reads: `data.name`, or 'synthetic' for the synthetic source."""
  _validate(data_config)
  return 'synthetic' if data_config.source == 'synthetic' else data_config.name


def describe(data_config) -> DatasetInfo:
  """Sizes, class count and stored image shape; reads only npz headers for the npz source."""
  name = dataset_name(data_config)
  if name == 'synthetic':
    return DatasetInfo(name, _synthetic_num_classes(data_config),
                       _synthetic_shape(data_config), data_config.synthetic_train_size,
                       data_config.synthetic_eval_size)
  if resolved_source(data_config) == 'npz':
    headers = [_npz_header(_npz_path(data_config, split), num_classes(data_config))
               for split in SPLITS]
    shape = headers[0][1:]
    if headers[1][1:] != shape:
      raise errors.SetupError(
          f'train.npz images are {shape} but test.npz images are '
          f'{headers[1][1:]} in {data_dir(data_config)}: both splits need one shape')
    return DatasetInfo(name, num_classes(data_config), shape, headers[0][0], headers[1][0])
  sizes = [len(make_source(data_config, split)) for split in SPLITS]
  return DatasetInfo(name, num_classes(data_config), DATASETS[name].image_shape, *sizes)


def make_source(data_config, split: str):
  """The source of `split` ('train' or 'eval') that `data_config` selects."""
  if split not in SPLITS:
    raise errors.SetupError(f'unknown split {split!r}: use one of {", ".join(SPLITS)}')
  name = dataset_name(data_config)
  if name == 'synthetic':
    size = (data_config.synthetic_train_size if split == 'train'
            else data_config.synthetic_eval_size)
    return SyntheticSource(split, size, _synthetic_shape(data_config),
                           _synthetic_num_classes(data_config))
  directory = data_dir(data_config)
  source = resolved_source(data_config)
  check_data_location(data_config)
  if source == 'tfds':
    coarse = name == 'cifar100' and data_config.cifar100_labels == 'coarse'
    return TfdsSource(name, DATASETS[name].tfds_splits[split], directory,
                      label_key='coarse_label' if coarse else 'label')
  if source == 'cifar_archive':
    if name not in cifar_archive.FORMATS:
      raise errors.SetupError(
          f'data.source=cifar_archive has no {name}: it holds '
          f'{", ".join(cifar_archive.FORMATS)}; use data.source=tfds for {name}')
    images, labels = cifar_archive.load_cifar(
        directory, name, 'train' if split == 'train' else 'test',
        data_config.cifar100_labels, data_config.download)
    where = f'{name} {split} in {directory}'
  else:
    where = _npz_path(data_config, split)
    images, labels = _read_npz(where)
  _check_labels(labels, num_classes(data_config), where)
  return ArraySource(images, labels, where)


class ArraySource:
  """Examples held in memory.

  Args:
    images: uint8 (N, H, W, C), or a sequence of N encoded images (bytes).
    labels: integer (N,).
    origin: what the arrays were read from, for `repr`.
  """

  def __init__(self, images, labels: np.ndarray, origin: str):
    if len(images) != len(labels):
      raise errors.SetupError(f'{origin}: {len(images)} images but {len(labels)} labels')
    self._images = images
    self._labels = np.asarray(labels, dtype=np.int64)
    self._origin = origin

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self._images[index], 'label': int(self._labels[index])}

  def __repr__(self) -> str:
    return f'ArraySource({self._origin}, n={len(self)})'


class TfdsSource:
  """A prepared tfds dataset in array_record format, read with `tfds.data_source`.

  No TensorFlow is involved; a gs:// data_dir is refused before (`check_data_location`: the
  pinned array-record reads buckets only through a gcsfuse mount). ImageNet images stay encoded
  JPEG bytes (decoded later by the transforms in grain workers); CIFAR images come decoded,
  uint8 (32, 32, 3).
  """

  def __init__(self, name: str, split: str, tfds_data_dir: str, label_key: str = 'label'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    decoders = {'image': tfds.decode.SkipDecoding()} if name == 'imagenet2012' else None
    try:
      self._source = tfds.data_source(name, split=split, data_dir=tfds_data_dir,
                                      download=False, decoders=decoders)
    except (OSError, RuntimeError, ValueError, AssertionError) as err:
      raise errors.SetupError(
          f'tfds dataset {name} split {split} in array_record format not found or not readable '
          f'in {tfds_data_dir} ({type(err).__name__}): prepare it with '
          f'file_format=array_record as docs/data.md shows and set data.dir to that tfds '
          f'data_dir (for a gs:// bucket, a gcsfuse mount of it)') from err
    self._name, self._split, self._dir = name, split, tfds_data_dir
    self._label_key = label_key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = self._source[index]
    return {'image': example['image'], 'label': int(example[self._label_key])}

  def __repr__(self) -> str:
    return (f'TfdsSource({self._name}, split={self._split}, data_dir={self._dir}, '
            f'label={self._label_key})')


class SyntheticSource:
  """Deterministic random images whose per-channel mean depends on the class.

  Example i of a split is a fixed function of (split, i): a label uniform over the classes and
  uint8 pixels equal to the class's mean color (per channel in [64, 192), the same for both
  splits) plus uniform noise in [-48, 48]. A small model learns it well above chance.
  """

  _SPLIT_STREAMS = {'train': 1, 'eval': 2}

  def __init__(self, split: str, size: int, image_shape: tuple, num_classes: int):
    self._split, self._size = split, size
    self._shape, self._num_classes = tuple(image_shape), num_classes
    self._class_means = np.random.default_rng(0).integers(
        64, 192, size=(num_classes, image_shape[-1]), dtype=np.int16)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._size:
      raise IndexError(f'index {index} out of range for {self!r}')
    rng = np.random.default_rng((self._SPLIT_STREAMS[self._split], index))
    label = int(rng.integers(self._num_classes))
    noise = rng.integers(-48, 49, size=self._shape, dtype=np.int16)
    return {'image': (noise + self._class_means[label]).astype(np.uint8), 'label': label}

  def __repr__(self) -> str:
    return (f'SyntheticSource(split={self._split}, size={self._size}, '
            f'image_shape={self._shape}, num_classes={self._num_classes})')


def check_data_config(data_config) -> None:
  """Checks `config.data`'s names, sizes and where it reads (one-line ValueErrors); reads no
  data (data.source=auto lists data.dir)."""
  _validate(data_config)
  check_data_location(data_config)
  check_at_least('data.image_size', data_config.image_size, 0)
  check_at_least('data.num_workers', data_config.num_workers, 0)
  check_at_least('data.prefetch', data_config.prefetch, 0)
  check_at_least('data.synthetic_num_classes', data_config.synthetic_num_classes, 0)
  check_at_least('data.synthetic_train_size', data_config.synthetic_train_size, 1)
  check_at_least('data.synthetic_eval_size', data_config.synthetic_eval_size, 1)


def _validate(data_config) -> None:
  if data_config.source not in SOURCES:
    raise errors.SetupError(f'unknown data.source={data_config.source!r}: use one of '
                            f'{", ".join(SOURCES)}')
  if data_config.name not in DATASETS:
    raise errors.SetupError(f'unknown data.name={data_config.name!r}: use one of '
                            f'{", ".join(DATASETS)}')
  if data_config.cifar100_labels not in ('fine', 'coarse'):
    raise errors.SetupError(
        f'unknown data.cifar100_labels={data_config.cifar100_labels!r}: use fine '
        f'or coarse')


def num_classes(data_config) -> int:
  """The class count of `data.name` (and `data.cifar100_labels`)."""
  if data_config.name == 'cifar100' and data_config.cifar100_labels == 'coarse':
    return _CIFAR100_COARSE_CLASSES
  return DATASETS[data_config.name].num_classes


def _synthetic_shape(data_config) -> tuple:
  """`data.synthetic_image_shape`, or () for the shape of `data.name`'s images."""
  shape = tuple(int(d) for d in data_config.synthetic_image_shape)
  if not shape:
    stored = DATASETS[data_config.name].image_shape
    size = data_config.image_size or _DEFAULT_IMAGENET_SIZE
    return tuple(size if d is None else d for d in stored)
  if len(shape) != 3 or min(shape) < 1:
    raise errors.SetupError(f'data.synthetic_image_shape={shape} is not (H, W, C) with positive '
                            f'sizes: set e.g. (32, 32, 3), or () for the shape of data.name')
  return shape


def _synthetic_num_classes(data_config) -> int:
  """`data.synthetic_num_classes`, or 0 for the class count of `data.name`."""
  return data_config.synthetic_num_classes or num_classes(data_config)


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  if not np.issubdtype(labels.dtype, np.integer):
    raise errors.SetupError(f'{where}: labels are {labels.dtype}, not integers: store the class'
                            f' indices in [0, {num_classes}) as integers')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.SetupError(f'{where}: labels span [{labels.min()}, {labels.max()}], outside '
                            f'[0, {num_classes}): check data.name and data.cifar100_labels')


def _npz_path(data_config, split: str) -> str:
  path = os.path.join(data_dir(data_config), _NPZ_FILES[split])
  if not os.path.isfile(path):
    raise errors.SetupError(
        f'{path} not found: data.source=npz needs train.npz and test.npz (keys image uint8 '
        f'(N, H, W, C) and label (N,)) in data.dir or $STOMPP_DATA_DIR; see docs/data.md')
  return path


def _npz_header(path: str, classes: int) -> tuple:
  """(N, H, W, C) of the npz file's `image`, read from its header and checked against its
  `label`, whose values must lie in [0, classes) (the labels are read, the images are not)."""
  shapes = {}
  try:
    with zipfile.ZipFile(path) as archive:
      for key in ('image', 'label'):
        with archive.open(key + '.npy') as member:
          version = np.lib.format.read_magic(member)
          read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
          shapes[key], _, dtype = read(member)
          if key == 'image' and dtype != np.uint8:
            raise ValueError(f'image is {dtype}, not uint8')
  except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
    raise errors.SetupError(f'{path} is not a readable npz with image uint8 (N, H, W, C) and label '
                            f'(N,) ({err}): rewrite it with numpy.savez(path, image=..., label=...)'
                            ) from err
  _check_npz_shapes(path, shapes['image'], shapes['label'])
  with np.load(path) as arrays:
    _check_labels(arrays['label'], classes, path)
  return tuple(shapes['image'])


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, H, W, C), labels (N,) as stored) of one npz file."""
  try:
    with np.load(path) as arrays:
      images, labels = arrays['image'], arrays['label']
  except (KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
    raise errors.SetupError(
        f'{path} is not a readable npz with keys image and label ({err}): rewrite '
        f'it with numpy.savez(path, image=..., label=...)') from err
  if images.dtype != np.uint8:
    raise errors.SetupError(f'{path}: image is {images.dtype}, not uint8: store uint8 pixels')
  _check_npz_shapes(path, images.shape, labels.shape)
  return images, labels


def _check_npz_shapes(path: str, image_shape: tuple, label_shape: tuple) -> None:
  if len(image_shape) != 4 or tuple(label_shape) != tuple(image_shape[:1]):
    raise errors.SetupError(
        f'{path}: image {tuple(image_shape)} and label {tuple(label_shape)} are not '
        f'(N, H, W, C) and (N,): rewrite it with numpy.savez(path, image=..., '
        f'label=...)')
