"""Per-example image transforms (grain transforms) and the normalizing batch function.

Train augmentation (`data.augment`):
  cifar     random 32x32 crop of the image zero-padded by 4 pixels per side, random horizontal
            flip (any H x W: the crop keeps the stored size);
  imagenet  random-resized crop (area 8%-100%, aspect 3/4-4/3) to image_size, random flip;
  none      no augmentation: the eval transform;
  auto      the one `sources.DATASETS` names for the dataset (none for synthetic data).
Batches are normalized with the dataset's mean and std from the same table.
Eval never augments: stored images pass unchanged, or, where images are resized (ImageNet, or
augment=imagenet), the central crop of 224/256 of the shorter side is resized to image_size
(the standard "resize 256, center crop 224", scaled with image_size).
Encoded images (JPEG bytes) are decoded here, i.e. in grain workers; JPEGs decode at the
smallest DCT scale that still covers the crop at full output resolution.
Random transforms take grain's per-example `np.random.Generator`, seeded from the pipeline seed
and the example's position in the stream, so augmentation does not depend on worker count.
"""

import dataclasses
import io
import math

import grain
import numpy as np
from PIL import Image

from stompp_jax import errors
from stompp_jax.data import sources

AUGMENTS = ('auto', 'cifar', 'imagenet', 'none')
EVAL_CROP_FRACTION = 224 / 256
_DEFAULT_RESIZED_SIZE = 224


@dataclasses.dataclass(frozen=True)
class CifarAugment(grain.transforms.RandomMap):
  """Random crop of the zero-padded image at the stored size, then a random horizontal flip.

  Same as padding `padding` zeros on each side of a uint8 (H, W, C) image and cropping (H, W)
  at a uniform offset, without building the padded image.
  """
  padding: int = 4

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    image = example['image']
    height, width = image.shape[:2]
    dy, dx, flip = rng.integers((-self.padding, -self.padding, 0),
                                (self.padding + 1, self.padding + 1, 2))
    shifted = np.zeros_like(image)
    shifted[_target_rows(dy, height), _target_rows(dx, width)] = (
        image[_source_rows(dy, height), _source_rows(dx, width)])
    if flip:
      shifted = shifted[:, ::-1]
    return {**example, 'image': shifted}


def _target_rows(shift: int, size: int) -> slice:
  """Rows i of the output with 0 <= i + shift < size."""
  return slice(max(0, -shift), size - max(0, shift))


def _source_rows(shift: int, size: int) -> slice:
  """Rows i + shift of the input that land in the output."""
  return slice(max(0, shift), size - max(0, -shift))


@dataclasses.dataclass(frozen=True)
class RandomResizedCropFlip(grain.transforms.RandomMap):
  """Inception-style crop: a random box of `scale` x area and `ratio` aspect, resized to
  (size, size) bilinearly, then a random horizontal flip. Image: uint8 array or encoded bytes
  -> uint8 (size, size, C)."""
  size: int
  scale: tuple = (0.08, 1.0)
  ratio: tuple = (3 / 4, 4 / 3)
  attempts: int = 10

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    image = _open(example['image'])
    pixels = _crop_resize(image, self._random_box(image.size, rng), self.size)
    if rng.integers(2):
      pixels = pixels[:, ::-1]
    return {**example, 'image': pixels}

  def _random_box(self, image_size: tuple, rng: np.random.Generator) -> tuple:
    """(left, top, right, bottom) in pixels; the central crop of clamped aspect as a fallback."""
    width, height = image_size
    log_ratio = np.log(self.ratio)
    for _ in range(self.attempts):
      area = width * height * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*log_ratio))
      crop_w = round(math.sqrt(area * aspect))
      crop_h = round(math.sqrt(area / aspect))
      if 0 < crop_w <= width and 0 < crop_h <= height:
        left = int(rng.integers(width - crop_w + 1))
        top = int(rng.integers(height - crop_h + 1))
        return left, top, left + crop_w, top + crop_h
    aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
    crop_w, crop_h = min(width, round(height * aspect)), min(height, round(width / aspect))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


@dataclasses.dataclass(frozen=True)
class CenterCropResize(grain.transforms.Map):
  """The central square of side EVAL_CROP_FRACTION x the shorter side, resized to (size, size):
  "resize the shorter side to size/0.875, center crop size". uint8 array or bytes -> uint8
  (size, size, C)."""
  size: int

  def map(self, example: dict) -> dict:
    image = _open(example['image'])
    width, height = image.size
    side = min(width, height) * EVAL_CROP_FRACTION
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    return {**example, 'image': _crop_resize(image, box, self.size)}


def _open(image) -> Image.Image:
  """A PIL image of a uint8 (H, W, 1 or 3) array, or (lazily decoded) of encoded bytes."""
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  encoded = image.item() if isinstance(image, np.ndarray) else image
  return Image.open(io.BytesIO(encoded))


def _crop_resize(image: Image.Image, box: tuple, size: int) -> np.ndarray:
  """The pixels of `box` (left, top, right, bottom) resized to uint8 (size, size, C)."""
  if image.format == 'JPEG':
    full_width, full_height = image.size
    image.draft('RGB', (math.ceil(full_width * size / (box[2] - box[0])),
                        math.ceil(full_height * size / (box[3] - box[1]))))
    scale_x, scale_y = image.size[0] / full_width, image.size[1] / full_height
    box = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
  if image.format is not None and image.mode != 'RGB':
    image = image.convert('RGB')
  pixels = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))
  return pixels if pixels.ndim == 3 else pixels[..., None]


class Collate:
  """Batch function: stacks examples, normalizes images per channel.

  Returns {'image': float32 (B, H, W, C) = (pixels / 255 - mean) / std, 'label': int32 (B,)}
  plus 'mask': float32 (B,) when the examples carry one.
  """

  def __init__(self, mean: tuple, std: tuple):
    self.offset = 255 * np.asarray(mean, np.float32)  # (C,): normalized = (pixels - offset) * scale.
    self.scale = 1 / (255 * np.asarray(std, np.float32))

  def __call__(self, examples) -> dict:
    images = np.stack([example['image'] for example in examples])
    normalized = np.subtract(images, self.offset, dtype=np.float32)
    normalized *= self.scale
    batch = {'image': normalized,
             'label': np.array([example['label'] for example in examples], np.int32)}
    if 'mask' in examples[0]:
      batch['mask'] = np.array([example['mask'] for example in examples], np.float32)
    return batch


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """The transforms of one dataset and config.

  Attributes:
    train: per-example train transform (grain RandomMap or Map), or None.
    eval: per-example eval transform (grain Map), or None.
    collate: the batch function.
    image_shape: (H, W, C) of the images after either transform.
  """
  train: grain.transforms.RandomMap | grain.transforms.Map | None
  eval: grain.transforms.Map | None
  collate: Collate
  image_shape: tuple


def preprocessing(dataset: str, augment: str, image_size: int,
                  stored_shape: tuple) -> Preprocessing:
  """Resolves `data.augment`/`data.image_size` for a dataset whose images are `stored_shape`.

  Args:
    dataset: a key of sources.DATASETS, or 'synthetic' (the synthetic source).
    augment: one of AUGMENTS.
    image_size: output height and width; 0 = the stored size (224 when sizes vary).
    stored_shape: (H, W, C) as stored; H and W None when they vary between images.
  """
  if augment not in AUGMENTS:
    raise errors.SetupError(f'unknown data.augment={augment!r}: use one of {", ".join(AUGMENTS)}')
  if augment == 'auto':
    augment = (sources.SYNTHETIC_AUTO_AUGMENT if dataset == 'synthetic'
               else sources.DATASETS[dataset].auto_augment)
  height, width, channels = stored_shape
  collate = Collate(*_mean_std(dataset, channels))
  if height is None and augment == 'cifar':
    raise errors.SetupError(
        f'data.augment=cifar needs images of one size but {dataset} images vary: '
        f'use data.augment=imagenet or none')
  if augment == 'imagenet' or height is None:
    if channels not in (1, 3):
      raise errors.SetupError(
          f'resizing (data.augment={augment} on {dataset}) needs 1 or 3 channels, '
          f'not {channels}: use data.augment=cifar or none')
    size = image_size or height or _DEFAULT_RESIZED_SIZE
    eval_transform = CenterCropResize(size)
    train_transform = RandomResizedCropFlip(size) if augment == 'imagenet' else eval_transform
    return Preprocessing(train_transform, eval_transform, collate, (size, size, channels))
  if image_size not in (0, height) or (image_size and width != height):
    raise errors.SetupError(
        f'data.image_size={image_size} differs from the stored {height}x{width} '
        f'{dataset} images and data.augment={augment} does not resize: set '
        f'data.image_size=0 or data.augment=imagenet')
  train_transform = CifarAugment() if augment == 'cifar' else None
  return Preprocessing(train_transform, None, collate, tuple(stored_shape))


def _mean_std(dataset: str, channels: int) -> tuple:
  if dataset == 'synthetic':
    mean, std = sources.SYNTHETIC_MEAN_STD
    return (mean,) * channels, (std,) * channels
  mean, std = sources.DATASETS[dataset].mean_std
  if len(mean) != channels:
    raise errors.SetupError(f'{dataset} images have {channels} channels, its normalization has '
                            f'{len(mean)}: check the data files and data.name')
  return mean, std
