r"""Input pipeline throughput (images/s) on this machine's CPU.

    python -m benchmarks.input_pipeline --data_dir=DIR [--workers=0,2]   # from the repo root

CIFAR: the train pipeline exactly as training runs it (shuffle, random crop with 4-pixel
padding, flip, normalization, batch 256) from DIR/train.npz, e.g. the CIFAR-10 (JPEG copy) in
../shared/data/cifar10_jpeg; with no DIR (flag or $STOMPP_DATA_DIR) it uses synthetic
32x32x3 images. ImageNet-style: JPEG decoding + random-resized crop 224 + flip (train) and
central crop resized to 224 (eval) of synthetic 500x375 JPEGs (about ImageNet's average size),
batch 64.

`workers=0` rows run in this process with no prefetch thread and also report images per CPU
second of that one core, which other load on the machine hardly changes; rows with N worker
processes report the total and the total / N. Start-up batches are not timed.
Takes about a minute on a 2-core VM.
"""

import io
import json
import os
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from configs import default
from stompp_jax.data import pipeline
from stompp_jax.data import sources
from stompp_jax.data import transforms

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Directory with train.npz/test.npz; '
                                'default $STOMPP_DATA_DIR, else synthetic CIFAR-like images.')
_BATCHES = flags.DEFINE_integer('batches', 40, 'Timed CIFAR batches (of 256).')
_IMAGENET_BATCHES = flags.DEFINE_integer('imagenet_batches', 12,
                                         'Timed ImageNet-style batches (of 64).')
_WORKERS = flags.DEFINE_list('workers', ['0', str(os.cpu_count())],
                             'grain worker counts to measure.')


def _throughput(iterator, num_batches: int, num_workers: int) -> tuple[float, float]:
  """(images per wall-clock second, images per CPU second of this process), after warm-up
  batches that cover the start of every worker."""
  for _ in range(1 + 2 * num_workers):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  images = sum(len(next(iterator)['label']) for _ in range(num_batches))
  rates = images / (time.perf_counter() - wall), images / (time.process_time() - cpu)
  iterator.close()
  return rates


def _cifar_iterator(data_dir: str | None, num_workers: int):
  config = default.get_config().data
  if data_dir:
    config.update({'source': 'npz', 'name': 'cifar10', 'dir': data_dir})
  else:
    config.update({'source': 'synthetic', 'augment': 'cifar',
                   'synthetic_train_size': 50_000})
  config.update({'num_workers': num_workers, 'prefetch': 2 if num_workers else 0})
  return pipeline.make_train_iterator(config, global_batch_size=256, seed=0,
                                      process_index=0, process_count=1)


def _synthetic_jpegs(count: int = 32, width: int = 500, height: int = 375) -> list[bytes]:
  """Smooth random pictures with fine noise, JPEG quality 90 (roughly ImageNet file sizes)."""
  rng = np.random.default_rng(0)
  encoded = []
  for _ in range(count):
    coarse = rng.integers(0, 256, size=(height // 25, width // 25, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                       Image.Resampling.BICUBIC))
    noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format='JPEG', quality=90)
    encoded.append(buffer.getvalue())
  return encoded


def _imagenet_style_iterator(jpegs: list[bytes], train: bool, num_workers: int):
  images = [jpegs[i % len(jpegs)] for i in range(1024)]
  source = sources.ArraySource(images, np.zeros(len(images), np.int64), 'synthetic JPEGs')
  prep = transforms.preprocessing('imagenet2012', 'imagenet' if train else 'none', 224,
                                  (None, None, 3))
  batches = pipeline.train_batches(source, prep, local_batch=64, seed=0, process_index=0,
                                   process_count=1)
  return pipeline.TrainIterator(batches, num_workers=num_workers,
                                prefetch=2 if num_workers else 0, fingerprint={})


def main(argv):
  del argv
  data_dir = _DATA_DIR.value or os.environ.get('STOMPP_DATA_DIR')
  cifar_name = 'CIFAR-10 (JPEG copy)' if data_dir else 'synthetic 32x32x3'
  jpegs = _synthetic_jpegs()
  print(f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; synthetic JPEGs '
        f'average {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB')
  results = []
  for num_workers in (int(w) for w in _WORKERS.value):
    cases = [
        (f'CIFAR train, {cifar_name}', _cifar_iterator(data_dir, num_workers),
         _BATCHES.value),
        ('ImageNet-style train (decode, RRC 224, flip)',
         _imagenet_style_iterator(jpegs, True, num_workers), _IMAGENET_BATCHES.value),
        ('ImageNet-style eval (decode, center crop 224)',
         _imagenet_style_iterator(jpegs, False, num_workers), _IMAGENET_BATCHES.value),
    ]
    for name, iterator, num_batches in cases:
      wall_rate, cpu_rate = _throughput(iterator, num_batches, num_workers)
      result = {'case': name, 'workers': num_workers, 'img_per_s': round(wall_rate)}
      if num_workers:
        result['img_per_s_per_worker'] = round(wall_rate / num_workers)
        detail = f'{result["img_per_s_per_worker"]} per worker'
      else:
        result['img_per_cpu_s'] = round(cpu_rate)
        detail = f'{result["img_per_cpu_s"]} per CPU-second of one core'
      print(f'{name:46s} workers={num_workers}: {wall_rate:6.0f} img/s ({detail})')
      results.append(result)
  print(json.dumps(results))


if __name__ == '__main__':
  app.run(main)
