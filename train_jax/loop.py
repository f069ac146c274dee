"""The one training loop every family runs.

A family supplies a `Task` (init, train step, data, evaluators); this module does
the rest: sharded init, resume, the jitted step, metrics, evaluation, checkpoints,
preemption and the non-finite-loss guard.

Several processes (hosts) run this same function; each feeds its own data shard and
calls every checkpoint save (Orbax writes each process's shards), while metrics,
TensorBoard, plots and printed summaries come from process 0 only.
"""

import json
import os
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import NamedSharding, PartitionSpec as P

from jax.experimental import multihost_utils

from train_jax import checkpoint as checkpoint_lib
from train_jax import metrics as metrics_lib
from train_jax import sharding
from train_jax.preemption import RunInterrupted, StopRequests
from train_jax.state import TrainState
from train_jax.task import Task


class NonFiniteLossError(RuntimeError):
  """A loss term became NaN or inf; the run stops before saving that state."""


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
  """Lowers and compiles the step once, timed: compile time is measured like step time.
  `state` may be abstract (ShapeDtypeStructs with shardings)."""
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, {"compile/lower_s": t1 - t0, "compile/compile_s": time.perf_counter() - t1}


class _CompileAhead:
  """The step lowered and compiled in a thread, against the state's shapes, while the main
  thread initialises the state (a fresh run's start-up: the init's own XLA compile, one
  core): on a 2-core CPU the step's compile (~1.6 cores) then overlaps start-up."""

  def __init__(self, step_fn, abstract_state, batch, mesh):
    self._out: Any = None

    def work():
      try:
        with jax.set_mesh(mesh):
          self._out = _compile_step(step_fn, abstract_state, batch)
      except BaseException as e:  # noqa: BLE001  re-raised in the main thread by `result`
        self._out = e

    # A daemon: a start-up error in the main thread does not wait for the compile to end.
    self._thread = threading.Thread(target=work, name="compile_train_step", daemon=True)
    self._thread.start()

  def result(self) -> tuple[Any, dict[str, float]]:
    """(compiled step, timings); `compile/wait_s`: how long the main thread waited."""
    t0 = time.perf_counter()
    self._thread.join()
    if isinstance(self._out, BaseException):
      raise self._out
    compiled, timings = self._out
    return compiled, dict(timings, **{"compile/wait_s": time.perf_counter() - t0})


def _any_process(flag: bool) -> bool:
  """True when `flag` holds on some process: every process must stop at the same step."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_task: Callable[[ml_collections.ConfigDict, Any], Task],
                       started: float | None = None) -> TrainState:
  """Trains `config.total_steps` steps of the family's task, resuming from `workdir`.

  `started` is the `time.perf_counter()` of the program's start (default: now); the first
  step's completion is reported against it (`compile/first_step_s`).

  Raises `RunInterrupted` (after saving when the state is consistent) when a second
  signal arrives, or when a first one is not acted on within `preemption_grace_s`.
  """
  started = time.perf_counter() if started is None else started
  if int(config.total_steps) < 1:
    raise ValueError(f"total_steps must be at least 1, got {config.total_steps}")
  is_main = jax.process_index() == 0
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  # Before any compute: an unwritable directory is reported now, not at the first save.
  checkpoint_lib.check_writable(ckpt_dir)
  config_dict = json.loads(config.to_json_best_effort())
  mesh = sharding.make_mesh(config.mesh)
  task = make_task(config, mesh)

  key = jax.random.key(config.seed)
  abstract_state, state_shardings = sharding.abstract_init(task.init, mesh, config.axis_rules,
                                                           key)
  replicated = NamedSharding(mesh, P())
  step_fn = jax.jit(task.train_step, out_shardings=(state_shardings, replicated),
                    donate_argnums=(0,))
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, config.keep_checkpoints,
                                     fallback=bool(config.get("checkpoint_fallback", True)))
  compiling, first_batch = None, None
  try:
    # A fresh run compiles its step while it initialises the state (`compile_ahead`); the
    # compile needs the batch's shapes, so the first batch is read first. A resumed run
    # compiles after restoring (its data iterator moves to the checkpoint's position).
    if config.get("compile_ahead", True) and not ckpt.all_steps():
      first_batch = sharding.global_batch(next(task.train_data), mesh, task.batch_spec)
      compiling = _CompileAhead(step_fn, abstract_state, first_batch, mesh)
    state, _ = sharding.sharded_init(task.init, mesh, config.axis_rules, key,
                                     shardings=state_shardings)
    start, state = ckpt.restore_latest(
        state, task.train_data, config=config_dict,
        data_on_process_change=config.get("data_state_on_process_change", "error"))
  except BaseException:
    ckpt.close()
    raise
  writer = metrics_lib.MetricWriter(workdir, is_main=is_main)
  if start:
    writer.truncate_after(start)
    if is_main:
      print(f"Resumed from step {start} ({workdir}/checkpoints).", flush=True)

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
    ckpt.save(step, state, task.train_data, config_dict)
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
  # Where the main thread is, for a forced stop: "data" (state is the last step's, the
  # iterator is reset to `data_before`), "step" (state may be donated: not saved),
  # "idle" (between steps or evaluating: consistent).
  phase, data_before = "idle", None
  try:
    with StopRequests(config.get("preemption_grace_s", 30.0)) as stop, jax.set_mesh(mesh):
      try:
        while step < total:
          phase, data_before = "data", task.train_data.get_state()
          if first_batch is not None:   # read before the init, for the compile ahead
            batch, first_batch = first_batch, None
            phase = "step"
          else:
            local = next(task.train_data)
            phase = "step"
            batch = sharding.global_batch(local, mesh, task.batch_spec)
          if step == start:   # the executable every step runs; its compile time in metrics
            startup_s = time.perf_counter() - started
            step_fn, timings = (compiling.result() if compiling is not None
                                else _compile_step(step_fn, state, batch))
            timings["compile/startup_s"] = startup_s
            if jax.process_count() > 1:  # start together: CPU (gloo) collectives wait only 30 s
              multihost_utils.sync_global_devices("train_step_compiled")
            if is_main:
              ahead = (f"; compiled during start-up, then waited {timings['compile/wait_s']:.1f} s"
                       if compiling is not None else "")
              tqdm.tqdm.write(f"Compiled the train step in {timings['compile/compile_s']:.1f} s "
                              f"(lowering {timings['compile/lower_s']:.1f} s{ahead}; compilation "
                              f"cache: {jax.config.jax_compilation_cache_dir or 'off'}).")
          state, step_metrics = step_fn(state, batch)
          if step == start:   # one host sync: how long start-up took, up to a finished step
            jax.block_until_ready(step_metrics)
            timings["compile/first_step_s"] = time.perf_counter() - started
            writer.write(step, timings)
            if is_main:
              tqdm.tqdm.write(f"First train step done {timings['compile/first_step_s']:.1f} s "
                              f"after launch ({timings['compile/first_step_s'] - startup_s:.1f} s "
                              f"after start-up, which took {startup_s:.1f} s).")
          phase = "idle"
          if stop.requested:   # not blocked: stopping at the next (agreed) boundary
            stop.acknowledge()
          step += 1
          pending.append((step, step_metrics))
          bar.update(1)

          at_log = step % config.log_every_steps == 0 or step == total
          at_ckpt = step % config.checkpoint_every_steps == 0 or step == total
          # Several processes agree at host-sync points only, so steps stay asynchronous.
          check_stop = jax.process_count() == 1 or at_log or at_ckpt
          stop_now = check_stop and _any_process(stop.requested is not None)
          if at_log or at_ckpt or stop_now:
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
          if stop_now:
            stop.acknowledge()
            preempted = stop.requested or "a stop request on another process"
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
      except RunInterrupted as e:
        raise _stop_now(e, phase, step, last_saved, data_before, task, save, ckpt_dir) from None
  finally:
    bar.close()
    ckpt.close()   # waits for async saves: a NaN stop leaves the last good one complete
    writer.close()

  if preempted:
    if is_main:
      print(f"Received {preempted}: saved a checkpoint at step {step} in "
            f"{workdir}/checkpoints; rerun the same command to resume.", flush=True)
    return state
  if task.finish is not None:   # every process: it may compute with the sharded state
    task.finish(state, workdir)
  if is_main:
    print(f"Done at step {step}. Metrics: {writer.path}  TensorBoard: {workdir}/tensorboard  "
          f"Checkpoints: {workdir}/checkpoints", flush=True)
  return state


def _stop_now(e: RunInterrupted, phase: str, step: int, last_saved: int, data_before,
              task: Task, save: Callable[[int], None], ckpt_dir: str) -> RunInterrupted:
  """Saves after a forced stop when that is safe; returns the error to raise."""
  where = {"data": "waiting for data", "step": "in a step (compiling or dispatching)",
           "idle": "between steps or evaluating"}[phase]
  saved = f"the last checkpoint is step {last_saved}" if last_saved else "no checkpoint exists"
  if phase == "step":
    note = f"no consistent state to save; {saved}"
  elif jax.process_count() > 1:
    note = f"not saving (the other processes may not be stopping); {saved}"
  elif step == last_saved:
    note = f"step {step} is already saved"
  else:
    try:
      if phase == "data":
        task.train_data.set_state(data_before)  # the position before the unfinished batch
      save(step)
      note = f"saved step {step}"
    except Exception as err:  # noqa: BLE001  stopping is what matters now
      note = f"could not save ({type(err).__name__}: {err}); {saved}"
  msg = f"Stopped: {e} while {where}; {note} in {ckpt_dir}. Rerun the same command to resume."
  print(msg, flush=True)
  return RunInterrupted(msg, e.exit_code - 128)
