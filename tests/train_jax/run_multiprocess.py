"""Subprocess entry for the multi-process tests.

  run_multiprocess.py WORKDIR FAMILY SHARDING PROCESSES PROCESS_ID PORT [key=value ...]

Each process gets 8 / PROCESSES fake CPU devices; with PROCESSES > 1 it joins the
coordinator at 127.0.0.1:PORT (process 0 hosts it). It trains a tiny FAMILY (simla |
mvcom) with SHARDING (dp: mesh data=8 | fsdp: mesh fsdp=8) through the generic loop and
writes
  rows_p<PROCESS_ID>.json  per step, a fingerprint of each row this process fed
  params.npz               (process 0) every parameter, gathered to the host
The key `emulate_processes=N` (with PROCESSES == 1) feeds the concatenation of the
per-process batches N processes would feed: SIMLA shards its source per process, so
this is the single-process run that sees the same global batches.
"""

import hashlib
import json
import os
import sys

_PROCS = int(sys.argv[4])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // _PROCS}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "..")]

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from configs import mvcom as mvcom_config  # noqa: E402
from configs import simla as simla_config  # noqa: E402
from train_jax import loop  # noqa: E402
from train_jax import sharding  # noqa: E402


def tiny_config(family: str, mesh: str):
  if family == "simla":
    c = simla_config.get_config("tiny")
    c.model.vit.depth = 1             # every objective, fewer layers: compile time rules here
    c.model.bert.layers = 1
    c.eval.splits = ("test",)
  else:  # the face tests' tiny IResNet with the MvCoM meta step
    c = mvcom_config.get_config()
    c.batch_size = 16
    c.model.update(layers=(1,), widths=(8,), embed_dim=8)   # channels split 8 ways by FSDP
    c.data.update(image_size=8, frequencies=3, num_train_ids=40, images_per_id=(3, 5),
                  group_fractions=(0.6, 0.25, 0.15), meta_ids_per_group=3, meta_images_per_id=2,
                  test_ids_per_group=4, test_images_per_id=5, pairs_per_cell=20,
                  meta_batch_size=8, prefetch_batches=0)
    c.loss.s = 16.0
    c.eval.update(batch_size=32, n_folds=2)
  c.total_steps = 3
  c.log_every_steps = 1
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 3
  c.keep_checkpoints = 5
  c.progress_bar = False
  c.optimizer.schedule.update(name="constant", warmup_steps=0)  # a resumed run equals a straight one
  c.mesh.update(dict(dp=dict(data=8, fsdp=1, model=1), fsdp=dict(data=1, fsdp=8, model=1))[mesh])
  return c


class ConcatShards(grain.DatasetIterator):
  """One process feeding what N processes feed: their local batches, concatenated."""

  def __init__(self, shards):
    super().__init__(shards)
    self._shards = shards

  def __next__(self):
    parts = [next(s) for s in self._shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"shards": [s.get_state() for s in self._shards]}

  def set_state(self, state):
    for s, st in zip(self._shards, state["shards"]):
      s.set_state(st)


def _fingerprints(batch) -> list[str]:
  """One id per row: SIMLA's example index, else a hash of the face image."""
  if "index" in batch:
    return [str(int(i)) for i in np.asarray(batch["index"])]
  return [hashlib.sha1(np.ascontiguousarray(r).tobytes()).hexdigest()[:16]
          for r in np.asarray(batch["image"])]


def main(workdir, family, mesh, procs, pid, port, *overrides):
  procs, pid = int(procs), int(pid)
  if procs > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", procs, pid)
    # gloo sets up its context at the first collective and waits only 30 s for the
    # other process: meet now, before either does seconds of work the other is not doing.
    multihost_utils.sync_global_devices("started")
  config = tiny_config(family, mesh)
  emulate = 1
  for item in overrides:
    key, value = item.split("=", 1)
    if key == "emulate_processes":
      emulate = int(value)
      continue
    old = config
    for part in key.split(".")[:-1]:
      old = old[part]
    old[key.split(".")[-1]] = type(old[key.split(".")[-1]])(value)
  if family == "simla":
    from simla_jax import train as family_train
    from simla_jax.data import pipeline
  else:
    from face_jax import train as family_train

  def make_task(config, mesh):
    task = family_train.make_task(config, mesh)
    if emulate > 1:
      assert family == "simla", "the face data is already the same for any process count"
      tokenizer = pipeline.make_tokenizer(config.data)
      task.train_data = ConcatShards([
          pipeline.make_train_iterator(config.data, batch_size=config.batch_size // emulate,
                                       process_index=i, process_count=emulate,
                                       tokenizer=tokenizer) for i in range(emulate)])
    return task

  rows = []
  feed = sharding.global_batch

  def recording_global_batch(batch, *args, **kwargs):
    rows.append(_fingerprints(batch))
    return feed(batch, *args, **kwargs)

  sharding.global_batch = recording_global_batch
  state = loop.train_and_evaluate(config, workdir, make_task)
  with open(os.path.join(workdir, f"rows_p{pid}.json"), "w") as f:
    json.dump(rows, f)
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if pid == 0:
    np.savez(os.path.join(workdir, "params.npz"),
             **{jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(params)})


if __name__ == "__main__":
  main(*sys.argv[1:])
