"""Orbax checkpoints of the train state plus the grain iterator position."""

import logging
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Async, keep-N checkpoints in `<workdir>/checkpoints/<step>/{state,data}`.

  Orbax writes into a temporary directory and renames it when complete, so a run
  killed mid-save leaves the previous checkpoint as the latest one.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Optional[grain.DatasetIterator]) -> None:
    items = dict(state=ocp.args.StandardSave(state))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, target: Any, data_iter: Optional[grain.DatasetIterator]) -> Any:
    """Restores onto `target`'s shapes, dtypes and shardings; moves `data_iter` in place."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    items = dict(state=ocp.args.StandardRestore(abstract))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise ValueError(f"checkpoint {self._manager.directory}/{step} does not match the "
                       f"model this config builds (different shapes or structure): {e}") from e
    logging.info("restored checkpoint at step %d from %s", step, self._manager.directory)
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
