"""The face steps: they run and learn, the virtual pass writes no BatchNorm statistics,
the meta-gradient through the real model matches finite differences, and the paper
backbone is scanned and shardable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mvcom as mvcom_config
from face_jax import steps as steps_lib
from face_tiny import make_task, tiny_config
from train_jax import sharding

_CACHE = {}


def _steps(config):
  """(task, Steps, unboxed initial state) with a jitted init."""
  import flax.linen as nn
  task = make_task(config)
  steps = task.train_step.__self__
  state = jax.jit(lambda r: nn.meta.unbox(task.init(r)))(jax.random.key(0))
  return task, steps, state


def _compiled(arg):
  """One compiled train step per variant, shared by the tests of this module."""
  if arg not in _CACHE:
    task, steps, state = _steps(tiny_config(arg))
    _CACHE[arg] = (task, steps, state, next(task.train_data), jax.jit(steps.train_step))
  return _CACHE[arg]


@pytest.mark.parametrize("arg", ["cosface", ""])
def test_loss_falls(arg):
  task, steps, state, batch, step = _compiled(arg)
  losses = []
  for _ in range(8):   # the same batch: the training loss must fall
    state, m = step(state, batch)
    losses.append(float(m["ce"]))
  assert losses[-1] < 0.7 * losses[0], losses
  if arg == "":
    assert "margin_group2" in m and float(m["meta_loss"]) > 0
    # The margin model moved away from its exact-m0 start.
    assert any(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(state.extras["margin"]))


@pytest.mark.parametrize("arg", ["l2rw", "arcface,fixed_group_margins"])
def test_other_methods_step(arg):
  config = tiny_config(arg)
  task, steps, state = _steps(config)
  batch = next(task.train_data)
  assert ("meta_image" in batch) == (arg == "l2rw")
  step = jax.jit(steps.train_step)
  for _ in range(2):
    state, m = step(state, batch)
  assert all(np.isfinite(float(v)) for v in m.values())
  if arg == "arcface,fixed_group_margins":
    assert config.loss.margin_slot == "m2" and config.method == "fixed_margins"
    want = np.mean(0.5 + np.array(config.fixed_margins.group)[batch["group"]])
    assert float(m["margin_mean"]) == pytest.approx(want, rel=1e-5)
  if arg == "l2rw":
    assert 0 < float(m["weight_max"]) <= 1


def test_virtual_step_writes_no_batch_stats():
  task, steps, state, batch, mv_step = _compiled("")
  before = jax.device_get(state.extras["batch_stats"])
  # The bilevel update alone returns only margin parameters and their optimizer state.
  phi, opt, _, _ = jax.eval_shape(steps.meta_update, state, batch, jax.random.key(1))
  assert jax.tree.structure(phi) == jax.tree.structure(state.extras["margin"])
  assert jax.tree.structure(opt) == jax.tree.structure(state.extras["margin_opt"])
  # A full MvCoM step writes exactly the statistics of its real pass: those of a plain
  # step from the same state on the same batch (BN statistics do not depend on margins).
  mv_state, _ = mv_step(state, batch)
  _, _, _, _, plain_step = _compiled("cosface")
  plain_state = state.replace(extras={"batch_stats": state.extras["batch_stats"]})
  plain_state, _ = plain_step(plain_state, {k: v for k, v in batch.items() if not k.startswith("meta_")})
  after_mv = jax.device_get(mv_state.extras["batch_stats"])
  after_plain = jax.device_get(plain_state.extras["batch_stats"])
  for a, b in zip(jax.tree.leaves(after_mv), jax.tree.leaves(after_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # ... and the real pass did update them.
  assert not all(np.allclose(a, c) for a, c in zip(jax.tree.leaves(after_mv), jax.tree.leaves(before)))


@pytest.mark.parametrize("backbone", ["one_block", "scan_remat"])
def test_meta_gradient_of_the_face_step_matches_finite_differences(backbone):
  config = tiny_config("")
  config.model.dtype = "float64"
  if backbone == "scan_remat":   # a stride-2 block, then a scanned, rematerialised stack of 2
    config.model.update(layers=(3,), scan_layers=True, remat=True)
  config.mvcom.bound = 0.3
  with jax.enable_x64(True):
    task, steps, state = _steps(config)
    batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if x.dtype == np.float32 else x,
                         next(task.train_data))
    state = state.replace(params=jax.tree.map(lambda x: x.astype(jnp.float64), state.params),
                          extras={**state.extras, "batch_stats": jax.tree.map(
                              lambda x: x.astype(jnp.float64), state.extras["batch_stats"])})
    phi = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).normal(size=x.shape) * 0.5,
                                             jnp.float64), state.extras["margin"])
    rng = jax.random.key(3)
    # One compiled function for both: its values give the finite differences.
    value_and_grad = jax.jit(jax.value_and_grad(lambda p: steps.meta_objective(p, state, batch, rng)))
    f = lambda p: value_and_grad(p)[0]
    grad = value_and_grad(phi)[1]
    leaves, treedef = jax.tree.flatten(phi)
    g, fd = [], []
    h = 1e-5
    for li, leaf in enumerate(leaves):
      for j in range(leaf.size):
        def at(delta):
          ls = list(leaves)
          ls[li] = leaf.at[np.unravel_index(j, leaf.shape)].add(delta)
          return float(f(jax.tree.unflatten(treedef, ls)))
        fd.append((at(h) - at(-h)) / (2 * h))
        g.append(float(np.ravel(jax.tree.leaves(grad)[li])[j]))
    g, fd = np.array(g), np.array(fd)
    assert np.linalg.norm(fd) > 1e-5
    rel = np.linalg.norm(g - fd) / np.linalg.norm(fd)
    print(f"face-step meta-gradient ({backbone}) vs central differences: relative error {rel:.2e}")
    assert rel < 1e-3, (rel, g.tolist(), fd.tolist())


def test_paper_backbone_is_scanned_and_shardable():
  """configs/mvcom.py:paper builds IResNet-100 with its repeated blocks as four scans whose
  stacked axis has a sharding rule (traced only: jax.eval_shape)."""
  config = mvcom_config.get_config("paper")
  assert config.model.scan_layers and config.model.remat
  model = steps_lib.build_model(config, num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)),
                                             train=False))
  backbone = shapes["params"]["backbone"]
  # r100 = (3, 13, 30, 3): stacks of 2, 12, 29 and 2 blocks after each stage's first.
  assert [backbone[f"layer{s}_blocks"]["conv1"]["kernel"].value.shape[0] for s in (1, 2, 3, 4)] == [2, 12, 29, 2]
  assert not any(k.startswith("layer3_1") for k in backbone)
  sharding.check_rules(shapes, config.axis_rules)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, model=1))
  specs = sharding.shardings_of(shapes, mesh, config.axis_rules)
  # The stack axis is replicated and the output channels stay on `fsdp` behind it.
  assert tuple(specs["params"]["backbone"]["layer3_blocks"]["conv1"]["kernel"].spec) == (
      None, None, None, None, "fsdp")


def test_prototype_losses_equal_a_brute_force_computation():
  rng = np.random.default_rng(0)
  labels = np.array([7, 7, 7, 2, 2, 9, 9, 9, 9, 4, 4])
  emb = rng.normal(size=(len(labels), 5))
  s, m = 10.0, 0.3
  got = np.asarray(steps_lib.prototype_losses(jnp.asarray(emb), jnp.asarray(labels), s, m))
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  ids = list(dict.fromkeys(labels.tolist()))
  for i, y in enumerate(labels):
    logits = []
    for c in ids:
      members = [j for j in range(len(labels)) if labels[j] == c and j != i]
      proto = e[members].mean(0)
      cos = e[i] @ proto / np.linalg.norm(proto)
      logits.append(s * (cos - m * (c == y)))
    logits = np.array(logits)
    want = np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[ids.index(y)]
    assert got[i] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_init_offsets_set_the_margins():
  config = tiny_config("")
  config.mvcom.init_offsets = (("group", (0.1, -0.05, 0.2)), ("blur", (0.15,)))
  phi = {"group": jnp.zeros(3), "pose": jnp.zeros(1), "blur": jnp.zeros(1)}
  got = steps_lib.init_phi(phi, config.mvcom)
  np.testing.assert_allclose(0.3 * np.tanh(np.asarray(got["group"])), [0.1, -0.05, 0.2], rtol=1e-5)
  np.testing.assert_allclose(0.3 * np.tanh(np.asarray(got["blur"])), [0.15], rtol=1e-5)
  assert float(got["pose"][0]) == 0.0
  config.mvcom.init_offsets = (("group", (0.1, 0.3, 0.0)),)
  with pytest.raises(ValueError, match="inside the bound"):
    steps_lib.init_phi(phi, config.mvcom)


def test_open_set_meta_step_logs_per_group_diagnostics():
  """MvCoM with the prototype loss on held-out identities (stratified meta batch),
  continuous degrees and the class term: one step runs and logs per group the target
  probability, the fraction meeting the margin and the meta loss."""
  config = tiny_config("prototype")
  config.data.update(variation_degrees=True, meta_batch_size=12, meta_images_per_id=2)
  config.mvcom.update(degrees=True, class_bound=0.1)
  task, steps, state = _steps(config)
  batch = next(task.train_data)
  assert np.all(batch["meta_label"] >= config.data.num_train_ids)          # new identities
  assert np.bincount(batch["meta_group"]).tolist() == [4, 4, 4]
  state, m = jax.jit(steps.train_step)(state, batch)
  for g in range(3):
    assert 0 < float(m[f"p_target_group{g}"]) < 1 and 0 <= float(m[f"margin_met_group{g}"]) <= 1
    assert float(m[f"meta_loss_group{g}"]) > 0
  assert np.mean([float(m[f"meta_loss_group{g}"]) for g in range(3)]) == pytest.approx(
      float(m["meta_loss"]), rel=1e-5)
  assert "class" in state.extras["margin"] and "margin_class" in m
  with pytest.raises(ValueError, match="prototype"):
    bad = tiny_config("")
    bad.data.meta_identities = "heldout"
    make_task(bad)


def test_frozen_margins_stay_at_their_init_and_take_no_meta_batch():
  config = tiny_config("")
  config.mvcom.update(frozen=True, init_offsets=(("group", (0.0, 0.1, 0.2)),))
  task, steps, state = _steps(config)
  batch = next(task.train_data)
  assert "meta_image" not in batch
  state2, m = jax.jit(steps.train_step)(state, batch)
  for a, b in zip(jax.tree.leaves(state.extras["margin"]), jax.tree.leaves(state2.extras["margin"])):
    np.testing.assert_array_equal(a, b)
  assert "meta_loss" not in m and float(m["margin_group2"]) == pytest.approx(0.2, rel=1e-5)
