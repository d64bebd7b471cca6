"""The export on disk (docs/export.md): DIR/manifest.json and DIR/tensors.npz, and its size report.

    files.write(out_dir, manifest, tensors)            # both files, each whole, manifest last
    manifest, arrays = files.read(out_dir)             # reads nothing else
"""

import io
import json
import math
import os
from collections import Counter
from typing import Any, Optional

import numpy as np

from stompp_jax import storage
from stompp_jax import tables
from stompp_jax.export.fold import Tensor

FORMAT = 'stompp_jax.export/1'
MANIFEST = 'manifest.json'
TENSORS = 'tensors.npz'


def make_manifest(*, model: dict[str, Any], source: dict[str, Any], ops: list[dict],
                  tensors: dict[str, Tensor], float32_model_bytes: int,
                  summary_memory_bytes: float, summary_compression: float,
                  checkpoint_state_bytes: Optional[int] = None) -> dict:
  """The manifest of a folded program (docs/export.md lists its fields).

  Args:
    model: name, mode, stem, num_classes, image_shape, binary_include, binary_exclude.
    source: where the variables come from (workdir and step, or config).
    ops, tensors: the folded program and its tensors.
    float32_model_bytes: 4 bytes per variable of the model (params + BatchNorm statistics).
    summary_memory_bytes, summary_compression: of the model summary (models/summary.py),
      reported alongside.
    checkpoint_state_bytes: the size on disk of the train state the variables came from.
  """
  export_bytes = sum(t.array.nbytes for t in tensors.values())
  by_precision = Counter()
  for t in tensors.values():
    by_precision[t.precision] += t.array.nbytes
  return {
      'format': FORMAT,
      'model': model,
      'source': source,
      'input': 'input',
      'output': ops[-1]['output'],
      'program': ops,
      'tensors': {name: dict(shape=list(t.shape), stored_shape=list(t.array.shape),
                             dtype=str(t.array.dtype), precision=t.precision,
                             bytes=int(t.array.nbytes))
                  for name, t in tensors.items()},
      'size': dict(export_bytes=int(export_bytes),
                   by_precision={k: int(v) for k, v in sorted(by_precision.items())},
                   float32_model_bytes=int(float32_model_bytes),
                   compression=float32_model_bytes / export_bytes,
                   checkpoint_state_bytes=checkpoint_state_bytes,
                   summary_memory_bytes=summary_memory_bytes,
                   summary_compression=summary_compression),
  }


def write(out_dir: str, manifest: dict, tensors: dict[str, Tensor]) -> None:
  """(Over)writes tensors.npz, then manifest.json, in `out_dir` (local or gs://; created if
  missing), each file whole (`storage.write_bytes`).

  The old manifest is removed first: a reader, or a write that fails halfway, finds either no
  manifest or one beside its own tensors, never an old manifest beside new tensors.
  """
  directory = storage.path(out_dir)
  stored = io.BytesIO()
  np.savez(stored, **{name: t.array for name, t in tensors.items()})
  text = json.dumps(manifest, indent=1) + '\n'
  (directory / MANIFEST).unlink(missing_ok=True)
  storage.write_bytes(directory / TENSORS, stored.getvalue())
  storage.write_text(directory / MANIFEST, text)


def read(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(manifest, {tensor name: stored array}) of the export in `directory`."""
  with open(os.path.join(directory, MANIFEST), encoding='utf-8') as f:
    manifest = json.load(f)
  with np.load(os.path.join(directory, TENSORS)) as stored:
    tensors = {name: stored[name] for name in manifest['tensors']}
  return manifest, tensors


_GROUPS = {  # (name suffix, precision) -> report row.
    ('kernel', 'binary'): 'binary kernels (1 bit, packed)',
    ('kernel', 'float32'): 'float kernels (float32)',
    ('bias', 'float32'): 'biases (float32)',
    ('center', 'float32'): 'BatchNorm affine (float32)',
    ('multiplier', 'float32'): 'BatchNorm affine (float32)',
    ('offset', 'float32'): 'BatchNorm affine (float32)',
    ('threshold', 'int32'): 'BatchNorm+sign thresholds (int32)',
    ('flip', 'bool'): 'BatchNorm+sign directions (bool)',
}


def size_report(manifest: dict) -> str:
  """The export's bytes by tensor group against the float32 model and the model summary."""
  groups: dict[str, list[int]] = {}
  for name, t in manifest['tensors'].items():
    row = groups.setdefault(_GROUPS[name.rsplit('/', 1)[1], t['precision']], [0, 0, 0])
    row[0] += 1
    row[1] += math.prod(t['shape'])
    row[2] += t['bytes']
  size, model = manifest['size'], manifest['model']
  rows = [('tensors', 'count', 'elements', 'bytes')]
  rows += [(group, str(n), f'{elements:,}', f'{nbytes:,}')
           for group, (n, elements, nbytes) in groups.items()]
  rows += [('export total', '', '', f'{size["export_bytes"]:,}'),
           ('float32 model (params + BatchNorm statistics)', '', '',
            f'{size["float32_model_bytes"]:,}')]
  if size['checkpoint_state_bytes'] is not None:
    rows.append(('checkpoint train state on disk (with optimizer state)', '', '',
                 f'{size["checkpoint_state_bytes"]:,}'))
  shape = 'x'.join(map(str, model['image_shape']))
  mib = lambda key: f'{size[key] / 2**20:.3f} MiB'
  return '\n'.join([
      f'{model["name"]}, mode {model["mode"]}, input {shape}, {model["num_classes"]} classes;'
      f' from {json.dumps(manifest["source"])}',
      *tables.table(rows, left=1),
      f'export: {mib("export_bytes")}, {size["compression"]:.2f}x smaller than the float32'
      f' model ({mib("float32_model_bytes")})',
      f'model summary (1 bit per binary weight, BatchNorm unfolded): '
      f'{mib("summary_memory_bytes")}, {size["summary_compression"]:.2f}x'])
