"""The contract between the generic loop and a model family.

A family module exposes `make_task(config, mesh) -> Task`. The loop shards, jits,
checkpoints, logs and evaluates; the family only says what to compute.
"""

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional

import jax

from train_jax.state import TrainState

Batch = Mapping[str, Any]          # process-local numpy arrays, leading axis = local batch
Metrics = Mapping[str, jax.Array]  # scalars


@dataclasses.dataclass
class Task:
  """What a family hands to `train_jax.loop.train_and_evaluate`.

  init:        rng -> TrainState. Params may be wrapped in `nn.LogicallyPartitioned`
               (from `nn.with_logical_partitioning`); the loop reads the logical axis
               names, maps them to the mesh with `config.axis_rules`, jits `init`
               with those `out_shardings` and unboxes.
  train_step:  (state, batch) -> (state, metrics). Pure; the loop jits it with
               in/out shardings and donates the state. `metrics` are float scalars;
               the ones named in `loss_keys` are checked for finiteness.
  train_data:  a grain `DatasetIterator` (has get_state/set_state) over process-local
               batches (dicts of numpy arrays). The loop makes global arrays of them
               and checkpoints its state next to the train state.
  evaluate:    optional (state) -> {name: float}, written as "eval/<name>".
  finish:      optional (state, workdir) -> None, run once at the end (plots, tables) on
               every process, since it may compute with the sharded state; only
               process 0 writes files.
  batch_spec:  optional {key: PartitionSpec} for batch entries that are not simply
               split over (data, fsdp) on their leading axis.
  host_metrics: optional () -> {name: float} read on the host at log steps and
               written as "train/<name>" (e.g. counts of skipped bad records).
  """
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  train_data: Iterator[Batch]
  evaluate: Optional[Callable[[TrainState], Mapping[str, float]]] = None
  finish: Optional[Callable[[TrainState, str], None]] = None
  loss_keys: tuple[str, ...] = ("loss",)
  batch_spec: Optional[Mapping[str, Any]] = None
  host_metrics: Optional[Callable[[], Mapping[str, float]]] = None
