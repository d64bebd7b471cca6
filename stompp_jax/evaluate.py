"""Evaluates the newest checkpoint of a run, fully binary and as trained.

    python -m stompp_jax.evaluate --workdir=RUN [--split=test|train] [--allow_unfinished]
        [--recalibrate_bn_batches=N]

prints one line for the fully binary network (every mask = 1: the network you would deploy)
and one for the network as trained at that step (its masks at the checkpoint's step), each with
accuracy and loss over the whole split; with --recalibrate_bn_batches=N > 0 a third line for the
fully binary network with its BatchNorm statistics re-estimated on N training batches
(`stompp_jax.recalibrate`; the checkpoint is not changed). Splits: 'test' is the eval split of the run's data (CIFAR test,
ImageNet validation), 'train' the train split without augmentation. A float run (binary.method
fp) has only the second line. The run's config.json rebuilds the model; a run of your own model
(train_and_evaluate(..., model=...)) is evaluated from Python: `evaluate_run(RUN, model=...)`.

Exit status 2 with one line `Error: ...` for a bad flag or an extra argument, a directory that
is not a run, a run without a checkpoint, or an unfinished run (no done.json) unless
--allow_unfinished.
"""

import dataclasses
import functools
from typing import Any

from absl import flags
from absl import logging
import ml_collections

from stompp_jax import checkpoints
from stompp_jax import compiler
from stompp_jax import errors
from stompp_jax import experiment
from stompp_jax import flag_errors
from stompp_jax import recalibrate
from stompp_jax import state as state_lib
from stompp_jax import steps
from stompp_jax import workdir as workdir_lib
from stompp_jax.binary import context as bctx
from stompp_jax.choices import check_at_least
from stompp_jax.choices import check_choice
from stompp_jax.data import pipeline

SPLITS = {'test': 'eval', 'train': 'train'}  # Our name -> the data pipeline's split.


class RunError(errors.SetupError):
  """The directory is not a run that can be evaluated (the message says what to do)."""


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of the run in `workdir` (local or gs://), upgraded to today's fields."""
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise RunError(f'{workdir} is not a run directory (no config.json): give the --workdir of a'
                   ' training run.')
  return ml_collections.ConfigDict(config)


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run rebuilt from its directory: what evaluation and the portable export need.

  Attributes:
    config: its config.json.
    info: its data (classes, shapes, split sizes).
    total_steps: its planned steps.
    model: the zoo model of its config, or the given model (`models.from_module`).
    binarization: its static binarization settings and site table.
    step: the newest checkpoint's step.
    state: that checkpoint's train state without the optimizer state.
  """

  config: ml_collections.ConfigDict
  info: pipeline.DatasetInfo
  total_steps: int
  model: Any
  binarization: bctx.BinarizationConfig
  step: int
  state: state_lib.TrainState


def load_run(workdir: str, *, model: Any = None, allow_unfinished: bool = False) -> Run:
  """Rebuilds the run in `workdir` at its newest checkpoint.

  Args:
    workdir: a run directory of train_and_evaluate.
    model: the Linen model the run was trained with, for a run of your own model; None
      rebuilds the zoo model of its config.
    allow_unfinished: accept a run without done.json (preempted or still training).

  Raises:
    RunError: no run or an unfinished run.
    errors.SetupError: the run has no checkpoint.
  """
  config = read_run_config(workdir)
  info = pipeline.dataset_info(config.data)
  net = experiment.build_model(config, num_classes=info.num_classes,
                               image_shape=info.image_shape, model=model)
  total_steps, binarization = experiment.saved_run_binarization(config, net.sites,
                                                                info.train_size)
  step, restored = checkpoints.read_state(workdir)
  if workdir_lib.read_done(workdir) is None and not allow_unfinished:
    raise RunError(f'{workdir} is unfinished (newest checkpoint at step {step} of {total_steps},'
                   ' no done.json): rerun its training command to finish it, or pass'
                   f' --allow_unfinished to use step {step}.')
  state = state_lib.TrainState(step=restored['step'], params=restored['params'],
                               batch_stats=restored['batch_stats'], opt_state=None,
                               mask_key=restored['mask_key'])
  return Run(config, info, total_steps, net.model, binarization, int(step), state)


def evaluate_run(workdir: str, *, split: str = 'test', model: Any = None,
                 allow_unfinished: bool = False,
                 recalibrate_bn_batches: int = 0) -> dict[str, Any]:
  """Accuracy and loss of the newest checkpoint of `workdir` over the whole `split`.

  Args:
    workdir, model, allow_unfinished: as for `load_run`.
    split: 'test' (the eval split) or 'train' (no augmentation).
    recalibrate_bn_batches: 0, or n > 0 to also evaluate the fully binary network with BatchNorm
      statistics re-estimated over the run's first n training batches (binary runs only).

  Returns:
    {'step', 'total_steps', 'examples', 'split', 'eval_fully_binary_accuracy',
     'eval_fully_binary_loss' (binary runs), 'eval_fully_binary_recalibrated_accuracy' and
     '_loss' (with recalibrate_bn_batches), 'eval_accuracy', 'eval_loss'}.

  Raises:
    RunError, errors.SetupError: as `load_run`.
  """
  check_choice('split', split, tuple(SPLITS))
  check_at_least('--recalibrate_bn_batches', recalibrate_bn_batches, 0)
  run = load_run(workdir, model=model, allow_unfinished=allow_unfinished)
  eval_fns = {'eval_fully_binary': True} if run.config.binary.method != 'fp' else {}
  eval_fns['eval'] = False
  eval_fns = {name: compiler.jit(functools.partial(steps.eval_step, model=run.model,
                                                   binarization=run.binarization,
                                                   fully_binary=fully_binary))
              for name, fully_binary in eval_fns.items()}
  batch_size = run.config.train.eval_batch_size
  batches = lambda: pipeline.make_eval_iterator(run.config.data, global_batch_size=batch_size,
                                                process_index=0, process_count=1,
                                                split=SPLITS[split])
  results = steps.evaluate(run.state, eval_fns, batches)
  if recalibrate_bn_batches > 0 and 'eval_fully_binary' in eval_fns:
    variables = recalibrate.recalibrate_variables(
        run.config, run.model, run.binarization,
        {'params': run.state.params, 'batch_stats': run.state.batch_stats},
        recalibrate_bn_batches)
    recalibrated = run.state.replace(batch_stats=variables['batch_stats'])
    results.update(steps.evaluate(
        recalibrated, {'eval_fully_binary_recalibrated': eval_fns['eval_fully_binary']}, batches))
  examples = run.info.eval_size if split == 'test' else run.info.train_size
  return dict(step=run.step, total_steps=run.total_steps, examples=examples, split=split,
              **results)


def render(results: dict[str, Any]) -> str:
  """One line per evaluated network: accuracy, loss, split, examples and step."""
  where = (f'{results["split"]} split, {results["examples"]} examples, step {results["step"]}'
           f' of {results["total_steps"]}')
  names = [('fully binary', 'eval_fully_binary'),
           ('recalibrated', 'eval_fully_binary_recalibrated'), ('as trained', 'eval')]
  return '\n'.join(f'{label + ":":14s}accuracy {100 * results[f"{key}_accuracy"]:.2f}%  loss'
                   f' {results[f"{key}_loss"]:.4f}  ({where})'
                   for label, key in names if f'{key}_accuracy' in results)


def main(argv):
  del argv  # Only the program's name: flag_errors.parse_flags refuses any other argument.
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO.
  workdir = flags.FLAGS.workdir
  if not workdir:
    errors.fail('--workdir is missing: give the run directory to evaluate.', errors.EXIT_BAD_INPUT)
  try:
    results = evaluate_run(workdir, split=flags.FLAGS.split,
                           allow_unfinished=flags.FLAGS.allow_unfinished,
                           recalibrate_bn_batches=flags.FLAGS.recalibrate_bn_batches)
  except errors.SetupError as e:
    errors.fail(str(e), errors.EXIT_BAD_INPUT)
  print(render(results))


if __name__ == '__main__':
  # Defined here, not at import: the export imports this module and has a --workdir of its own.
  flags.DEFINE_string('workdir', None, 'Run directory of a training run.')
  flags.DEFINE_enum('split', 'test', list(SPLITS), 'test: the eval split; train: the train split'
                    ' without augmentation.')
  flags.DEFINE_bool('allow_unfinished', False, 'Evaluate the newest checkpoint of an unfinished'
                    ' run.')
  flags.DEFINE_integer('recalibrate_bn_batches', 0, 'Also evaluate the fully binary network with'
                       ' BatchNorm statistics re-estimated on this many training batches.')
  flag_errors.run(main, 'python -m stompp_jax.evaluate')
