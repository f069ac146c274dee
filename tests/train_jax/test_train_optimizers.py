"""Optimizer factory: schedules, weight-decay masks, SGD, clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from train_jax import optimizers


def _cfg(**kw):
  c = common.base().optimizer
  c.update(kw)
  return c


def test_warmup_then_cosine_reaches_end_lr():
  c = _cfg(lr=1.0)
  c.schedule.update(warmup_steps=10, warmup_init_lr=0.1, end_lr=0.01)
  s = optimizers.make_schedule(c.schedule, c.lr, total_steps=110)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.1, 0.55, 1.0], rtol=1e-6)
  np.testing.assert_allclose(s(60), 0.01 + 0.5 * 0.99, rtol=1e-5)   # halfway through cosine
  np.testing.assert_allclose(s(110), 0.01, rtol=1e-5)


def test_polynomial_and_step_schedules():
  c = _cfg(lr=0.1)
  c.schedule.update(name="polynomial", power=2.0, end_lr=0.0)
  s = optimizers.make_schedule(c.schedule, c.lr, total_steps=100)
  np.testing.assert_allclose(s(50), 0.1 * 0.25, rtol=1e-6)
  c.schedule.update(name="step", boundaries=(30, 60), decay=0.1, warmup_steps=10)
  s = optimizers.make_schedule(c.schedule, c.lr, total_steps=100)
  np.testing.assert_allclose([s(29), s(31), s(61)], [0.1, 0.01, 0.001], rtol=1e-5)


def test_unknown_schedule_is_named():
  c = _cfg()
  c.schedule.name = "cyclic"
  with pytest.raises(ValueError, match="cyclic"):
    optimizers.make_optimizer(c, 10)


def test_weight_decay_mask_by_path_regex():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "ln": {"scale": jnp.ones(2)}}
  mask = optimizers.decay_mask(params, (r".*bias$", r".*(scale|norm).*"))
  assert mask == {"dense": {"kernel": True, "bias": False}, "ln": {"scale": False}}


def test_adamw_decays_only_masked_params():
  c = _cfg(name="adamw", lr=0.1, weight_decay=0.5)
  c.schedule.name = "constant"
  tx, _ = optimizers.make_optimizer(c, 10)
  params = {"kernel": jnp.ones(3), "bias": jnp.ones(3)}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], 0.0)


def test_sgd_momentum_with_coupled_decay_and_clipping():
  c = _cfg(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, grad_clip_norm=1.0,
           no_decay=())
  c.schedule.name = "constant"
  tx, _ = optimizers.make_optimizer(c, 10)
  params = {"w": jnp.full(4, 2.0)}
  grads = {"w": jnp.full(4, 10.0)}          # norm 20 -> clipped to norm 1 (0.5 each)
  state = tx.init(params)
  u1, state = tx.update(grads, state, params)
  np.testing.assert_allclose(u1["w"], -0.1 * (0.5 + 0.01 * 2.0), rtol=1e-6)
  u2, _ = tx.update(grads, state, params)   # momentum accumulates
  np.testing.assert_allclose(u2["w"], -0.1 * 1.9 * (0.5 + 0.02), rtol=1e-6)


def test_decay_mask_keeps_logical_boxes():
  import flax.linen as nn
  params = {"kernel": nn.LogicallyPartitioned(jnp.ones((2, 2)), ("embed", "mlp")),
            "bias": nn.LogicallyPartitioned(jnp.ones(2), ("mlp",))}
  mask = optimizers.decay_mask(params, (r".*bias$",))
  assert isinstance(mask["kernel"], nn.LogicallyPartitioned)
  assert nn.meta.unbox(mask) == {"kernel": True, "bias": False}
