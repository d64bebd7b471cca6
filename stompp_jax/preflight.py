"""Preflight: a run's steps compiled for a TPU slice by the real TPU compiler, on a machine
without a TPU. Memory per chip, fit, FLOPs, bytes and a roofline estimate, before paying for chips.

    pip install ".[tpu]"    # libtpu, the TPU compiler: ~213 MB download, ~680 MB installed
    python -m stompp_jax.preflight --config=configs/imagenet_r50.py --topology=v4-32 \
        [--methods=fp,ste,stompp,stompp_ste] [--per_chip_batch=N | --find_max_batch] \
        [--json=PATH] [--config.FIELD=VALUE ...]

For each method it builds the run's Experiment exactly as a run does (`experiment.build`, with
the config's method and model mode switched), on a mesh over the compile-only devices of the
slice (`jax.experimental.topologies`), then compiles with the TPU compiler the same programs a
run compiles: the train step, the eval steps and, for binary methods, the BatchNorm
recalibration step (recalibrate.Recalibrator). The data is synthetic, standing in for the
config's dataset with its image shape, class count and split sizes: nothing is read.

Printed (and written to --json): per chip, the HBM the compiler assigns (arguments, temporaries,
outputs, total) against the chip's capacity; fits or not (the TPU compiler refuses a program
that does not fit, with the figure it needed); FLOPs and bytes accessed per step; a roofline
estimate of the step time and images/s per chip from the chip's peak bf16 FLOP/s and HBM
bandwidth (tpu_chips.py: one table, each figure with its public source); and the ratio of each
figure to the fp network's. With --find_max_batch, the largest per-chip train batch (a multiple
of 8) that fits, found by compiling. These are the compiler's figures and an estimate, not a
measured run.

Exit status: 0 done (also when a config does not fit: that is a finding, printed as a line);
2 bad input (a flag, an extra argument, the config, the topology) or libtpu missing, in one line
`Error: ...` saying what to do (for libtpu: how to install it).

libtpu is found as JAX finds it: $TPU_LIBRARY_PATH, else the `libtpu` package. Installed into the
Python that also runs CPU jobs, JAX there tries the TPU first and libtpu prints a few lines at
every start; `JAX_PLATFORMS=cpu` avoids it (or keep libtpu in its own directory and point
TPU_LIBRARY_PATH at its libtpu.so).
"""

import dataclasses
import glob
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional

# Before JAX loads libtpu: no GCE metadata query (no TPU VM here) and no exclusive lock on
# /tmp/libtpu_lockfile (compiling needs no chip; other JAX processes may hold the lock).
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from absl import flags  # pylint: disable=g-import-not-at-top
import jax
import ml_collections
from ml_collections import config_flags

from stompp_jax import errors
from stompp_jax import experiment
from stompp_jax import flag_errors
from stompp_jax import recalibrate
from stompp_jax import tpu_chips
from stompp_jax.binary import context as bctx
from stompp_jax.data import sources



def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """The command line's flags. Defined by the entry point only (`__main__` here), since
  `stompp_jax.main` defines a --config flag of its own."""
  flags.DEFINE_string('topology', None, 'TPU slice as gcloud names it: v4-32, v5litepod-256 (or'
                      ' v5e-256), v5p-128, v6e-64...', flag_values=flag_values)
  flags.DEFINE_list('methods', list(bctx.METHODS),
                    'binary.method values to compile; fp first gives the ratios.',
                    flag_values=flag_values)
  flags.DEFINE_bool('find_max_batch', False, 'Also find the largest per-chip train batch that'
                    ' fits (compiles the train step several times).', flag_values=flag_values)
  define_run_flags(flag_values, sys_argv)


def define_run_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv=None) -> None:
  """--config, --per_chip_batch and --json: the flags of a command that compiles a config's
  steps for slices it chooses itself (benchmarks/preflight/masks_check.py)."""
  flags.DEFINE_integer('per_chip_batch', 0, 'Train images per chip (the global batch is this'
                       ' times the chips); 0: the config\'s batch.', flag_values=flag_values)
  flags.DEFINE_string('json', '', 'Write the figures to this JSON file.', flag_values=flag_values)
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file, optionally :args.',
                                  flag_values=flag_values, lock_config=False, sys_argv=sys_argv)


INSTALL = 'pip install ".[tpu]" (or pip install "jax[tpu]==0.10.2")'
NOTE = ("The TPU compiler's figures and a roofline estimate from the chip's peak bf16 FLOP/s and"
        ' HBM bandwidth, not a measured run.')
STEPS = ('train', 'eval', 'eval_fully_binary', 'recalibrate')
BATCH_MULTIPLE = 8  # --find_max_batch searches per-chip batches in multiples of this.
_FIGURE = re.compile(r'\(?(\d+(?:\.\d+)?)([KMGT])i?B?\)?')


def libtpu_path() -> Optional[str]:
  """The libtpu.so JAX would load, or None (jax's own lookup: $TPU_LIBRARY_PATH, `libtpu`)."""
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top  # No public query.
  return cloud_tpu_init.get_tpu_library_path()


def libtpu_version(path: str) -> str:
  """The version of the libtpu wheel that holds `path` ('' when not from a wheel)."""
  infos = glob.glob(os.path.join(os.path.dirname(os.path.dirname(path)), 'libtpu-*.dist-info'))
  return os.path.basename(infos[0])[len('libtpu-'):-len('.dist-info')] if infos else ''


def tpu_devices(slice_: tpu_chips.Slice) -> list:
  """The compile-only devices of `slice_` (one per chip).

  Raises:
    errors.SetupError: libtpu is not installed.
  """
  if libtpu_path() is None:
    raise errors.SetupError(f'The TPU compiler (libtpu) is not installed: {INSTALL}; no TPU is'
                            ' needed to compile.')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(
      platform='tpu', topology_name=slice_.topology_name, chip_config_name=slice_.chip.chip_config,
      chips_per_host_bounds=slice_.chips_per_host_bounds, num_slices=1).devices


def method_config(config: ml_collections.ConfigDict, method: str, global_batch: int
                  ) -> ml_collections.ConfigDict:
  """`config` with binary.method `method` (model.mode fp for fp, the config's binary mode or bnn
  otherwise), train.batch_size `global_batch`, and synthetic data standing in for its dataset."""
  config = ml_collections.ConfigDict(config.to_dict())
  binary_mode = config.model.mode if config.model.mode != 'fp' else 'bnn'
  config.binary.method = method
  config.model.mode = 'fp' if method == 'fp' else binary_mode
  config.train.batch_size = global_batch
  if config.data.source not in ('synthetic', 'npz'):
    dataset = sources.DATASETS.get(config.data.name)
    train_size, eval_size = (dataset.split_sizes if dataset and dataset.split_sizes else (
        config.data.synthetic_train_size, config.data.synthetic_eval_size))
    config.data.source = 'synthetic'
    config.data.synthetic_train_size = train_size
    config.data.synthetic_eval_size = eval_size
  config.data.num_workers = 0
  return config


class _CompileTimes:
  """Backend compile durations as JAX reports them, in order (one per compiled program)."""

  EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.seconds: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **_) -> None:
    if event == self.EVENT:
      self.seconds.append(duration)


_compile_times: Optional[_CompileTimes] = None


def _out_of_memory(error: Exception) -> Optional[dict]:
  """{'message', 'required_bytes', 'available_bytes'} of the TPU compiler's out-of-memory
  error, or None for any other error."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text:
    return None
  line = next((l for l in text.splitlines() if 'RESOURCE_EXHAUSTED' in l), text)
  line = line[line.index('RESOURCE_EXHAUSTED'):].strip()
  scale = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
  sizes = [float(n) * scale[u] for n, u in _FIGURE.findall(line)]
  return {'message': line, 'required_bytes': sizes[0] if sizes else None,
          'available_bytes': sizes[1] if len(sizes) > 1 else None}


def figures(compiled, per_chip_batch: int, chip: tpu_chips.Chip) -> dict:
  """Per-chip memory, cost and roofline of one compiled program."""
  memory = compiled.memory_analysis()
  hbm = {'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
         'aliased': memory.alias_size_in_bytes, 'temporaries': memory.temp_size_in_bytes,
         'code': memory.generated_code_size_in_bytes,
         'compiler_peak': getattr(memory, 'peak_memory_in_bytes', 0)}
  # As MaxText's train_compile.py totals it: what lives in HBM during the step.
  hbm['total'] = hbm['arguments'] + hbm['outputs'] - hbm['aliased'] + hbm['temporaries']
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, accessed = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  compute_s, memory_s = flops / chip.peak_bf16_flops, accessed / chip.hbm_bandwidth
  seconds = max(compute_s, memory_s)
  estimate = cost.get('optimal_seconds')  # libtpu's own; negative (unknown) for ResNet-50.
  return {'fits': True, 'hbm_bytes': hbm, 'flops': flops, 'bytes_accessed': accessed,
          'compiler_estimate_s': estimate if estimate is not None and estimate > 0 else None,
          'roofline': {'seconds': seconds, 'bound': 'compute' if compute_s >= memory_s else 'memory',
                       'images_per_s_per_chip': per_chip_batch / seconds if seconds else None}}


def _compile(what: Callable[[], Any], names: tuple[str, ...], per_chip: dict[str, int],
             chip: tpu_chips.Chip) -> dict:
  """{name: figures} of the programs `what()` compiles ({name: compiled}, or one compiled for one
  name), each with its compile seconds; {name: {'fits': False, ...}} when the compiler refuses
  them for lack of HBM."""
  global _compile_times
  _compile_times = _compile_times or _CompileTimes()
  start = len(_compile_times.seconds)
  began = time.perf_counter()
  try:
    compiled = what()
  except jax.errors.JaxRuntimeError as e:
    failure = _out_of_memory(e)
    if failure is None:
      raise
    return {name: {'fits': False, **failure, 'compile_s': time.perf_counter() - began}
            for name in names}
  compiled = compiled if isinstance(compiled, dict) else {names[0]: compiled}
  seconds = _compile_times.seconds[start:]
  out = {}
  for i, name in enumerate(names):
    out[name] = figures(compiled[name], per_chip[name], chip)
    out[name]['compile_s'] = seconds[i] if len(seconds) == len(names) else None
  if len(seconds) != len(names):
    out[names[0]]['compile_s'] = time.perf_counter() - began
  return out


def compile_steps(config: ml_collections.ConfigDict, devices: list, chip: tpu_chips.Chip,
                  steps: tuple[str, ...] = STEPS) -> tuple[experiment.Experiment, dict]:
  """The Experiment of `config` on `devices` and {step: figures} of its compiled steps.

  Args:
    config: the method's config (method_config).
    devices: the slice's devices.
    chip: the slice's chip (capacity and roofline figures).
    steps: which of STEPS to compile ('eval' compiles the eval steps of the method).
  """
  exp = experiment.build(config, devices=devices)
  chips = exp.mesh.size
  train_per_chip = config.train.batch_size // chips
  eval_per_chip = exp.eval_batch_size // chips
  binary = config.binary.method != 'fp'
  results = {}
  if 'train' in steps:
    results.update(_compile(exp.compile_train_step, ('train',), {'train': train_per_chip}, chip))
  if 'eval' in steps:
    names = ('eval_fully_binary', 'eval') if binary else ('eval',)
    results.update(_compile(exp.compile_eval_steps, names, dict.fromkeys(names, eval_per_chip),
                            chip))
  if 'recalibrate' in steps and binary:
    def recalibration():
      recalibrator = recalibrate.Recalibrator(
          exp.model, exp.binarization, exp.abstract_state, exp.state_shardings,
          exp.abstract_batch(config.train.batch_size),
          max(config.train.recalibrate_bn_batches, 1))
      return recalibrator._add  # pylint: disable=protected-access  # The compiled program.
    results.update(_compile(recalibration, ('recalibrate',), {'recalibrate': train_per_chip},
                            chip))
  return exp, results


def _next_batch(fits: Optional[tuple], fails: Optional[tuple], available: Optional[float],
                chip: tpu_chips.Chip) -> int:
  """The next per-chip batch to compile (a multiple of BATCH_MULTIPLE), from the largest that
  fits, (batch, temporaries, total bytes), and the smallest that does not, (batch, temporaries
  the compiler asked for): the batch where the temporaries, linear in the batch, reach what the
  compiler said is `available`; past the chip's capacity while nothing failed yet."""
  m = BATCH_MULTIPLE
  if fails is None:  # Aim a little past the capacity, so the next probe likely brackets it.
    batch, _, total = fits
    guess = min(max(batch * 1.1 * chip.hbm_bytes / max(total, 1), 2 * batch), 16 * batch)
    return int(guess) // m * m
  if fits is None:
    return max(m, fails[0] // 2 // m * m)
  (low, low_need, _), (high, high_need) = fits, fails
  guess = (low + high) / 2
  if available and high_need and high_need > low_need:
    guess = low + (available - low_need) * (high - low) / (high_need - low_need)
  if high - low > 4 * m:  # Shrink the bracket by at least an eighth.
    guess = min(max(guess, low + (high - low) / 8), high - (high - low) / 8)
  return int(min(max(guess // m * m, low + m), high - m))


def find_max_batch(config: ml_collections.ConfigDict, method: str, devices: list,
                   chip: tpu_chips.Chip, start: int, log: Callable[[str], None]) -> dict:
  """The largest per-chip train batch (a multiple of BATCH_MULTIPLE) whose train step fits,
  by compiling it: from `start`, then between the largest batch that fits and the smallest that
  does not, at the batch the compiler's figures point to (`_next_batch`), until they are
  BATCH_MULTIPLE apart.

  Returns:
    {'max_per_chip_batch': int (0: not even BATCH_MULTIPLE fits), 'probes': [{per_chip_batch,
    fits, total or required bytes, compile_s}]}.
  """
  chips = len(devices)
  fits, fails, available, probes = None, None, None, []
  candidate = max(BATCH_MULTIPLE, start // BATCH_MULTIPLE * BATCH_MULTIPLE)
  while True:
    _, result = compile_steps(method_config(config, method, candidate * chips), devices, chip,
                              ('train',))
    train = result['train']
    probe = {'per_chip_batch': candidate, 'fits': train['fits'],
             'hbm_total_bytes': train['hbm_bytes']['total'] if train['fits'] else None,
             'required_bytes': None if train['fits'] else train['required_bytes'],
             'compile_s': train['compile_s']}
    probes.append(probe)
    log(f'  {method}: {candidate} per chip '
        + (f'fits ({_bytes(probe["hbm_total_bytes"])})' if train['fits']
           else f'does not fit ({train["message"]})'))
    if train['fits']:
      fits = (candidate, train['hbm_bytes']['temporaries'], train['hbm_bytes']['total'])
    else:
      fails = (candidate, train['required_bytes'])
      available = train.get('available_bytes') or available
    if fails and (fails[0] - (fits[0] if fits else 0) <= BATCH_MULTIPLE):
      break
    candidate = _next_batch(fits, fails, available, chip)
  return {'max_per_chip_batch': fits[0] if fits else 0, 'probes': probes}


def ratios(result: dict, fp: dict) -> dict:
  """{step: {figure: result's / fp's}} of the steps both compiled and fit (train, eval)."""
  out = {}
  for name, mine in result['steps'].items():
    base = fp['steps'].get(name, {})
    if not (mine.get('fits') and base.get('fits')):
      continue
    pairs = {'hbm_total': (mine['hbm_bytes']['total'], base['hbm_bytes']['total']),
             'hbm_temporaries': (mine['hbm_bytes']['temporaries'],
                                 base['hbm_bytes']['temporaries']),
             'flops': (mine['flops'], base['flops']),
             'bytes_accessed': (mine['bytes_accessed'], base['bytes_accessed']),
             'roofline_seconds': (mine['roofline']['seconds'], base['roofline']['seconds'])}
    out[name] = {figure: a / b if b else None for figure, (a, b) in pairs.items()}
  return out


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def _bytes(n: float) -> str:
  """'1.30 GiB', '12.3 MiB'."""
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def describe_step(name: str, step: dict, per_chip: int, chip: tpu_chips.Chip) -> str:
  """One line of a compiled step."""
  if not step['fits']:
    return (f'  {name} ({per_chip}/chip): does not fit in HBM: {step["message"]}')
  hbm, roof = step['hbm_bytes'], step['roofline']
  line = (f'  {name} ({per_chip}/chip): fits, {_bytes(hbm["total"])} of {_gib(chip.hbm_bytes)}'
          f' GiB HBM (arguments {_bytes(hbm["arguments"])}, temporaries'
          f' {_bytes(hbm["temporaries"])}, outputs {_bytes(hbm["outputs"])});'
          f' {step["flops"] / 1e9:.4g} GFLOP, {step["bytes_accessed"] / 1e9:.4g} GB accessed;'
          f' roofline {roof["seconds"] * 1e3:.3g} ms ({roof["bound"]}-bound)')
  if name == 'train' and roof['images_per_s_per_chip']:
    line += f', {roof["images_per_s_per_chip"]:.0f} img/s per chip'
  if step.get('compile_s') is not None:
    line += f'; compiled in {step["compile_s"]:.0f} s'
  return line


def check_request(config: ml_collections.ConfigDict, topology: Optional[str], methods: list[str],
                  *, per_chip_batch: int = 0,
                  max_batch: bool = False) -> tuple[tpu_chips.Slice, int]:
  """Every check of a preflight before libtpu is asked for anything: the slice, the methods,
  the batch, and each method's config as `experiment.check_config` checks a run's.

  Returns:
    (the slice, the global train batch).

  Raises:
    errors.SetupError: the first thing that is wrong, in one line.
  """
  if not topology:
    raise errors.SetupError('--topology is required: a TPU type as gcloud names it, e.g.'
                            f' --topology=v4-32 ({", ".join(tpu_chips.supported())}).')
  try:
    slice_ = tpu_chips.parse_slice(topology)
  except ValueError as e:
    raise errors.SetupError(str(e)) from None
  if not methods or set(methods) - set(bctx.METHODS):
    raise errors.SetupError(f'--methods={",".join(methods)}: use some of'
                            f' {", ".join(bctx.METHODS)}.')
  if per_chip_batch < 0:
    raise errors.SetupError(f'--per_chip_batch={per_chip_batch}: use a positive number, or 0'
                            ' for the config\'s batch.')
  if per_chip_batch and max_batch:
    raise errors.SetupError('--per_chip_batch and --find_max_batch: give one (the search starts'
                            ' from the config\'s batch).')
  if not per_chip_batch and config.train.batch_size % slice_.chips:
    raise errors.SetupError(f'train.batch_size={config.train.batch_size} does not split over the'
                            f' {slice_.chips} chips of {topology}: pass --per_chip_batch=N or'
                            f' --config.train.batch_size=a multiple of {slice_.chips}.')
  global_batch = per_chip_batch * slice_.chips if per_chip_batch else config.train.batch_size
  for method in methods:
    experiment.check_config(method_config(config, method, global_batch))
  return slice_, global_batch


def preflight(config: ml_collections.ConfigDict, topology: str, methods: list[str], *,
              per_chip_batch: int = 0, max_batch: bool = False,
              log: Callable[[str], None] = print) -> dict:
  """Compiles every method of `config` for `topology` and returns the figures (the JSON's dict).

  Raises:
    errors.SetupError: a bad topology, method or batch (`check_request`), libtpu missing, or a
      config that `experiment.build` refuses (`compile_steps`).
  """
  slice_, global_batch = check_request(config, topology, methods, per_chip_batch=per_chip_batch,
                                       max_batch=max_batch)
  devices = tpu_devices(slice_)
  chips = len(devices)
  chip = slice_.chip
  path = libtpu_path()
  log(f'Preflight of {len(methods)} method(s) on {topology} ({chips} x {devices[0].device_kind},'
      f' {_gib(chip.hbm_bytes)} GiB HBM, {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16,'
      f' {chip.hbm_bandwidth / 1e9:.0f} GB/s each), global batch {global_batch}, libtpu'
      f' {libtpu_version(path) or path}. {NOTE}')
  out = {'topology': topology, 'libtpu_topology': slice_.topology_name, 'chips': chips,
         'device_kind': devices[0].device_kind, 'chip': dataclasses.asdict(chip),
         'global_batch': global_batch, 'per_chip_batch': global_batch // chips,
         'libtpu': libtpu_version(path), 'jax': jax.__version__, 'note': NOTE, 'methods': {}}
  for method in methods:
    cfg = method_config(config, method, global_batch)
    exp, steps = compile_steps(cfg, devices, chip)
    result = {'model': cfg.model.name, 'mode': cfg.model.mode, 'dtype': cfg.model.dtype,
              'per_chip_batch': global_batch // chips,
              'eval_per_chip_batch': exp.eval_batch_size // chips,
              'shard_params': cfg.mesh.shard_params,
              'per_example_activation_masks': cfg.binary.per_example_activation_masks,
              'masks_by': exp.binarization.masks_by, 'residuals': exp.binarization.residuals,
              'sites': len(exp.net.sites), 'steps': steps}
    log(f'{method} ({cfg.model.name}, mode {cfg.model.mode}, {cfg.model.dtype}):')
    for name, step in steps.items():
      per_chip = result['per_chip_batch'] if name in ('train', 'recalibrate') else (
          result['eval_per_chip_batch'])
      log(describe_step(name, step, per_chip, chip))
    if max_batch:
      result['max_batch'] = find_max_batch(config, method, devices, chip,
                                           result['per_chip_batch'], log)
      log(f'  {method}: largest per-chip train batch that fits:'
          f' {result["max_batch"]["max_per_chip_batch"]} (multiples of {BATCH_MULTIPLE})')
    if method != 'fp' and 'fp' in out['methods']:
      result['ratios_to_fp'] = ratios(result, out['methods']['fp'])
      for name, figures in result['ratios_to_fp'].items():
        log(f'  {name} / fp: ' + ', '.join(
            f'{k} {v:.3f}x' for k, v in figures.items() if v is not None))
    out['methods'][method] = result
  return out


def _from_flags() -> dict:
  """`preflight` of the command line's flags."""
  values = flags.FLAGS
  return preflight(values.config, values.topology, values.methods,
                   per_chip_batch=values.per_chip_batch, max_batch=values.find_max_batch,
                   log=lambda line: print(line, flush=True))


def main(argv):
  del argv  # Only the program's name: flag_errors.parse_flags refuses any other argument.
  jax.config.update('jax_platforms', 'cpu')  # The host runs nothing; the TPU only compiles.
  try:
    result = _from_flags()
  except errors.SetupError as e:
    errors.fail(str(e), errors.EXIT_BAD_INPUT)
  result['command'] = ' '.join(['python -m stompp_jax.preflight',
                                *(a for a in sys.argv[1:] if not a.startswith('--json'))])
  path = flags.FLAGS.json
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(result, f, indent=1, sort_keys=True)
      f.write('\n')
    os.replace(path + '.tmp', path)
    print(f'Wrote {path}', flush=True)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['config'])
  flag_errors.run(main, 'python -m stompp_jax.preflight')
