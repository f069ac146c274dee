"""Mesh construction, axis rules and a sharded step equal to the one-device step."""

import sys
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from train_jax import sharding

sys.path.insert(0, os.path.dirname(__file__))
import tiny_task  # noqa: E402


def test_mesh_shape_resolves_minus_one():
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, model=2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(dict(data=1, fsdp=-1, model=1), 8) == (1, 8, 1)


@pytest.mark.parametrize("sizes, match", [
    (dict(data=-1, fsdp=-1, model=1), "at most one axis"),
    (dict(data=-1, fsdp=3, model=1), "not divisible"),
    (dict(data=2, fsdp=2, model=1), "needs 4 devices"),
])
def test_mesh_shape_errors(sizes, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(sizes, 8)


def test_rules_must_name_every_logical_axis():
  boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 4), np.float32),
                                        ("embed", "mystery"))}
  with pytest.raises(ValueError, match="mystery"):
    sharding.check_rules(boxed, common.AXIS_RULES)


def _one_step(mesh, config, batch):
  task = tiny_task.make_task(config, mesh)
  state, shardings = sharding.sharded_init(task.init, mesh, config.axis_rules,
                                           jax.random.key(config.seed))
  with jax.set_mesh(mesh):
    step = jax.jit(task.train_step, out_shardings=(shardings, None))
    state, metrics = step(state, sharding.global_batch(batch, mesh))
  return state, metrics


def test_sharded_step_matches_single_device():
  config = tiny_task.get_config()
  batch = next(tiny_task.make_data(config))
  mesh8 = sharding.make_mesh(dict(data=4, fsdp=1, model=2))
  mesh1 = sharding.make_mesh(dict(data=1, fsdp=1, model=1), devices=jax.devices()[:1])
  s8, m8 = _one_step(mesh8, config, batch)
  s1, m1 = _one_step(mesh1, config, batch)

  kernel = s8.params["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "model")   # embed -> fsdp, mlp -> model
  assert len(kernel.sharding.device_set) == 8
  mu = s8.opt_state[0].mu["Dense_0"]["kernel"]        # optimizer moments sharded like params
  assert mu.sharding.spec == kernel.sharding.spec
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
