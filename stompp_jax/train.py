"""train_and_evaluate: the one entry point that the CLI, notebooks and tests call.

`experiment.build(config)` makes the run's pieces (no workdir I/O); then the workdir is
checked, the newest checkpoint of `workdir` restored if there is one, and the loop trains with
periodic logging, evaluation and checkpoints. See README.md for the run directory and the metric keys.
"""

import contextlib
import dataclasses
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from stompp_jax import checkpoints
from stompp_jax import errors
from stompp_jax import experiment
from stompp_jax import metrics as metrics_lib
from stompp_jax import parallel
from stompp_jax import recalibrate
from stompp_jax import sites as sites_lib
from stompp_jax import steps
from stompp_jax import workdir as workdir_lib
from stompp_jax.data import pipeline


class _Preemption:
  """SIGTERM asks the loop to save and stop at the next step boundary.

  One process: a Python SIGTERM handler sets a flag. Several processes: jax.distributed's
  preemption service receives the SIGTERM of any host and picks one step where all hosts stop
  (`reached_preemption_sync_point`, as orbax uses), so every host saves the same step.
  """

  def __init__(self):
    self.requested = False
    self._sync = jax.process_count() > 1
    self._handles_signal = not self._sync
    if self._handles_signal:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if not self._sync:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # The preemption service is off (jax_enable_preemption_service).
      logging.warning('No preemption service (%s): SIGTERM will stop this run without a'
                      ' checkpoint.', e)
      self._sync = False
      return False

  def close(self):
    if self._handles_signal:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)


def _closing(close):
  """An ExitStack exit callback running `close`; its failure after an error is only logged,
  so it does not hide that error (e.g. a full disk fails the save and then the close)."""
  def exit_callback(exc_type, exc, traceback):
    del exc, traceback
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if exc_type is None:
        raise
      logging.warning('Cleaning up after the error below failed too: %s: %s', type(e).__name__, e)
    return False
  return exit_callback


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       model: Any = None) -> dict[str, Any]:
  """Trains and evaluates one run in `workdir`, resuming it if it has checkpoints.

  `model`: None trains the zoo model `config.model.name`; else any `flax.linen.Module` called as
  `model(x, train=...)` returning logits, whose `nn.Conv` / `nn.Dense` layers matching
  `config.model.binary_include/exclude` become the sites (models.from_module; README, "Your own
  model"). Its config.json records the model's class (`model.own_class`); resuming such a run
  needs the same model again.

  Every check of the config, the data, the devices and the workdir's earlier run comes before
  anything is written to `workdir`; those failures raise errors.SetupError. Any other error
  (a bug in `model`, a storage failure) propagates as raised, with its traceback.

  Returns:
    The final row: {'step', 'eval/...': accuracies and losses, 'preempted': bool}. A finished
    run returns its done.json.

  Raises:
    errors.SetupError: a bad config field, missing or malformed data, a batch that does not split over
      the devices, or a workdir holding another run or only unreadable checkpoints.
    errors.NonFiniteError: a non-finite loss, gradient or BatchNorm statistic under
      train.on_nonfinite=error (naming the step; no checkpoint holds that update), or a
      non-finite state at a checkpoint.
    errors.DiskFullError: a checkpoint did not fit on disk (older ones are intact).
  """
  with contextlib.ExitStack() as cleanup:
    workdir_lib.check_workdir(workdir)
    exp = experiment.build(config, model=model)
    logging.info('Data: %s', pipeline.summary_line(config.data, exp.data))
    workdir_lib.check_same_run(workdir, exp.config)
    train_iter = pipeline.make_train_iterator(
        config.data, global_batch_size=config.train.batch_size, seed=config.seed)
    checkpointer = checkpoints.Checkpointer(
        workdir, config.train.keep_checkpoints,
        checkpoints.abstract_like(exp.abstract_state, exp.state_shardings))
    cleanup.push(_closing(checkpointer.close))
    restored = checkpointer.restore_latest(train_iter)
    parallel.check_same_on_all_processes('checkpoint step to resume from',
                                          -1 if restored is None else restored[0])

    if restored is None:
      state = jax.jit(exp.init_state, out_shardings=exp.state_shardings)()
      start_step = 0
    else:
      start_step, state = restored
      logging.info('Resumed from the checkpoint at step %d in %s.', start_step, checkpointer.directory)
      done = workdir_lib.read_done(workdir)
      if start_step >= exp.total_steps and done is not None:
        logging.info('%s is a finished run (done.json): nothing to do.', workdir)
        return done
    workdir_lib.write_config(workdir, exp.config)
    metrics_lib.trim(workdir, start_step)  # Rows a killed run logged after its checkpoint.
    if exp.net.sites:
      logging.info('Binarized sites (forward order):\n%s', sites_lib.site_table(exp.net.sites))
    return _train_loop(exp, _Run(workdir, cleanup, start_step, state, train_iter, checkpointer))


@dataclasses.dataclass
class _Run:
  """What the loop needs besides the build: where it writes and where it starts.

  Attributes:
    workdir: the run directory; cleanup: the ExitStack that closes writers and checkpoints.
    start_step, state: the step to start from and the train state there.
    train_iter: the data iterator (at `start_step`); checkpointer: saves into workdir.
  """

  workdir: str
  cleanup: contextlib.ExitStack
  start_step: int
  state: Any
  train_iter: Any
  checkpointer: checkpoints.Checkpointer


def _train_loop(exp: experiment.Experiment, run: _Run) -> dict[str, Any]:
  """Trains from `run.start_step` to `exp.total_steps` (or a preemption), logging and saving."""
  config, workdir, checkpointer, train_iter = exp.config, run.workdir, run.checkpointer, run.train_iter
  config_json = config.to_dict()
  policy = config.train.on_nonfinite
  state, start_step, total_steps, mesh = run.state, run.start_step, exp.total_steps, exp.mesh
  # Every program is compiled before the first step and the processes then wait for each other:
  # a process still compiling must not keep the others waiting inside a collective (gloo on CPU
  # gives up after 30 s).
  logging.info('Compiling the train and eval steps...')
  compile_start = time.perf_counter()
  train_step = exp.compile_train_step()
  eval_fns = exp.compile_eval_steps()
  logging.info('Compiled in %.1f s.', time.perf_counter() - compile_start)
  recalibrator = None
  if config.train.recalibrate_bn_batches and 'eval_fully_binary' in eval_fns:
    recalibrator = recalibrate.Recalibrator(
        exp.model, exp.binarization, exp.abstract_state, exp.state_shardings,
        exp.abstract_batch(config.train.batch_size), config.train.recalibrate_bn_batches)
  parallel.wait_for_all_processes('stompp_jax: every process compiled its programs')

  def eval_batches():
    iterator = pipeline.make_eval_iterator(
        config.data, global_batch_size=exp.eval_batch_size,
        max_examples=config.train.eval_steps * exp.eval_batch_size)
    for batch in iterator:
      yield parallel.global_batch(batch, mesh)

  def run_eval(step):
    logging.info('Evaluating at step %d...', step)
    results = steps.evaluate(state, eval_fns, eval_batches)
    if recalibrator is not None:  # The fully binary network with re-estimated BN statistics.
      recalibrated = recalibrate.recalibrated_state(
          recalibrator, state, config.data, global_batch_size=config.train.batch_size,
          seed=config.seed, mesh=mesh)
      results.update(steps.evaluate(recalibrated, {'eval_fully_binary_recalibrated':
                                                   eval_fns['eval_fully_binary']}, eval_batches))
    writer.write(step, 'eval', results)
    logging.info('eval at step %d | %s', step, ' | '.join(
        f'{k} {100 * v:.2f}%' for k, v in results.items() if k.endswith('accuracy')))
    return {'step': step, **results}

  writer = metrics_lib.MetricWriter(workdir, start_step)
  run.cleanup.push(_closing(writer.close))
  if start_step == 0:
    writer.write_config(config_json)
  preemption = _Preemption()
  run.cleanup.push(_closing(preemption.close))
  train_metrics, nonfinite_flags, per_site = None, [], {}
  last_row = _logged_eval(workdir, start_step) if start_step == total_steps else {'step': None}
  window_start, window_steps, step_time = time.perf_counter(), 0, None
  step = start_step
  while step < total_steps:
    batch = parallel.global_batch(next(train_iter), mesh)
    state, averaged, per_site = train_step(state, batch)
    step += 1
    window_steps += 1
    train_metrics = averaged if train_metrics is None else train_metrics.merge(averaged)
    nonfinite_flags.append(averaged.nonfinite.total)
    if policy == 'error' and len(nonfinite_flags) > 1:
      # The previous step's flag: waiting for it keeps this step queued, so the loop stops one
      # step after a non-finite one without stalling the device.
      _check_finite(nonfinite_flags[:-1], step - 1, policy)
      nonfinite_flags = nonfinite_flags[-1:]
    is_last = step == total_steps
    if step % config.train.log_every == 0 or is_last:
      _check_finite(nonfinite_flags, step, policy)
      nonfinite_flags = []
      values = {k: float(v) for k, v in train_metrics.compute().items()}
      elapsed = time.perf_counter() - window_start
      step_time = elapsed / window_steps
      values.update(learning_rate=float(exp.lr_schedule(step - 1)),
                    images_per_second=config.train.batch_size / step_time,
                    eta_seconds=step_time * (total_steps - step),
                    **{k: np.asarray(v) for k, v in per_site.items()})
      writer.write(step, 'train', values)
      logging.info('step %d/%d | loss %.4f | acc %.2f%% | %.0f img/s | ETA %s', step, total_steps,
                   values['loss'], 100 * values['accuracy'], values['images_per_second'],
                   format_duration(values['eta_seconds']))
      train_metrics, window_start, window_steps = None, time.perf_counter(), 0
    if is_last or (config.train.eval_every and step % config.train.eval_every == 0):
      last_row = run_eval(step)
      window_start = time.perf_counter()
    preempted = preemption.reached(step)
    if is_last or preempted or step % config.train.checkpoint_every == 0:
      _check_finite(nonfinite_flags, step, policy)
      nonfinite_flags = []
      checkpointer.save(step, state, train_iter, config_json)
    if preempted:
      checkpointer.wait()
      parallel.wait_for_all_processes('stompp_jax: preemption checkpoint saved')  # Then exit.
      logging.warning('Preempted (SIGTERM): saved the checkpoint at step %d in %s; run the same'
                      ' command to resume.', step, checkpointer.directory)
      return {**last_row, 'step': step, 'preempted': True}
  checkpointer.wait()
  if last_row['step'] != step:  # Resumed at the last step, whose eval was not logged.
    last_row = run_eval(step)
  last_row = {**last_row, 'step': step, 'preempted': False}
  workdir_lib.write_done(workdir, last_row)
  return last_row


def _logged_eval(workdir: str, step: int) -> dict[str, Any]:
  """The eval row ({'step': step, metric: value...}) an earlier process of this run logged at
  `step`, else {'step': None}: a run stopped between its last checkpoint and done.json finishes
  with that row instead of evaluating again."""
  for row in reversed(metrics_lib.read_metrics(workdir)):
    if row['step'] == step and row['split'] == 'eval':
      return {k: v for k, v in row.items() if k != 'split'}
  return {'step': None}


def _check_finite(flags: list, step: int, policy: str) -> None:
  """Raises at the first non-finite step under policy 'error'; `flags` end at `step`."""
  if not flags:
    return
  values = np.asarray(jax.device_get(flags))
  bad = np.flatnonzero(values > 0)
  if bad.size == 0:
    return
  first = step - len(flags) + int(bad[0]) + 1
  if policy == 'error':
    raise errors.NonFiniteError(
        f'The loss, the gradients or the new BatchNorm statistics are not finite at step'
        f' {first}; that update was not applied and no checkpoint holds it: lower'
        ' optim.learning_rate (or set optim.grad_clip_norm), or set train.on_nonfinite=skip to'
        ' drop such updates.')
  logging.warning('Skipped %d non-finite updates up to step %d.', bad.size, step)
