"""Two questions about StoMPP's masks on TPU, answered by the TPU compiler (docs/preflight.md).

1. `binary.per_example_activation_masks=True`: are the input masks built for each chip's slice
   of the batch, or for the global batch on every chip? The train step at the same per-chip
   batch is compiled for a small and a large slice: per-chip figures that stay equal mean the
   masks are partitioned with the batch.
2. The per-site `jax.lax.cond` of the masks (binary/context.py: a site whose fraction is 0 or 1
   hashes nothing): what does it cost on TPU against a plain select that always hashes? The
   rows compare them through the config's switch `binary.masks_by` ('cond' or 'select'; TPU's
   default is 'select', docs/preflight.md).

    python benchmarks/preflight/masks_check.py --config=configs/cifar.py:model=resnet20 \
        --per_chip_batch=128 --small=v5e-4 --large=v5e-64 --json=benchmarks/preflight/masks_resnet20.json

Each row is one compile of the train step (minutes for a ResNet-20 on 2 CPU cores). The figures
are the compiler's, per chip, not a measured run.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from stompp_jax import preflight  # noqa: E402
from stompp_jax import tpu_chips  # noqa: E402

_SMALL = flags.DEFINE_string('small', 'v5e-4', 'The small slice.')
_LARGE = flags.DEFINE_string('large', 'v5e-64', 'The large slice (same chip).')
# --config, --per_chip_batch and --json: preflight.define_run_flags.


def row(config, topology: str, method: str, *, per_example: bool, select: bool) -> dict:
  """The train step's per-chip figures of one variant."""
  slice_ = tpu_chips.parse_slice(topology)
  devices = preflight.tpu_devices(slice_)
  config = preflight.method_config(config, method, flags.FLAGS.per_chip_batch * len(devices))
  config.train.eval_batch_size = config.train.batch_size
  config.binary.per_example_activation_masks = per_example
  config.binary.masks_by = 'select' if select else 'cond'
  exp, steps = preflight.compile_steps(config, devices, slice_.chip, ('train',))
  train = steps['train']
  out = {'topology': topology, 'method': method, 'per_example_activation_masks': per_example,
         'masks_by': 'select' if select else 'cond', 'residuals': exp.binarization.residuals,
         'per_chip_batch': flags.FLAGS.per_chip_batch,
         **{k: train[k] for k in ('fits', 'compile_s')}}
  if train['fits']:
    out.update(temporaries_bytes=train['hbm_bytes']['temporaries'],
               hbm_total_bytes=train['hbm_bytes']['total'], flops=train['flops'],
               bytes_accessed=train['bytes_accessed'],
               compiler_estimate_s=train['compiler_estimate_s'],
               roofline_s=train['roofline']['seconds'])
  print(json.dumps(out), flush=True)
  return out


def _code_commit() -> str:
  """The checkout's short commit ('' outside a git checkout)."""
  result = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=False)
  return result.stdout.strip()


def main(argv):
  del argv
  jax.config.update('jax_platforms', 'cpu')
  config = flags.FLAGS.config
  small, large = _SMALL.value, _LARGE.value
  rows = [row(config, small, 'fp', per_example=False, select=False),
          row(config, small, 'ste', per_example=False, select=False),
          row(config, small, 'stompp', per_example=False, select=False),
          row(config, small, 'stompp', per_example=False, select=True),
          row(config, small, 'stompp', per_example=True, select=False),
          row(config, large, 'stompp', per_example=True, select=False),
          row(config, small, 'stompp', per_example=True, select=True)]
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, 'w') as f:
      json.dump({'command': ' '.join(a for a in sys.argv if not a.startswith('--json')),
                 'code_commit': _code_commit(), 'note': preflight.NOTE, 'rows': rows}, f,
                indent=1)
      f.write('\n')


if __name__ == '__main__':
  preflight.define_run_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)
