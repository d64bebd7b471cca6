"""The TPU chips and slices the preflight (preflight.py) compiles for: one table, each figure with
its public source.

A slice is named as `gcloud compute tpus tpu-vm create --accelerator-type` names it: `v4-32`
and `v5p-128` count TensorCores (two per chip; JAX runs one device per chip, "megacore"),
`v5litepod-256` (also written `v5e-256`) and `v6e-64` count chips (one TensorCore each).
"""

import dataclasses
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip generation, per chip.

  Attributes:
    name: 'v4', 'v5e', 'v5p', 'v6e' (the topology prefix libtpu knows).
    hbm_bytes: HBM capacity (the TPU compiler's own limit, which decides fit, is slightly less).
    peak_bf16_flops: peak bf16 FLOP/s.
    hbm_bandwidth: HBM bytes/s.
    source: the public page the three figures are from, as it states them.
    cores_in_name: TensorCores per chip that the accelerator-type number counts (v4-32: 2).
    chip_config: libtpu's chip configuration ('megacore': one JAX device per chip).
    dims: 3 for 3D-torus slices (AxBxC), 2 for 2D ones (AxB).
    types: the accelerator-type prefixes of this chip.
  """

  name: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bandwidth: float
  source: str
  cores_in_name: int
  chip_config: str
  dims: int
  types: tuple[str, ...]


CHIPS = {
    'v4': Chip('v4', 32 * GIB, 275e12, 1200e9,
               'https://cloud.google.com/tpu/docs/v4 (275 teraflops bf16; HBM2 32 GiB, 1200 GBps)',
               cores_in_name=2, chip_config='megacore', dims=3, types=('v4',)),
    'v5e': Chip('v5e', 16 * GIB, 197e12, 819e9,
                'https://cloud.google.com/tpu/docs/v5e (197 TFLOPs bf16; HBM2 16 GB, 819 GBps)',
                cores_in_name=1, chip_config='default', dims=2, types=('v5litepod', 'v5e')),
    'v5p': Chip('v5p', 95 * 10**9, 459e12, 2765e9,
                'https://cloud.google.com/tpu/docs/v5p (459 TFLOPs bf16; HBM2e 95 GB, 2765 GBps)',
                cores_in_name=2, chip_config='megacore', dims=3, types=('v5p',)),
    'v6e': Chip('v6e', 32 * 10**9, 918e12, 1638e9,
                'https://cloud.google.com/tpu/docs/v6e (918 TFLOPs bf16; HBM 32 GB, 1638 GBps)',
                cores_in_name=1, chip_config='default', dims=2, types=('v6e',)),
}

# Chips of a slice -> its shape, as the Cloud TPU pages list the single-slice shapes.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SINGLE_HOST_2D = 8  # 2D slices up to 8 chips are one host; larger ones have 4 chips per host.


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: `accelerator_type` ('v4-32'), its chip, chip count and libtpu topology."""

  accelerator_type: str
  chip: Chip
  chips: int
  shape: tuple[int, ...]

  @property
  def topology_name(self) -> str:
    """libtpu's name, e.g. 'v4:2x2x4'."""
    return f'{self.chip.name}:{"x".join(map(str, self.shape))}'

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    if self.chip.dims == 2 and self.chips <= _SINGLE_HOST_2D:
      return (*self.shape, 1)
    return (2, 2, 1)


def supported() -> list[str]:
  """Every accelerator type `parse_slice` accepts, smallest first within each chip."""
  names = []
  for chip in CHIPS.values():
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    names += [f'{chip.types[0]}-{chips * chip.cores_in_name}' for chips in shapes]
  return names


def parse_slice(accelerator_type: str) -> Slice:
  """The slice of a gcloud accelerator type ('v4-32', 'v5litepod-256', 'v5e-256', 'v6e-64').

  Raises:
    ValueError: an unknown chip or size; the message lists the supported types.
  """
  match = re.fullmatch(r'([a-z0-9]+)-(\d+)', accelerator_type.strip().lower())
  chip = next((c for c in CHIPS.values() if match and match.group(1) in c.types), None)
  shapes = {} if chip is None else (_SHAPES_3D if chip.dims == 3 else _SHAPES_2D)
  number = int(match.group(2)) if match else 0
  chips = number // chip.cores_in_name if chip else 0
  if chip is None or number % chip.cores_in_name or chips not in shapes:
    raise ValueError(f'Unknown TPU type {accelerator_type!r}: use one of '
                     f'{", ".join(supported())} (v5e-N is v5litepod-N).')
  return Slice(accelerator_type, chip, chips, shapes[chips])
