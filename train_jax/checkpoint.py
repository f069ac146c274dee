"""Orbax checkpoints of the train state, the grain iterator position and the config.

`<workdir>/checkpoints/<step>/` holds three items:
  state  the TrainState (each process writes its own shards)
  data   one grain iterator state per process: `process_<i>-of-<n>.json`
  meta   {"config": the run's config, "shapes": {leaf path: [shape, dtype]}} (process 0)

Orbax writes into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one. What clusters do beyond that
is handled here: a damaged newest checkpoint (truncated or missing file) is named and
moved aside to `<step>.damaged`, and the run falls back to the newest intact one (or
stops, `fallback=False`); a checkpoint written by a config with other shapes is refused
naming the differing config keys; an unwritable directory is reported before training
and a failed save names the last complete step.
"""

import json
import logging
import os
from typing import Any, Mapping, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be written or read; the message names the step and directory."""


class ConfigMismatchError(CheckpointError):
  """The checkpoint was written by a config whose state shapes differ from this one."""


def shapes_of(tree) -> dict[str, list]:
  """{leaf path: [shape, dtype]} of a pytree of arrays (or shape-dtype structs)."""
  return {jax.tree_util.keystr(path): [list(np.shape(leaf)), str(leaf.dtype)]
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'key: old -> new' for every dotted key whose value differs (tuples == lists)."""
  a, b = flatten_config(old), flatten_config(new)
  norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731  tuples -> lists
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))]


def check_writable(directory: str) -> None:
  """Creates `directory` and writes a probe file in it; CheckpointError if it cannot."""
  probe = os.path.join(directory, f".write_probe_{jax.process_index()}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"checkpoint directory {directory} is not writable: {e}. "
                          "Fix it (permissions, free space) or pass another --workdir; "
                          "nothing was trained.") from e


def _all_agree(ok: bool) -> bool:
  """True when `ok` holds on every process (every process must call this)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """Async, keep-N checkpoints in `directory/<step>/{state,data,meta}`."""

  def __init__(self, directory: str, keep: int, async_save: bool = True,
               fallback: bool = True):
    self.directory = directory
    self._keep, self._async, self._fallback = keep, async_save, fallback
    check_writable(directory)
    self._manager = self._new_manager()
    self.last_complete: Optional[int] = self._manager.latest_step()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=True, enable_async_checkpointing=self._async,
            cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Optional[grain.DatasetIterator],
           config: Optional[Mapping[str, Any]] = None) -> None:
    """Starts an (async) save; a failure of this or the previous save is a CheckpointError."""
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave({"config": dict(config or {}),
                                         "shapes": shapes_of(state)}))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001  orbax re-raises async errors of any type here
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, e: Exception) -> CheckpointError:
    try:  # let earlier saves still in flight finish: they may be the last good ones
      self._manager.wait_until_finished()
    except Exception:  # noqa: BLE001  the same failure again
      pass
    return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {type(e).__name__}: {e}. "
        f"The last complete checkpoint is step {self._last_intact()}; fix the directory "
        "(space, permissions) and rerun to resume from it.")

  def _last_intact(self) -> Optional[int]:
    steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()] \
        if os.path.isdir(self.directory) else []
    return max(steps) if steps else None

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._manager.latest_step() or -1, e) from e

  def close(self) -> None:
    self.wait()
    self._manager.close()

  # --- restore ------------------------------------------------------------------------

  def _read_meta(self, step: int) -> Optional[dict]:
    path = os.path.join(self.directory, str(step), "meta")
    if not os.path.isdir(path):
      return None  # written before meta existed: orbax's own errors then
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _check_shapes(self, step: int, meta: Optional[dict], target: Any,
                    config: Optional[Mapping[str, Any]]) -> None:
    if meta is None:
      return
    saved, now = meta["shapes"], shapes_of(target)
    differ = [f"{k} {saved.get(k, 'absent')} in the checkpoint vs {now.get(k, 'absent')} now"
              for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    keys = config_diff(meta.get("config", {}), config) if config is not None else []
    if differ:
      shown = "; ".join(differ[:5]) + (f"; and {len(differ) - 5} more" if len(differ) > 5 else "")
      raise ConfigMismatchError(
          f"checkpoint step {step} in {self.directory} was written by a config whose train "
          f"state differs from this one: {shown}. Config keys that differ: "
          f"{'; '.join(keys) or '(none: the code changed)'}. Rerun with the old values, or "
          "use a new --workdir to start afresh.")
    if keys:
      log.warning("resuming step %d with config changes that keep the state's shapes: %s%s",
                  step, "; ".join(keys[:10]), f"; and {len(keys) - 10} more" if len(keys) > 10 else "")

  def _data_files(self, step: int) -> list[str]:
    path = os.path.join(self.directory, str(step), "data")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []

  def _move_aside(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(src):
      dst, k = f"{src}.damaged", 1
      while os.path.exists(dst):
        dst, k = f"{src}.damaged{k}", k + 1
      os.rename(src, dst)  # out of orbax's sight: never counted, never garbage-collected
    multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self._manager.close()
    self._manager = self._new_manager()

  def restore_latest(self, target: Any, data_iter: Optional[grain.DatasetIterator], *,
                     config: Optional[Mapping[str, Any]] = None,
                     data_on_process_change: str = "error") -> tuple[int, Any]:
    """(step, state) from the newest intact checkpoint, or (0, target) when there is none.

    Restores onto `target`'s shapes, dtypes and shardings (any mesh: orbax reshards)
    and moves `data_iter` in place. A damaged checkpoint is moved aside to
    `<step>.damaged` and the next older one is tried, unless `fallback` is False.
    `data_on_process_change`: "error" or "restart" (keep the model, start the data
    iterator afresh) when the checkpoint was written by another number of processes.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in reversed(self.all_steps()):
      try:
        meta = self._read_meta(step)
        error = None
      except Exception as e:  # noqa: BLE001  unreadable meta = damaged
        meta, error = None, e
      if error is None:
        self._check_shapes(step, meta, target, config)
        items = dict(state=ocp.args.StandardRestore(abstract))
        if data_iter is not None and self._data_matches(step, data_on_process_change):
          items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
          restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001  truncated / missing files: any error type
          error = e
      if _all_agree(error is None):
        log.info("restored checkpoint at step %d from %s", step, self.directory)
        return step, restored["state"]
      older = [s for s in self.all_steps() if s < step]
      what = (f"checkpoint step {step} in {self.directory} is damaged"
              f"{f' ({type(error).__name__}: {str(error)[:300]})' if error else ' on another process'}")
      if not self._fallback:
        raise CheckpointError(
            f"{what}. Stopped (config checkpoint_fallback=False); the older checkpoints "
            f"{older or 'none'} are untouched. Remove or repair step {step}, or set "
            "checkpoint_fallback=True to resume from the newest intact one.") from error
      print(f"WARNING: {what}; moved it to {step}.damaged and trying "
            f"{f'step {older[-1]}' if older else 'a fresh start (no older checkpoint)'}.",
            flush=True)
      self._move_aside(step)
    self.last_complete = self._manager.latest_step()
    return 0, target

  def _data_matches(self, step: int, on_change: str) -> bool:
    """Whether this checkpoint's data states are for this many processes."""
    files = [f for f in self._data_files(step) if f.startswith("process_")]
    n = jax.process_count()
    if not files or any(f.endswith(f"-of-{n}.json") for f in files):
      return True  # ours (or missing: then restoring reports the damage)
    counts = sorted({f.rsplit("-of-", 1)[1].removesuffix(".json") for f in files})
    msg = (f"checkpoint step {step} in {self.directory} holds data-iterator positions for "
           f"{'/'.join(counts)} processes; this run has {n}. Each process reads its own "
           "shard of the data, so the positions do not carry over")
    if on_change == "restart":
      print(f"WARNING: {msg}: the model state is restored, the data iterators start "
            "afresh (config data_state_on_process_change='restart').", flush=True)
      return False
    raise CheckpointError(f"{msg}. Rerun with {counts[0]} processes, or set "
                          "data_state_on_process_change='restart' to keep the model and "
                          "start the data iterators from the beginning.")
