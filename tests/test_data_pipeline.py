"""grain pipelines: sharding, determinism, resume, eval coverage, transforms.

Examples are identified by their labels: the npz fixtures below give every example of a
CIFAR-100-named dataset its own label, so a batch's labels say which examples it holds.
"""

import io
import json

import grain
import numpy as np
import pytest
from PIL import Image

from configs import default
from stompp_jax import errors
from stompp_jax.data import pipeline
from stompp_jax.data import sources
from stompp_jax.data import transforms


def _data_config(**fields):
  config = default.get_config().data
  config.update(fields)
  return config


@pytest.fixture
def labelled_npz(tmp_path):
  """train.npz with 96 examples and test.npz with 50, example i of a split labelled i."""
  rng = np.random.default_rng(0)
  arrays = {}
  for name, size in (('train', 96), ('test', 50)):
    arrays[name] = rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / f'{name}.npz', image=arrays[name], label=np.arange(size))
  return _data_config(source='npz', name='cifar100', dir=str(tmp_path), prefetch=0), arrays


def _labels(iterator, num_batches):
  return [next(iterator)['label'].tolist() for _ in range(num_batches)]


def _train(config, **kwargs):
  kwargs = {'global_batch_size': 16, 'seed': 3, 'process_index': 0, 'process_count': 1,
            **kwargs}
  return pipeline.make_train_iterator(config, **kwargs)


def test_batches_have_the_promised_shapes_and_types(labelled_npz):
  config, _ = labelled_npz
  batch = next(_train(config, global_batch_size=32, process_index=1, process_count=4))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert pipeline.dataset_info(config) == pipeline.DatasetInfo('cifar100', 100, (32, 32, 3),
                                                                96, 50)


def test_two_processes_get_disjoint_shards_that_cover_the_epoch(labelled_npz):
  config, _ = labelled_npz
  steps = 96 // 16
  shards = [_labels(_train(config, process_index=p, process_count=2), steps) for p in (0, 1)]
  seen = [sum(shard, []) for shard in shards]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(96))
  # The two halves of each step form the global batch a single process would see.
  single = _labels(_train(config), steps)
  assert [a + b for a, b in zip(*shards)] == single


def test_same_seed_same_batches_and_each_epoch_reshuffled(labelled_npz):
  config, _ = labelled_npz
  first, second = _train(config), _train(config)
  for _ in range(3):
    a, b = next(first), next(second)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  epochs = np.array(_labels(_train(config), 12)).reshape(2, 96)
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(96))
  assert not np.array_equal(epochs[0], epochs[1])
  assert _labels(_train(config, seed=4), 6) != epochs[0].reshape(6, 16).tolist()


def test_restored_state_gives_the_same_remaining_batches(labelled_npz):
  config, _ = labelled_npz
  iterator = _train(config)
  _labels(iterator, 4)  # Mid-epoch: 64 of 96 examples seen.
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(4)]  # Crosses into the next epoch.
  restored = _train(config)
  next(restored)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got['image'], want['image'])  # Same augmentation too.
    np.testing.assert_array_equal(got['label'], want['label'])
  # The state does not depend on the process count: two processes resume the same order.
  halves = []
  for p in (0, 1):
    shard = _train(config, process_index=p, process_count=2)
    shard.set_state(state)
    halves.append(_labels(shard, 4))
  assert [a + b for a, b in zip(*halves)] == [w['label'].tolist() for w in expected]


def test_worker_processes_give_the_same_batches_and_resume(labelled_npz):
  config, _ = labelled_npz
  in_process = _train(config)
  expected = [next(in_process) for _ in range(5)]
  config.num_workers, config.prefetch = 2, 2
  workers = _train(config)
  try:
    for want in expected[:2]:
      np.testing.assert_array_equal(next(workers)['image'], want['image'])
    state = workers.get_state()
    workers.set_state(state)
    for want in expected[2:]:
      np.testing.assert_array_equal(next(workers)['image'], want['image'])
  finally:
    workers.close()


def test_state_from_another_data_order_is_refused(labelled_npz):
  config, _ = labelled_npz
  state = _train(config, seed=1).get_state()
  with pytest.raises(errors.SetupError, match='seed 1 -> 3'):
    _train(config).set_state(state)


def test_global_batch_must_split_over_processes(labelled_npz):
  config, _ = labelled_npz
  with pytest.raises(errors.SetupError, match='does not split evenly over 3 processes'):
    _train(config, global_batch_size=16, process_count=3)


@pytest.mark.parametrize('process_count', [1, 3])
def test_eval_sees_every_example_once_with_padding_masked(labelled_npz, process_count):
  config, arrays = labelled_npz
  global_batch = 12  # 50 examples: 5 batches, the last with 10 padding slots.
  per_process = [list(pipeline.make_eval_iterator(config, global_batch_size=global_batch,
                                                  process_index=p,
                                                  process_count=process_count))
                 for p in range(process_count)]
  assert {len(batches) for batches in per_process} == {5}
  real = []
  mean, std = (np.array(v, np.float32) for v in sources.DATASETS['cifar100'].mean_std)
  for batches in per_process:
    for batch in batches:
      assert batch['image'].shape[0] == global_batch // process_count
      keep = batch['mask'] == 1
      assert set(batch['mask'].tolist()) <= {0.0, 1.0}
      for image, label in zip(batch['image'][keep], batch['label'][keep]):
        np.testing.assert_allclose(image, (arrays['test'][label] / 255 - mean) / std,
                                   atol=1e-5)  # Unaugmented, normalized.
        real.append(int(label))
  assert sorted(real) == list(range(50))


def test_synthetic_train_and_eval(tmp_path):
  config = _data_config(source='synthetic', synthetic_image_shape=(8, 8, 1),
                        synthetic_num_classes=3, synthetic_train_size=40,
                        synthetic_eval_size=10, augment='cifar', prefetch=0)
  assert pipeline.dataset_info(config) == pipeline.DatasetInfo('synthetic', 3, (8, 8, 1), 40,
                                                                10)
  batch = next(_train(config, global_batch_size=8))
  assert batch['image'].shape == (8, 8, 8, 1)
  masks = [b['mask'] for b in pipeline.make_eval_iterator(config, global_batch_size=8,
                                                          process_index=0, process_count=1)]
  assert [m.sum() for m in masks] == [8, 2]


def test_cifar_augment_is_a_padded_crop_with_flip():
  image = np.random.default_rng(0).integers(1, 256, size=(32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  crops = {}
  for top in range(9):
    for left in range(9):
      crop = padded[top:top + 32, left:left + 32]
      crops[crop.tobytes()] = (top, left, 0)
      crops[np.ascontiguousarray(crop[:, ::-1]).tobytes()] = (top, left, 1)
  augment = transforms.CifarAugment()
  seen = set()
  for index in range(1500):
    rng = np.random.Generator(np.random.Philox(key=index))
    out = augment.random_map({'image': image, 'label': 5}, rng)
    assert out['label'] == 5 and out['image'].shape == image.shape
    seen.add(crops[np.ascontiguousarray(out['image']).tobytes()])  # KeyError: not a crop.
  assert len(seen) == len(crops) == 162  # Every offset and flip occurs.


def _jpeg(width, height, quality=95):
  """A smooth RGB test picture as JPEG bytes, with its pixels."""
  y, x = np.mgrid[0:height, 0:width]
  pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)],
                    -1).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue(), pixels


def test_eval_center_crop_matches_resize_256_crop_224():
  encoded, pixels = _jpeg(1200, 900)  # Large enough for reduced-scale JPEG decoding.
  out = transforms.CenterCropResize(224).map({'image': encoded, 'label': 1})['image']
  # Reference: shorter side to 256, then the central 224 x 224, from full-size pixels.
  resized = Image.fromarray(pixels).resize((341, 256), Image.Resampling.BILINEAR)
  reference = np.asarray(resized)[16:240, 58:282]
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - reference).mean() < 3


def test_random_resized_crop_shapes_and_determinism():
  encoded, _ = _jpeg(500, 375)
  crop = transforms.RandomResizedCropFlip(64)
  outs = [crop.random_map({'image': encoded, 'label': 0},
                          np.random.Generator(np.random.Philox(key=k)))['image']
          for k in (1, 1, 2)]
  assert outs[0].shape == (64, 64, 3) and outs[0].dtype == np.uint8
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])
  box = crop._random_box((500, 375), np.random.Generator(np.random.Philox(key=0)))
  width, height = box[2] - box[0], box[3] - box[1]
  assert 0 <= box[0] < box[2] <= 500 and 0 <= box[1] < box[3] <= 375
  assert 0.08 * 0.99 <= width * height / (500 * 375) <= 1
  assert 3 / 4 * 0.95 <= width / height <= 4 / 3 * 1.05


def test_imagenet_style_pipeline_on_arrays_and_image_size():
  config = _data_config(source='synthetic', augment='imagenet', image_size=24,
                        synthetic_image_shape=(40, 30, 3), prefetch=0)
  assert pipeline.dataset_info(config).image_shape == (24, 24, 3)
  assert next(_train(config, global_batch_size=4))['image'].shape == (4, 24, 24, 3)
  eval_batch = next(iter(pipeline.make_eval_iterator(config, global_batch_size=4,
                                                     process_index=0, process_count=1)))
  assert eval_batch['image'].shape == (4, 24, 24, 3)


@pytest.mark.parametrize('image_size,side', [(0, 224), (160, 160)])
def test_imagenet_info_from_tfds_without_reading_images(tmp_path, image_size, side):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _data_config(source='tfds', name='imagenet2012', dir=str(tmp_path),
                        image_size=image_size)
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=5):
    info = pipeline.dataset_info(config)
  assert info == pipeline.DatasetInfo('imagenet2012', 1000, (side, side, 3), 5, 5)


@pytest.mark.parametrize('fields,match', [
    ({'augment': 'random'}, 'auto, cifar, imagenet, none'),
    ({'image_size': 24}, 'data.image_size=24 differs'),
])
def test_bad_transform_settings_are_explained(labelled_npz, fields, match):
  config, _ = labelled_npz
  config.update(fields)
  with pytest.raises(ValueError, match=match):
    pipeline.dataset_info(config)


def test_train_iterator_is_a_grain_iterator(labelled_npz):
  config, _ = labelled_npz
  assert isinstance(_train(config), grain.DatasetIterator)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_subset_is_spread_over_a_class_sorted_split(tmp_path, process_count):
  # 10 classes x 10 examples, sorted by class as the npz copy of CIFAR is: the first 16
  # examples would be two classes; the subset of 16 holds every class.
  images = np.zeros((100, 8, 8, 3), np.uint8)
  np.savez(tmp_path / 'test.npz', image=images, label=np.repeat(np.arange(10), 10))
  np.savez(tmp_path / 'train.npz', image=images[:4], label=np.arange(4))
  config = _data_config(source='npz', name='cifar10', dir=str(tmp_path), prefetch=0)
  labels = []
  for p in range(process_count):
    for batch in pipeline.make_eval_iterator(config, global_batch_size=8, process_index=p,
                                             process_count=process_count, max_examples=16):
      assert batch['mask'].tolist() == [1.0] * (8 // process_count)
      labels += batch['label'].tolist()
  assert len(labels) == 16 and set(labels) == set(range(10))
  everything = pipeline.make_eval_iterator(config, global_batch_size=8, process_index=0,
                                           process_count=1, max_examples=0)
  assert sum(int(b['mask'].sum()) for b in everything) == 100
