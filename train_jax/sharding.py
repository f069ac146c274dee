"""Mesh from config, logical-axis rules, and sharded init / batches.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the config's
rules table maps them onto the mesh axes `data`, `fsdp`, `model`. All axes are
`AxisType.Auto` so XLA's partitioner propagates shardings through the step.
"""

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Resolves one `-1` entry to the devices left over; checks the product."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if n_devices % known:
      raise ValueError(f"mesh: {n_devices} devices are not divisible by {known} "
                       f"({dict(zip(MESH_AXES, shape))})")
    shape[unknown[0]] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} "
                     f"devices, have {n_devices}")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_names(tree) -> set[str]:
  """All logical axis names used by the boxed (LogicallyPartitioned) leaves of a tree."""
  names = set()
  for spec in jax.tree.leaves(nn.get_partition_spec(tree),
                              is_leaf=lambda x: isinstance(x, P)):
    for entry in spec:
      for name in (entry if isinstance(entry, tuple) else (entry,)):
        if name is not None:
          names.add(name)
  return names


def check_rules(tree, rules) -> None:
  missing = logical_names(tree) - {name for name, _ in rules}
  if missing:
    raise ValueError(f"logical axis names {sorted(missing)} have no entry in "
                     f"config.axis_rules; add them (None = replicated)")


def shardings_of(abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (possibly boxed) abstract tree; unboxed leaves replicate."""
  check_rules(abstract_tree, rules)
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(map(tuple, rules)))


def abstract_init(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
  """(unboxed ShapeDtypeStructs carrying their shardings, the shardings) of `init_fn(*args)`,
  without computing it: what a program can be lowered and compiled against."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = shardings_of(abstract, mesh, rules)
  shaped = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(abstract), shardings)
  return shaped, shardings


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules, *args, shardings=None):
  """Runs `init_fn(*args)` under jit with out_shardings from its logical names.

  Returns (unboxed state, its shardings). Works for any pytree, e.g. a TrainState
  whose optimizer state was built from boxed params (optax keeps the boxes, so
  moments inherit the params' shardings). `shardings` (from `abstract_init`) skips
  tracing `init_fn` a second time for them.
  """
  if shardings is None:
    shardings = shardings_of(jax.eval_shape(init_fn, *args), mesh, rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return state, shardings


def batch_sharding(mesh: Mesh, ndim: int = 1, spec: P | None = None) -> NamedSharding:
  """Leading axis over the data axes, the rest replicated (unless `spec` is given)."""
  return NamedSharding(mesh, spec if spec is not None else P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, specs=None) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global jax.Arrays sharded over the data axes."""
  specs = specs or {}
  return {k: jax.make_array_from_process_local_data(
              batch_sharding(mesh, np.ndim(v), specs.get(k)), np.asarray(v))
          for k, v in batch.items()}


def to_host(tree) -> Any:
  """numpy copies of a pytree of arrays on every process, also of arrays sharded over other
  processes' devices (where `jax.device_get` refuses); every process must call it."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
