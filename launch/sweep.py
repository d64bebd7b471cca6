"""Expands a grid of configs into training runs, and lists, prints or runs them.

  python -m launch.sweep r50_bnn_cifar --list     # every run and its status
  python -m launch.sweep r50_bnn_cifar --print    # a shell command per unfinished run
  python -m launch.sweep r50_bnn_cifar --run      # here, one after another
  python -m launch.sweep --config=configs/cifar.py:model=resnet18,mode=bnn \\
      --arg dataset=cifar10,cifar100 --grid binary.method=ste,stompp --grid seed=0,1,2 --print

Each run has its own workdir WORKDIR_ROOT/NAME/RUN, where RUN spells out every config argument
and axis override of the run, e.g. `dataset=cifar10,method=ste,mode=bnn,model=resnet50,seed=0`,
so a run always gets the same workdir. Runs whose workdir holds done.json are skipped; any other
run is started, and the trainer resumes it from its newest checkpoint. --run goes on past a failed
run, names the failures at the end and then exits with status 1.
"""

import argparse
import dataclasses
import itertools
import math
import re
import shlex
import subprocess
import sys
import textwrap

from etils import epath

from launch.sweeps import GRIDS, Grid
from stompp_jax import storage
from stompp_jax import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  argv: tuple[str, ...]  # Arguments of `python -m stompp_jax.main`.


def run_name(args: dict, overrides: dict) -> str:
  """The run's folder name: every `key=value`, config arguments then overrides, each sorted."""
  pairs = sorted(args.items()) + sorted(overrides.items())
  name = ','.join(f'{key}={value}' for key, value in pairs)
  return re.sub(r'[^A-Za-z0-9._=,+-]', '_', name) or 'default'


def expand(grid: Grid, root: str, fixed: dict) -> list[Run]:
  """One Run per combination of axis values; `fixed` overrides go to every run, unnamed."""
  clash = set(fixed) & set(grid.overrides)
  if clash:
    raise ValueError(f'both an axis and --set: {", ".join(sorted(clash))}')
  runs = []
  for values in itertools.product(*grid.args.values(), *grid.overrides.values()):
    args = dict(zip(grid.args, values))
    overrides = dict(zip(grid.overrides, values[len(args):]))
    workdir = f'{root}/{run_name(args, overrides)}'
    config = grid.config + (':' + ','.join(f'{k}={v}' for k, v in args.items()) if args else '')
    argv = [f'--config={config}', f'--workdir={workdir}']
    argv += [f'--config.{k}={v}' for k, v in {**overrides, **fixed}.items()]
    runs.append(Run(workdir, tuple(argv)))
  workdirs = [run.workdir for run in runs]
  repeated = sorted({w for w in workdirs if workdirs.count(w) > 1})
  if repeated:
    raise ValueError(f'several runs map to the same workdir: {repeated}')
  return runs


def status(workdir: str) -> str:
  """done (workdir_lib.DONE), started (workdir_lib.CONFIG) or new. Works on gs:// paths too."""
  path = storage.path(workdir)
  if (path / workdir_lib.DONE).exists():
    return 'done'
  return 'started' if (path / workdir_lib.CONFIG).exists() else 'new'


def run_all(runs: list[Run], launcher: list[str]) -> int:
  """Runs one after another, past failures; returns 1 if any failed."""
  failed = []
  for i, run in enumerate(runs, 1):
    command = launcher + list(run.argv)
    print(f'[{i}/{len(runs)}] {shlex.join(command)}', flush=True)
    returncode = subprocess.run(command, check=False).returncode
    if returncode:
      failed.append(f'{run.workdir} (exit status {returncode})')
  if failed:
    print(f'{len(failed)} of {len(runs)} runs failed:', *failed, sep='\n  ', file=sys.stderr)
    return 1
  return 0


def axis(text: str) -> tuple[str, list[str]]:
  key, _, values = text.partition('=')
  if not key or not values:
    raise argparse.ArgumentTypeError(f'expected KEY=VALUE[,VALUE...], got {text!r}')
  return key, values.split(',')


def setting(text: str) -> tuple[str, str]:
  key, _, value = text.partition('=')
  if not key or not value:
    raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
  return key, value


def grid_from_config(spec: str) -> Grid:
  """`configs/x.py:a=1,b=2` -> a Grid with the one-value argument axes a and b."""
  config, _, args = spec.partition(':')
  return Grid('', config, args={k: [v] for k, v in (setting(a) for a in args.split(',') if a)})


def grids_help() -> str:
  lines = ['named grids (number of runs, seeds included):']
  for name, grid in GRIDS.items():
    runs = math.prod(len(v) for v in (*grid.args.values(), *grid.overrides.values()))
    lines += textwrap.wrap(f'{name} ({runs} runs): {grid.doc}', 96, initial_indent='  ',
                           subsequent_indent='      ')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m launch.sweep', description=__doc__, epilog=grids_help(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('grid', nargs='?', help='a named grid (below); or give --config')
  parser.add_argument('--config', type=grid_from_config, metavar='FILE[:ARGS]',
                      help='config of a grid made from --arg/--grid')
  parser.add_argument('--arg', action='append', default=[], type=axis, metavar='KEY=V1,V2',
                      help="axis of config argument KEY (replaces the grid's)")
  parser.add_argument('--grid', dest='overrides', action='append', default=[], type=axis,
                      metavar='KEY=V1,V2', help="axis of --config.KEY (replaces the grid's)")
  parser.add_argument('--set', action='append', default=[], type=setting, metavar='KEY=VALUE',
                      help='--config.KEY=VALUE for every run, left out of run names: for what '
                           'does not change the experiment (data location, logging)')
  parser.add_argument('--workdir-root', default='runs', help='default: runs (may be gs://...)')
  parser.add_argument('--name', help='folder under the root; default: the grid name, or the '
                                     "config file's name without .py")
  parser.add_argument('--launcher', default='python -m stompp_jax.main',
                      help='command that the run arguments follow (default: %(default)s), e.g. '
                           '"sbatch launch/gpu_slurm.sbatch"')
  action = parser.add_mutually_exclusive_group(required=True)
  action.add_argument('--list', action='store_true', help='print every run with its status')
  action.add_argument('--print', action='store_true', help='print unfinished runs as commands')
  action.add_argument('--run', action='store_true', help='run unfinished runs one after another')
  ns = parser.parse_args(argv)

  if bool(ns.grid) == bool(ns.config):
    parser.error('give either a named grid or --config')
  if ns.grid and ns.grid not in GRIDS:
    parser.error(f'unknown grid {ns.grid!r}; named grids: {", ".join(GRIDS)}')
  base = GRIDS[ns.grid] if ns.grid else ns.config
  grid = dataclasses.replace(base, args={**base.args, **dict(ns.arg)},
                             overrides={**base.overrides, **dict(ns.overrides)})
  name = ns.name or ns.grid or epath.Path(base.config).stem
  try:
    runs = expand(grid, f'{ns.workdir_root.rstrip("/")}/{name}', dict(ns.set))
  except ValueError as e:
    parser.error(str(e))

  if ns.list:
    for run in runs:
      print(f'{status(run.workdir):8} {run.workdir}')
    return 0
  todo = [run for run in runs if status(run.workdir) != 'done']
  print(f'# skipping the {len(runs) - len(todo)} finished runs of {len(runs)}', file=sys.stderr)
  launcher = shlex.split(ns.launcher)
  if ns.print:
    for run in todo:
      print(shlex.join(launcher + list(run.argv)))
    return 0
  return run_all(todo, launcher)


if __name__ == '__main__':
  sys.exit(main())
