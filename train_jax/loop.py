"""The one training loop every family runs.

A family supplies a `Task` (init, train step, data, evaluators); this module does
the rest: sharded init, resume, the jitted step, metrics, evaluation, checkpoints,
preemption and the non-finite-loss guard.
"""

import contextlib
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from train_jax import checkpoint as checkpoint_lib
from train_jax import metrics as metrics_lib
from train_jax import sharding
from train_jax.state import TrainState
from train_jax.task import Task


class NonFiniteLossError(RuntimeError):
  """A loss term became NaN or inf; the run stops before saving that state."""


class _Preemption:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, no preemption support
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_finite(pending: list[tuple[int, Any]], loss_keys) -> list[tuple[int, dict]]:
  """Fetches the queued step metrics; raises at the first non-finite loss term."""
  fetched = jax.device_get(pending)
  for step, m in fetched:
    bad = [k for k in loss_keys if k in m and not np.all(np.isfinite(m[k]))]
    if bad:
      terms = ", ".join(f"{k}={float(np.asarray(v)):.6g}" for k, v in sorted(m.items()))
      raise NonFiniteLossError(
          f"non-finite loss at step {step} ({', '.join(bad)}): {terms}. "
          "Stopped without saving this state; the last checkpoint is intact.")
  return fetched


def _compile_step(step_fn, state, batch) -> tuple[Any, dict[str, float]]:
  """Lowers and compiles the step once, timed: compile time is measured like step time."""
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, {"compile/lower_s": t1 - t0, "compile/compile_s": time.perf_counter() - t1}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_task: Callable[[ml_collections.ConfigDict, Any], Task]) -> TrainState:
  """Trains `config.total_steps` steps of the family's task, resuming from `workdir`."""
  if int(config.total_steps) < 1:
    raise ValueError(f"total_steps must be at least 1, got {config.total_steps}")
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  task = make_task(config, mesh)

  state, state_shardings = sharding.sharded_init(
      task.init, mesh, config.axis_rules, jax.random.key(config.seed))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                     config.keep_checkpoints)
  writer = metrics_lib.MetricWriter(workdir, is_main=is_main)
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore(start, state, task.train_data)
    writer.truncate_after(start)
    if is_main:
      print(f"Resumed from step {start} ({workdir}/checkpoints).", flush=True)

  replicated = NamedSharding(mesh, P())
  step_fn = jax.jit(task.train_step, out_shardings=(state_shardings, replicated),
                    donate_argnums=(0,))
  total = int(config.total_steps)
  pending: list[tuple[int, Any]] = []   # device metrics since the last host check
  last_saved = start
  last_eval = start if start else -1

  def log_and_check():
    fetched = _check_finite(pending, task.loss_keys)
    pending.clear()
    return fetched

  def save(step):
    nonlocal last_saved
    ckpt.save(step, state, task.train_data)
    last_saved = step

  def evaluate(step):
    nonlocal last_eval
    if task.evaluate is not None:
      scores = task.evaluate(state)
      writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
      if is_main:
        tqdm.tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    last_eval = step

  bar = tqdm.tqdm(total=total, initial=start, disable=not (is_main and config.progress_bar),
                  dynamic_ncols=True, desc=config.family or "train")
  preempted = None
  step = start
  try:
    with _Preemption() as preemption, jax.set_mesh(mesh):
      while step < total:
        batch = sharding.global_batch(next(task.train_data), mesh, task.batch_spec)
        if step == start:   # the executable every step runs; its compile time in metrics
          step_fn, timings = _compile_step(step_fn, state, batch)
          writer.write(step, timings)
          if is_main:
            tqdm.tqdm.write(f"Compiled the train step in {timings['compile/compile_s']:.1f} s "
                            f"(lowering {timings['compile/lower_s']:.1f} s; compilation cache: "
                            f"{jax.config.jax_compilation_cache_dir or 'off'}).")
        state, step_metrics = step_fn(state, batch)
        step += 1
        pending.append((step, step_metrics))
        bar.update(1)

        at_log = step % config.log_every_steps == 0 or step == total
        at_ckpt = step % config.checkpoint_every_steps == 0 or step == total
        if at_log or at_ckpt or preemption.requested:
          fetched = log_and_check()
          if at_log:
            scalars = {f"train/{k}": v for k, v in fetched[-1][1].items()}
            if task.host_metrics is not None:
              scalars.update({f"train/{k}": v for k, v in task.host_metrics().items()})
            writer.write(step, scalars)
            if task.loss_keys and task.loss_keys[0] in fetched[-1][1]:
              bar.set_postfix(loss=f"{float(fetched[-1][1][task.loss_keys[0]]):.4f}")
        if config.eval_every_steps and step % config.eval_every_steps == 0:
          evaluate(step)
        if at_ckpt:
          save(step)
        if preemption.requested:
          preempted = preemption.requested
          break
      if pending:
        log_and_check()
      if preempted and last_saved != step:
        save(step)
      if not preempted and step > start:
        if last_eval != step:
          evaluate(step)
        if last_saved != step:
          save(step)
  finally:
    bar.close()
    ckpt.close()   # waits for async saves: a NaN stop leaves the last good one complete
    writer.close()

  if preempted:
    if is_main:
      print(f"Received {preempted}: saved a checkpoint at step {step} in "
            f"{workdir}/checkpoints; rerun the same command to resume.", flush=True)
    return state
  if task.finish is not None and is_main:
    task.finish(state, workdir)
  if is_main:
    print(f"Done at step {step}. Metrics: {writer.path}  TensorBoard: {workdir}/tensorboard  "
          f"Checkpoints: {workdir}/checkpoints", flush=True)
  return state
