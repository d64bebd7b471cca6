"""grain input pipelines: shuffled, augmented, per-process train batches; padded, masked eval.

Train. The examples form one endless stream: epoch e is the source in a permutation drawn from
(seed, e); augmentation of stream position j uses randomness drawn from (seed, j). Global batch
k is stream positions [k B, (k + 1) B); process p of P takes its slice
[k B + p B/P, k B + (p + 1) B/P). So the data order is the same for any number of processes
and of worker processes, and the iterator state is just k: a run resumed from a checkpoint,
even on another process or worker count, continues with exactly the batches it would have seen.

Eval. The eval split is padded with blank examples (mask 0) to a multiple of the global batch
and cut the same way, so every example is seen exactly once over all processes and every
process yields the same number of batches. An eval subset of n examples (train.eval_steps) is
drawn across the whole split, every (N // n)-th example, never the first n in source order (a
class-sorted split would give a few classes).
"""

import dataclasses

from absl import flags
import grain
import jax
import numpy as np

from stompp_jax import errors
from stompp_jax.data import sources
from stompp_jax.data import transforms
from stompp_jax.data.sources import DatasetInfo  # Re-exported: the trainer's contract.
from stompp_jax.data.sources import summary_line  # Re-exported: the trainer logs it.


def dataset_info(data_config) -> DatasetInfo:
  """Describes the configured data, reading sizes and headers rather than images if it can."""
  described = sources.describe(data_config)
  return dataclasses.replace(described,
                             image_shape=_preprocessing(data_config, described).image_shape)


def _described_without_images(data_config) -> DatasetInfo:
  """The dataset's description from the one table of datasets (`sources.DATASETS`); the
  synthetic source's from its config, the npz source's from the files' headers."""
  if data_config.source in ('synthetic', 'npz'):
    return dataset_info(data_config)
  name = sources.dataset_name(data_config)
  return DatasetInfo(name, sources.num_classes(data_config), sources.DATASETS[name].image_shape,
                     0, 0)


def input_shape(data_config) -> tuple[int, tuple[int, int, int]]:
  """(num_classes, image_shape after the transforms) without reading an image or a directory."""
  info = _described_without_images(data_config)
  return info.num_classes, tuple(_preprocessing(data_config, info).image_shape)


def normalization(data_config) -> tuple[np.ndarray, np.ndarray]:
  """(offset, scale) float32 (C,) of the batches: image = (uint8 pixels - offset) * scale,
  without reading an image."""
  collate = _preprocessing(data_config, _described_without_images(data_config)).collate
  return collate.offset, collate.scale


def make_train_iterator(data_config, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> 'TrainIterator':
  """Endless iterator over this process's train batches.

  Yields {'image': float32 (B/P, H, W, C) normalized, 'label': int32 (B/P,)}, B the global
  batch and P the process count. `get_state()` / `set_state()` save and restore the position
  (a JSON-serializable dict).
  """
  local_batch, process_index, process_count = _local_batch(
      global_batch_size, process_index, process_count)
  source, prep = _source_and_preprocessing(data_config, 'train')
  batches = train_batches(source, prep, local_batch=local_batch, seed=seed,
                          process_index=process_index, process_count=process_count)
  return TrainIterator(batches, num_workers=data_config.num_workers,
                       prefetch=data_config.prefetch,
                       fingerprint={'seed': int(seed), 'global_batch_size': global_batch_size,
                                    'train_size': len(source)})


def make_eval_iterator(data_config, *, global_batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       split: str = 'eval',
                       max_examples: int = 0) -> grain.IterDataset:
  """Finite, re-iterable eval batches of this process, of `split` ('eval', or 'train' without
  augmentation).

  Yields {'image': float32 (B/P, H, W, C), 'label': int32 (B/P,), 'mask': float32 (B/P,)}
  with mask 1 for real examples and 0 for padding; ceil(N / B) batches on every process.
  `max_examples` > 0 evaluates a subset of that many examples spread over the split.
  """
  _, process_index, process_count = _local_batch(global_batch_size, process_index,
                                                 process_count)
  source, prep = _source_and_preprocessing(data_config, split)
  batches = eval_batches(source, prep, global_batch_size=global_batch_size,
                         process_index=process_index, process_count=process_count,
                         max_examples=max_examples)
  return iter_dataset(batches, data_config.num_workers, data_config.prefetch)


def train_batches(source, prep: transforms.Preprocessing, *, local_batch: int, seed: int,
                  process_index: int, process_count: int) -> grain.MapDataset:
  """Endless MapDataset of this process's train batches; batch k is global batch k's slice."""
  shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  examples = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
  if isinstance(prep.train, grain.transforms.RandomMap):
    examples = examples.random_map(prep.train, seed=augment_seed)
  elif prep.train is not None:
    examples = examples.map(prep.train)
  return examples.batch(local_batch, batch_fn=prep.collate)[process_index::process_count]


def eval_subset(examples: grain.MapDataset, max_examples: int) -> grain.MapDataset:
  """`max_examples` examples spread over the split (every (N // n)-th); all when 0 or >= N."""
  if max_examples <= 0 or max_examples >= len(examples):
    return examples
  return examples[::len(examples) // max_examples][:max_examples]


def eval_batches(source, prep: transforms.Preprocessing, *, global_batch_size: int,
                 process_index: int, process_count: int,
                 max_examples: int = 0) -> grain.MapDataset:
  """This process's ceil(n / B) eval batches (n = N or the subset's size), padded with blank
  examples of mask 0."""
  examples = eval_subset(grain.MapDataset.source(source), max_examples)
  if prep.eval is not None:
    examples = examples.map(prep.eval)
  examples = examples.map(_real)
  padding = -len(examples) % global_batch_size
  if padding:
    blank = {'image': np.zeros(prep.image_shape, np.uint8), 'label': 0, 'mask': 0.0}
    examples = grain.MapDataset.concatenate(
        [examples, grain.MapDataset.source([blank] * padding)])
  local_batch = global_batch_size // process_count
  return examples.batch(local_batch, batch_fn=prep.collate)[process_index::process_count]


def iter_dataset(batches: grain.MapDataset, num_workers: int,
                 prefetch: int) -> grain.IterDataset:
  """Batches read by `num_workers` processes (or a background thread), `prefetch` ahead."""
  if num_workers == 0:
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=min(prefetch, 1),
                                                     prefetch_buffer_size=prefetch))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; tests and notebooks parse none.
  in_worker = batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return in_worker.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)))


class TrainIterator(grain.DatasetIterator):
  """Endless iterator over precomputed-order batches; its state is the batches consumed.

  Args:
    batches: endless MapDataset of this process's batches, batch k = global batch k's slice.
    num_workers: grain worker processes (0 = in this process).
    prefetch: batches prepared ahead.
    fingerprint: JSON values saved with the state and checked on restore (seed, batch size,
      dataset size), so a checkpoint cannot silently resume a different data order.
  """

  def __init__(self, batches: grain.MapDataset, *, num_workers: int, prefetch: int,
               fingerprint: dict):
    super().__init__()
    self._batches = batches
    self._num_workers, self._prefetch = num_workers, prefetch
    self._fingerprint = fingerprint
    self._next_batch = 0
    self._iterator = None

  def __next__(self) -> dict:
    self._assert_not_closed()
    if self._iterator is None:
      self._iterator = iter(iter_dataset(self._batches[self._next_batch:],
                                         self._num_workers, self._prefetch))
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict:
    return {'next_batch': self._next_batch, **self._fingerprint}

  def set_state(self, state: dict) -> None:
    changed = [f'{key} {state.get(key)} -> {value}' for key, value in self._fingerprint.items()
               if state.get(key) != value]
    if changed:
      raise errors.SetupError(
          f'the data iterator state was saved with another data order '
          f'({", ".join(changed)}): resume with the original seed, batch size and '
          f'data, or start a new workdir')
    self._close_workers()
    self._next_batch = int(state['next_batch'])

  def close(self) -> None:
    self._close_workers()
    super().close()

  def _close_workers(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __str__(self) -> str:
    return f'TrainIterator(next_batch={self._next_batch}, {self._fingerprint})'


def _real(example: dict) -> dict:
  """Marks an eval example as real (not padding)."""
  return {**example, 'mask': 1.0}


def _local_batch(global_batch_size: int, process_index: int | None,
                 process_count: int | None) -> tuple[int, int, int]:
  """(per-process batch, process index, process count), defaulting to jax's processes."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise errors.SetupError(
        f'global batch size {global_batch_size} does not split evenly over '
        f'{process_count} processes: use a positive multiple of {process_count}')
  return global_batch_size // process_count, process_index, process_count


def _preprocessing(data_config, described: DatasetInfo) -> transforms.Preprocessing:
  return transforms.preprocessing(described.name, data_config.augment, data_config.image_size,
                                  described.image_shape)


def _source_and_preprocessing(data_config, split: str):
  source = sources.make_source(data_config, split)
  if not len(source):
    raise errors.SetupError(f'{source!r} has no examples: check data.dir and the {split} split')
  return source, _preprocessing(data_config, sources.describe(data_config))
