"""Data sources: original CIFAR archives (python and binary), tfds mock data, npz, synthetic.

Every fake file is written here in its original format from known pixels and labels; the
sources must read back exactly those.
"""

import dataclasses
import hashlib
import io
import os
import pathlib
import pickle
import tarfile

import numpy as np
import pytest

from configs import default
from stompp_jax import errors
from stompp_jax.data import cifar_archive
from stompp_jax.data import sources
from stompp_jax.data import transforms

# Examples per file in the fake archives (the real ones hold 10,000 or 50,000).
_PER_FILE = 3


def _data_config(**fields):
  config = default.get_config().data
  config.update(fields)
  return config


def _fake_split(dataset, num_examples, seed):
  """Known pixels uint8 (N, 32, 32, 3) and labels: fine (N,) and coarse (N,)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num_examples, 32, 32, 3), dtype=np.uint8)
  fine = rng.integers(0, 10 if dataset == 'cifar10' else 100, size=num_examples)
  coarse = rng.integers(0, 20, size=num_examples)
  return images, fine, coarse


def _chw_rows(images):
  """The CIFAR layout of each image: 1024 R bytes, then G, then B, each row-major."""
  rows = np.empty((len(images), 3072), np.uint8)
  for channel in range(3):
    rows[:, channel * 1024:(channel + 1) * 1024] = images[:, :, :, channel].reshape(-1, 1024)
  return rows


def _file_bytes(fmt, dataset, images, fine, coarse):
  """One file of `fmt` holding these examples, byte for byte as the original format has it."""
  rows = _chw_rows(images)
  if fmt.binary:
    label_columns = [fine] if dataset == 'cifar10' else [coarse, fine]
    records = np.concatenate([np.stack(label_columns, 1).astype(np.uint8), rows], axis=1)
    return records.tobytes()
  batch = {b'batch_label': b'fake', b'data': rows}
  if dataset == 'cifar10':
    batch[b'labels'] = [int(v) for v in fine]
  else:
    batch[b'fine_labels'] = [int(v) for v in fine]
    batch[b'coarse_labels'] = [int(v) for v in coarse]
  return pickle.dumps(batch, protocol=2)


def _write_fake_cifar(directory, dataset, binary, extracted):
  """Writes a fake archive (or its extracted folder); returns {'train'/'test': examples}."""
  fmt = next(f for f in cifar_archive.FORMATS[dataset] if f.binary == binary)
  expected, members = {}, {}
  for split_seed, (split, names) in enumerate((('train', fmt.train_files),
                                                ('test', fmt.test_files))):
    parts = [_fake_split(dataset, _PER_FILE, seed=(split_seed, i)) for i in range(len(names))]
    for name, part in zip(names, parts):
      members[f'{fmt.folder}/{name}'] = _file_bytes(fmt, dataset, *part)
    expected[split] = tuple(np.concatenate(column) for column in zip(*parts))
  os.makedirs(directory, exist_ok=True)
  if extracted:
    os.makedirs(os.path.join(directory, fmt.folder))
    for member, blob in members.items():
      with open(os.path.join(directory, member), 'wb') as f:
        f.write(blob)
  else:
    with tarfile.open(os.path.join(directory, fmt.tarball), 'w:gz') as tar:
      for member, blob in members.items():
        info = tarfile.TarInfo(member)
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
  return expected


def _read_all(source):
  examples = [source[i] for i in range(len(source))]
  return (np.stack([e['image'] for e in examples]),
          np.array([e['label'] for e in examples]))


@pytest.mark.parametrize('extracted', [False, True], ids=['tarball', 'extracted'])
@pytest.mark.parametrize('binary', [False, True], ids=['python', 'binary'])
@pytest.mark.parametrize('dataset,label_kind', [
    ('cifar10', 'fine'), ('cifar100', 'fine'), ('cifar100', 'coarse')])
def test_cifar_archive_reads_exact_pixels_and_labels(tmp_path, dataset, label_kind, binary,
                                                     extracted):
  expected = _write_fake_cifar(str(tmp_path), dataset, binary, extracted)
  config = _data_config(source='cifar_archive', name=dataset, dir=str(tmp_path),
                        download=False, cifar100_labels=label_kind)
  for split, archive_split in (('train', 'train'), ('eval', 'test')):
    images, fine, coarse = expected[archive_split]
    got_images, got_labels = _read_all(sources.make_source(config, split))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, coarse if label_kind == 'coarse' else fine)
  info = sources.describe(config)
  num_files = len(next(f for f in cifar_archive.FORMATS[dataset] if f.binary).train_files)
  assert (info.train_size, info.eval_size) == (num_files * _PER_FILE, _PER_FILE)
  assert info.num_classes == {'cifar10': 10, 'fine': 100, 'coarse': 20}[
      'cifar10' if dataset == 'cifar10' else label_kind]


def test_cifar_pixel_layout_is_rgb_planes(tmp_path):
  """Record bytes at plane c, row y, column x are pixel (y, x, c): checked by hand."""
  fmt = cifar_archive.FORMATS['cifar10'][1]
  folder = tmp_path / fmt.folder
  folder.mkdir()
  record = np.zeros(3073, np.uint8)
  record[0] = 7
  record[1 + 0 * 1024 + 0 * 32 + 1] = 11  # R of row 0, column 1.
  record[1 + 1 * 1024 + 2 * 32 + 0] = 22  # G of row 2, column 0.
  record[1 + 2 * 1024 + 31 * 32 + 31] = 33  # B of the last pixel.
  for name in fmt.train_files + fmt.test_files:
    (folder / name).write_bytes(record.tobytes())
  images, labels = cifar_archive.load_cifar(str(tmp_path), 'cifar10', 'test')
  assert labels.tolist() == [7]
  assert (images[0, 0, 1, 0], images[0, 2, 0, 1], images[0, 31, 31, 2]) == (11, 22, 33)
  assert int(images.sum()) == 11 + 22 + 33


def test_missing_archive_error_says_what_where_and_how(tmp_path):
  config = _data_config(source='cifar_archive', name='cifar100', dir=str(tmp_path),
                        download=False)
  with pytest.raises(errors.SetupError) as error:
    sources.make_source(config, 'train')
  message = str(error.value)
  assert '\n' not in message
  for part in (str(tmp_path), 'cifar-100-python.tar.gz', 'cifar-100-binary.tar.gz',
               'data.download=True', 'data.source=npz'):
    assert part in message


def test_download_failure_keeps_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(cifar_archive, 'URL_BASE', (tmp_path / 'no_server').as_uri() + '/')
  target = tmp_path / 'data'
  with pytest.raises(errors.SetupError, match='downloading .* failed') as error:
    cifar_archive.load_cifar(str(target), 'cifar10', 'train', download=True)
  assert '\n' not in str(error.value)
  assert list(target.iterdir()) == []


def test_download_verifies_checksum_and_leaves_no_partial_file(tmp_path):
  payload = b'archive bytes' * 1000
  served = tmp_path / 'served.tar.gz'
  served.write_bytes(payload)
  target = tmp_path / 'data' / 'cifar-10-python.tar.gz'
  with pytest.raises(errors.SetupError, match='expected 0+; nothing was kept'):
    cifar_archive.download_verified(served.as_uri(), '0' * 32, str(target))
  assert list(target.parent.iterdir()) == []
  cifar_archive.download_verified(served.as_uri(), hashlib.md5(payload).hexdigest(),
                                  str(target))
  assert list(target.parent.iterdir()) == [target]
  assert target.read_bytes() == payload


def _serve_fake_cifar10(tmp_path, monkeypatch):
  """A fake CIFAR-10 python tarball served from tmp_path/server as the official one (its md5
  made the published one); returns (expected examples, its format)."""
  expected = _write_fake_cifar(str(tmp_path / 'server'), 'cifar10', binary=False,
                               extracted=False)
  fmt = cifar_archive.FORMATS['cifar10'][0]
  md5 = hashlib.md5((tmp_path / 'server' / fmt.tarball).read_bytes()).hexdigest()
  monkeypatch.setitem(cifar_archive.FORMATS, 'cifar10', (dataclasses.replace(fmt, md5=md5),))
  monkeypatch.setattr(cifar_archive, 'URL_BASE', (tmp_path / 'server').as_uri() + '/')
  return expected, fmt


def test_download_then_read(tmp_path, monkeypatch):
  """With nothing in data.dir, the archive is fetched, checked, kept and read."""
  expected, fmt = _serve_fake_cifar10(tmp_path, monkeypatch)
  config = _data_config(source='cifar_archive', dir=str(tmp_path / 'data'), download=True)
  images, labels = _read_all(sources.make_source(config, 'eval'))
  np.testing.assert_array_equal(images, expected['test'][0])
  np.testing.assert_array_equal(labels, expected['test'][1])
  assert os.listdir(tmp_path / 'data') == [fmt.tarball]


def test_malformed_archives_raise_one_line_errors(tmp_path):
  fmt = cifar_archive.FORMATS['cifar10'][1]
  (tmp_path / fmt.folder).mkdir()
  for name in fmt.train_files + fmt.test_files:
    (tmp_path / fmt.folder / name).write_bytes(b'\0' * 3000)
  with pytest.raises(errors.SetupError, match='not a positive multiple of the 3073-byte') as error:
    cifar_archive.load_cifar(str(tmp_path), 'cifar10', 'test')
  assert '\n' not in str(error.value)
  other = tmp_path / 'other'
  other.mkdir()
  with tarfile.open(other / 'cifar-100-python.tar.gz', 'w:gz') as tar:
    tar.addfile(tarfile.TarInfo('cifar-100-python/meta'), io.BytesIO(b''))
  with pytest.raises(errors.SetupError, match='lacks cifar-100-python/train'):
    cifar_archive.load_cifar(str(other), 'cifar100', 'train')


def test_python_batches_cannot_run_code(tmp_path):
  fmt = cifar_archive.FORMATS['cifar10'][0]
  (tmp_path / fmt.folder).mkdir()
  for name in fmt.train_files + fmt.test_files:
    (tmp_path / fmt.folder / name).write_bytes(pickle.dumps(os.getcwd, protocol=2))
  with pytest.raises(errors.SetupError, match='refusing to load'):
    cifar_archive.load_cifar(str(tmp_path), 'cifar10', 'test')


@pytest.mark.parametrize('dataset,label_kind,label_key', [
    ('cifar10', 'fine', 'label'), ('cifar100', 'coarse', 'coarse_label')])
def test_tfds_mock_data_through_data_source(tmp_path, dataset, label_kind, label_key):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _data_config(source='tfds', name=dataset, dir=str(tmp_path),
                        cifar100_labels=label_kind)
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=6):
    reference = tfds.data_source(dataset, split='test', download=False)
    source = sources.make_source(config, 'eval')
    images, labels = _read_all(source)
    info = sources.describe(config)
  assert len(source) == 6 and (info.train_size, info.eval_size) == (6, 6)
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, np.stack([reference[i]['image'] for i in range(6)]))
  np.testing.assert_array_equal(labels, [int(reference[i][label_key]) for i in range(6)])
  assert repr(source) == (f'TfdsSource({dataset}, split=test, data_dir={tmp_path}, '
                          f'label={label_key})')


def test_tfds_missing_dataset_error(tmp_path):
  config = _data_config(source='tfds', name='cifar10', dir=str(tmp_path))
  with pytest.raises(errors.SetupError, match='array_record format not found') as error:
    sources.make_source(config, 'train')
  assert str(tmp_path) in str(error.value) and '\n' not in str(error.value)


def _write_npz(directory, split_sizes, shape=(8, 6, 3)):
  expected = {}
  for seed, (name, size) in enumerate(split_sizes.items()):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(size,) + shape, dtype=np.uint8)
    labels = rng.integers(0, 10, size=size)
    np.savez_compressed(os.path.join(directory, name), image=images, label=labels)
    expected[name] = images, labels
  return expected


def test_npz_source_reads_exact_arrays_and_describes_from_headers(tmp_path):
  expected = _write_npz(str(tmp_path), {'train.npz': 7, 'test.npz': 5})
  config = _data_config(source='npz', name='cifar10', dir=str(tmp_path))
  for split, name in (('train', 'train.npz'), ('eval', 'test.npz')):
    images, labels = _read_all(sources.make_source(config, split))
    np.testing.assert_array_equal(images, expected[name][0])
    np.testing.assert_array_equal(labels, expected[name][1])
  assert sources.describe(config) == sources.DatasetInfo('cifar10', 10, (8, 6, 3), 7, 5)


def test_npz_dir_defaults_to_environment_variable(tmp_path, monkeypatch):
  _write_npz(str(tmp_path), {'train.npz': 2, 'test.npz': 3})
  monkeypatch.setenv('STOMPP_DATA_DIR', str(tmp_path))
  assert len(sources.make_source(_data_config(source='npz', dir=''), 'eval')) == 3


@pytest.mark.parametrize('arrays,match', [
    ({'image': np.zeros((2, 4, 4, 3), np.uint8)}, 'label'),
    ({'image': np.zeros((2, 4, 4, 3), np.float32), 'label': np.zeros(2)}, 'not uint8'),
    ({'image': np.zeros((2, 4, 4, 3), np.uint8), 'label': np.zeros(3)}, r'\(N,\)'),
    ({'image': np.zeros((2, 4, 4, 3), np.uint8), 'label': np.array([0, 10])}, 'outside'),
    ({'image': np.zeros((2, 4, 4, 3), np.uint8), 'label': np.array([0.2, 0.7])},
     r'labels are float64, not integers: store the class indices in \[0, 10\) as integers'),
])
def test_malformed_npz_raises_one_line_error(tmp_path, arrays, match):
  np.savez(tmp_path / 'train.npz', **arrays)
  np.savez(tmp_path / 'test.npz', **arrays)
  config = _data_config(source='npz', dir=str(tmp_path))
  for read in (lambda: sources.make_source(config, 'train'), lambda: sources.describe(config)):
    with pytest.raises(errors.SetupError, match=match) as error:
      read()
    assert '\n' not in str(error.value) and str(tmp_path) in str(error.value)


def test_missing_npz_error(tmp_path):
  with pytest.raises(errors.SetupError, match='train.npz not found') as error:
    sources.make_source(_data_config(source='npz', dir=str(tmp_path)), 'train')
  assert str(tmp_path) in str(error.value)


def test_synthetic_source_is_deterministic_and_learnable():
  config = _data_config(source='synthetic', synthetic_image_shape=(6, 5, 2),
                        synthetic_num_classes=4, synthetic_train_size=400,
                        synthetic_eval_size=200)
  train = sources.make_source(config, 'train')
  again = sources.make_source(config, 'train')
  assert repr(train) == repr(again)
  first = train[3]
  assert first['image'].shape == (6, 5, 2) and first['image'].dtype == np.uint8
  np.testing.assert_array_equal(first['image'], again[3]['image'])
  train_images, train_labels = _read_all(train)
  eval_images, eval_labels = _read_all(sources.make_source(config, 'eval'))
  assert set(train_labels.tolist()) == {0, 1, 2, 3}
  assert not np.array_equal(train_images[:200], eval_images)
  # Nearest class-mean color, fit on train, is far above chance (25%) on eval.
  class_means = np.stack([train_images[train_labels == c].mean((0, 1, 2)) for c in range(4)])
  distances = ((eval_images.mean((1, 2))[:, None] - class_means[None]) ** 2).sum(-1)
  assert (distances.argmin(1) == eval_labels).mean() > 0.9
  with pytest.raises(IndexError):
    train[400]


@pytest.mark.parametrize('field,value,listed', [
    ('source', 'csv', 'tfds, cifar_archive, npz, synthetic'),
    ('name', 'mnist', 'cifar10, cifar100, imagenet2012'),
    ('cifar100_labels', 'medium', 'fine or coarse'),
])
def test_unknown_names_list_the_valid_ones(field, value, listed):
  with pytest.raises(errors.SetupError, match=listed):
    sources.make_source(_data_config(**{field: value}), 'train')


def test_each_dataset_states_every_fact_consistently():
  """DATASETS is the one table: each dataset names an augmentation data.augment=auto may pick,
  a mean and std in [0, 1] units per stored channel, and both splits (sized or None)."""
  for name, dataset in sources.DATASETS.items():
    assert dataset.auto_augment in transforms.AUGMENTS and dataset.auto_augment != 'auto', name
    mean, std = dataset.mean_std
    assert len(mean) == len(std) == dataset.image_shape[-1], name
    assert all(0 < value < 1 for value in mean + std), name
    assert set(dataset.tfds_splits) == set(sources.SPLITS), name
    assert dataset.split_sizes is None or len(dataset.split_sizes) == len(sources.SPLITS), name


def test_the_dataset_table_of_the_docs_is_the_codes():
  """docs/data.md's "Datasets" rows state DATASETS (sizes of the digits: their files)."""
  text = (pathlib.Path(__file__).parents[1] / 'docs' / 'data.md').read_text()
  rows = {cells[0]: cells for line in text.splitlines() if line.startswith('| ')
          for cells in [[c.strip() for c in line.strip('|').split('|')]] if len(cells) == 7}
  numbers = lambda cell: tuple(tuple(float(v) for v in part.split(',')) for part in
                               cell.split(' (')[0].split(' / '))
  for name, dataset in sources.DATASETS.items():
    key = next(k for k in rows if k.startswith(f'`{name}`'))
    classes, shape, sizes, eval_split, augment, normalization = rows[key][1:]
    assert classes.split()[0] == str(dataset.num_classes), name
    if None not in dataset.image_shape:
      assert shape == 'x'.join(map(str, dataset.image_shape)), name
    info = dataset.split_sizes is None and sources.describe(
        _data_config(source='npz', name=name, dir=sources.BUILTIN_DIRS[name]))
    split_sizes = dataset.split_sizes or (info.train_size, info.eval_size)
    assert sizes == ' / '.join(f'{n:,}' for n in split_sizes), name
    assert eval_split == f'`{dataset.tfds_splits["eval"]}`', name
    assert augment == f'`{dataset.auto_augment}`', name
    assert numbers(normalization) == dataset.mean_std, name
  synthetic = numbers(rows['with `data.source=synthetic`'][-1])
  assert synthetic == tuple((v,) for v in sources.SYNTHETIC_MEAN_STD)


def test_cifar_archive_has_no_imagenet(tmp_path):
  with pytest.raises(errors.SetupError, match='use data.source=tfds for imagenet2012'):
    sources.make_source(_data_config(source='cifar_archive', name='imagenet2012',
                                     dir=str(tmp_path)), 'train')


def test_jpeg_copy_of_cifar10_when_available():
  directory = os.environ.get('STOMPP_DATA_DIR')
  if not directory or not os.path.isfile(os.path.join(directory, 'train.npz')):
    pytest.skip('set STOMPP_DATA_DIR to a directory with train.npz/test.npz, e.g. the '
                'CIFAR-10 (JPEG copy) in ../shared/data/cifar10_jpeg')
  info = sources.describe(_data_config(source='npz', name='cifar10', dir=directory))
  assert info == sources.DatasetInfo('cifar10', 10, (32, 32, 3), 50_000, 10_000)


def _fake_prepared_tfds(directory, name, version='3.0.2'):
  """The files tfds writes for a dataset prepared in array_record format (empty shards)."""
  folder = os.path.join(directory, name, version)
  os.makedirs(folder)
  for file_name in ('dataset_info.json', f'{name}-train.array_record-00000-of-00001'):
    with open(os.path.join(folder, file_name), 'w', encoding='utf-8') as f:
      f.write('{}')


def test_auto_source_reads_the_original_archive_when_no_tfds_dataset_is_prepared(tmp_path):
  expected = _write_fake_cifar(str(tmp_path), 'cifar100', binary=False, extracted=False)
  config = _data_config(source='auto', name='cifar100', dir=str(tmp_path), download=False)
  assert sources.resolved_source(config) == 'cifar_archive'
  images, labels = _read_all(sources.make_source(config, 'eval'))
  np.testing.assert_array_equal(images, expected['test'][0])
  np.testing.assert_array_equal(labels, expected['test'][1])
  line = sources.summary_line(config, sources.describe(config))
  assert line.startswith(f'cifar100 (cifar_archive in {tmp_path}; data.source=auto found no '
                         'prepared tfds dataset there)'), line


def test_auto_source_prefers_a_prepared_tfds_dataset(tmp_path):
  _write_fake_cifar(str(tmp_path), 'cifar10', binary=False, extracted=False)
  config = _data_config(source='auto', name='cifar10', dir=str(tmp_path))
  assert sources.resolved_source(config) == 'cifar_archive'
  _fake_prepared_tfds(str(tmp_path), 'cifar100')  # Another dataset's files do not count.
  assert sources.resolved_source(config) == 'cifar_archive'
  _fake_prepared_tfds(str(tmp_path), 'cifar10')
  assert sources.resolved_source(config) == 'tfds'
  info = sources.DatasetInfo('cifar10', 10, (32, 32, 3), 50_000, 10_000)
  assert 'tfds in' in sources.summary_line(config, info)
  assert 'data.source=auto found a prepared tfds dataset there' in sources.summary_line(config,
                                                                                         info)


def test_auto_source_downloads_the_archive_on_a_fresh_machine(tmp_path, monkeypatch):
  """No tfds dataset, no archive, data.download=True: the checksummed download runs."""
  expected, fmt = _serve_fake_cifar10(tmp_path, monkeypatch)
  config = _data_config(source='auto', dir=str(tmp_path / 'data'), download=True)
  assert sources.requirement(config) is None
  _, labels = _read_all(sources.make_source(config, 'eval'))
  np.testing.assert_array_equal(labels, expected['test'][1])
  assert os.listdir(tmp_path / 'data') == [fmt.tarball]


@pytest.mark.parametrize('fields,needed', [
    (dict(source='auto', name='cifar100'), None),
    (dict(source='cifar_archive', download=False), 'the original cifar10 archive in'),
    (dict(source='tfds', name='cifar100'), 'cifar100 prepared by tfds in array_record format'),
    (dict(source='auto', name='imagenet2012'), 'imagenet2012 prepared by tfds'),
    (dict(source='npz'), 'train.npz and test.npz in'),
    (dict(source='npz', name='digits', dir=sources.BUILTIN_DIRS['digits']), None),
    (dict(source='synthetic'), None),
])
def test_requirement_names_what_a_fresh_machine_lacks(tmp_path, fields, needed):
  config = _data_config(**{'dir': str(tmp_path), **fields})
  got = sources.requirement(config)
  assert got == needed if needed is None else needed in got


@pytest.mark.parametrize('source', ['tfds', 'auto'])
def test_a_bucket_with_the_tfds_source_is_refused_before_reading_naming_the_mount(source):
  config = _data_config(source=source, name='imagenet2012', dir='gs://bucket/tensorflow_datasets')
  with pytest.raises(errors.SetupError, match='mount-data') as error:
    sources.check_data_config(config)
  assert '/mnt/stompp_data/tensorflow_datasets' in str(error.value)
  assert '\n' not in str(error.value)


def test_local_sources_refuse_a_bucket():
  with pytest.raises(errors.SetupError, match='reads a local directory'):
    sources.check_data_config(_data_config(source='cifar_archive', dir='gs://bucket/cifar'))
