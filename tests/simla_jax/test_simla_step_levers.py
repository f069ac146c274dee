"""The pretraining step's cost levers change nothing but the cost: MLM logits at masked
positions only, and ITM image keys/values projected once per image."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simla_jax import objectives as obj


def test_masked_positions_give_the_full_loss():
  rng = np.random.default_rng(0)
  b, l, v, d = 8, 12, 50, 16
  labels = np.where(rng.random((b, l)) < 0.2, rng.integers(0, v, (b, l)), obj.IGNORE)
  seq, seq_m = (rng.standard_normal((b, l, d)).astype(np.float32) for _ in range(2))
  head = rng.standard_normal((d, v)).astype(np.float32)
  full = obj.mlm_loss(seq @ head, seq_m @ head, labels, 0.4)
  index, labels_at, fits = obj.masked_positions(jnp.asarray(labels), group_rows=4, capacity=20)
  assert bool(fits)
  at = lambda x: obj.gather_positions(jnp.asarray(x), index, 4)
  part = obj.mlm_loss(at(seq) @ head, at(seq_m) @ head, labels_at, 0.4)
  np.testing.assert_allclose(part, full, rtol=1e-6)
  # The gathered labels are the masked ones, each once, in order.
  for g in range(2):
    want = labels[4 * g:4 * g + 4].reshape(-1)
    np.testing.assert_array_equal(labels_at[g][labels_at[g] != obj.IGNORE],
                                  want[want != obj.IGNORE])


def test_overflow_is_reported():
  labels = np.zeros((4, 5), np.int32)          # every position masked
  _, _, fits = obj.masked_positions(jnp.asarray(labels), group_rows=2, capacity=9)
  assert not bool(fits)


def _one_step(weights: dict, **overrides):
  """Metrics and gradients of one step of the tiny config (same keys each time).

  `weights`: the losses to switch on (the others off, for faster compiles). The optimizer is
  plain SGD at lr 1, so the parameter change is the gradient itself."""
  from configs import simla as simla_config
  from simla_jax import train as simla_train

  c = simla_config.get_config("tiny")
  c.loss_weights.update({k: float(k in weights) for k in simla_train.LOSSES})
  c.model.bert.layers = 1
  c.optimizer.update(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip_norm=0.0)
  c.optimizer.schedule.update(name="constant", warmup_steps=0)
  c.update_from_flattened_dict(overrides)
  task = simla_train.make_task(c, mesh=None)
  state = nn.meta.unbox(task.init(jax.random.key(0)))
  before = jax.device_get(state.params)     # jit without donation: `state` stays readable
  new, metrics = jax.jit(task.train_step)(state, next(task.train_data))
  grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(new.params))
  grads.pop("temp")                         # clipped after the update
  return jax.device_get(metrics), grads


def _assert_same(metrics, grads, metrics_ref, grads_ref, keys):
  for k in keys:
    np.testing.assert_allclose(metrics[k], metrics_ref[k], rtol=1e-5, err_msg=k)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_ref)) > 0
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(grads_ref), jax.tree.leaves(grads)):
    np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * float(np.abs(g).max()) + 1e-8,
                               err_msg=jax.tree_util.keystr(path))


def test_train_step_with_capacity_equals_the_full_mlm():
  losses = ("itc", "mlm")
  full = _one_step(losses, **{"mlm_capacity.capacity": 0})
  fits = _one_step(losses, **{"mlm_capacity.capacity": 64, "mlm_capacity.group_rows": 4})
  over = _one_step(losses, **{"mlm_capacity.capacity": 1, "mlm_capacity.group_rows": 4})
  assert fits[0]["mlm_in_capacity"] == 1.0 and over[0]["mlm_in_capacity"] == 0.0
  for run in (fits, over):                      # `over`: every group takes the full branch
    _assert_same(*run, *full, ("loss", "mlm", "mlm_acc", "itc"))


def test_train_step_with_shared_image_keys_values_equals_per_pair_images():
  losses = ("itc", "itm")
  _assert_same(*_one_step(losses, share_image_kv=True), *_one_step(losses, share_image_kv=False),
               ("loss", "itm", "itm_acc", "itc"))
