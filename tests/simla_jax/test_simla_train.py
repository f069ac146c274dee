"""SIMLA pretraining end to end on a tiny config, and the retrieval metrics."""

import os

import jax
import numpy as np
import pytest

from configs import simla as simla_config
from simla_jax import retrieval
from simla_jax import train as simla_train
from train_jax import loop
from train_jax import metrics as metrics_lib
from train_jax import sharding


def test_recall_at_k_matches_hand_computed_ranks():
  # 3 images, 2 captions each (0,1 -> img 0; 2,3 -> img 1; 4,5 -> img 2).
  img2txt = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
  txt2img = np.array([0, 0, 1, 1, 2, 2])
  score_i2t = np.array([[9, 1, 0, 0, 0, 0],      # img 0: its caption first  -> rank 0
                        [9, 8, 7, 0, 0, 0],      # img 1: best own caption 3rd -> rank 2
                        [0, 0, 0, 0, 0, 9.]])    # img 2: rank 0
  score_t2i = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1.]])
  r = retrieval.recall_at_k(score_i2t, score_t2i, img2txt, txt2img, ks=(1, 5))
  assert r["tr_r1"] == pytest.approx(200 / 3)
  assert r["tr_r5"] == 100.0
  # Texts 1 and 4 rank their image second.
  assert r["ir_r1"] == pytest.approx(400 / 6)
  assert r["r_mean"] == pytest.approx(np.mean([200 / 3, 100, 400 / 6, 100]))


def test_config_errors_name_the_key():
  c = simla_config.get_config("tiny")
  c.loss_weights.itx = 1.0
  with pytest.raises(ValueError, match="itx"):
    simla_train.check_config(c)
  c = simla_config.get_config("tiny")
  c.queue_size = 30
  with pytest.raises(ValueError, match="queue_size"):
    simla_train.check_config(c)
  c = simla_config.get_config("tiny")
  c.itm.negatives_from = "gpu"
  with pytest.raises(ValueError, match="itm.negatives_from 'gpu'"):
    simla_train.check_config(c)


def test_itm_negatives_kind_is_checked():
  c = simla_config.get_config("tiny")
  c.itm.random_negatives = 2.0
  with pytest.raises(ValueError, match="itm.random_negatives 2.0"):
    simla_train.check_config(c)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_state_key_has_the_configured_prng_impl(impl):
  """config.rng_impl reaches the train state's key (every dropout mask derives from it)."""
  c = simla_config.get_config("tiny")
  c.rng_impl = impl
  task = simla_train.make_task(c, sharding.make_mesh(c.mesh))
  state = jax.eval_shape(task.init, jax.random.key(0))     # traced, nothing compiled
  assert state.rng.dtype == jax.random.key(0, impl=impl).dtype


def test_unknown_rng_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="rng_impl 'philox'"):
    simla_train.state_key(jax.random.key(0), "philox")
  c = simla_config.get_config("tiny")
  c.rng_impl = "fast"
  with pytest.raises(ValueError, match="rng_impl 'fast'"):
    simla_train.make_task(c, sharding.make_mesh(c.mesh))


def test_device_negatives_follow_the_data_parallel_shards():
  c = simla_config.get_config("tiny")
  mesh = sharding.make_mesh(c.mesh)                  # 8 test devices, all data-parallel
  assert simla_train.batch_shards(c, mesh) == 1      # tiny: "global"
  c.itm.negatives_from = "device"
  assert simla_train.batch_shards(c, mesh) == 8
  with pytest.raises(ValueError, match=r"batch_size >= 16 \(got 8\)"):
    simla_train.check_config(c, mesh)
  c.batch_size = 16
  simla_train.check_config(c, mesh)
  assert simla_config.get_config().itm.negatives_from == "device"   # the official default


@pytest.mark.slow
def test_tiny_pretraining_every_loss_falls(tmp_path):
  c = simla_config.get_config("tiny")
  c.alpha = 0.0                       # fixed targets, so losses at both ends are comparable
  c.data.shapes.train_size = 16       # two batches, seen over and over
  c.data.aug.train = False
  c.total_steps = 40
  c.log_every_steps = 1
  c.eval_every_steps = 40
  c.checkpoint_every_steps = 40
  loop.train_and_evaluate(c, str(tmp_path), simla_train.make_task)

  rows = metrics_lib.read_metrics(str(tmp_path))
  train = [r for r in rows if "train/loss" in r]
  assert len(train) == 40
  for name in simla_train.LOSSES:
    series = np.array([r[f"train/{name}"] for r in train])
    first, last = series[:5].mean(), series[-5:].mean()
    assert last < first, f"{name}: {first:.4f} -> {last:.4f}"
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  assert {"eval/test_tr_r1", "eval/test_ir_r1", "eval/test_r_mean",
          "eval/comp_tr_r1"} <= set(evals[-1])
  assert all(0.0 <= v <= 100.0 for k, v in evals[-1].items() if k != "step")
  for png in ("losses.png", "retrieval.png"):
    assert os.path.getsize(tmp_path / png) > 1000


def test_train_step_draws_itm_negatives_within_each_device_shard():
  """The jitted step on 8 devices with 2 rows per shard: "device" leaves each row exactly
  one candidate negative (the other row of its shard), so the step's ITM loss equals the
  loss of those pairs computed by hand (test_simla_objectives: "global" draws across shards)."""
  import jax
  import jax.numpy as jnp
  from simla_jax import objectives as obj
  from simla_jax.data import mim_targets, pipeline
  from simla_jax.models import SIMLA

  c = simla_config.get_config("tiny")
  c.batch_size = 16
  c.loss_weights.update(itc=1.0, itm=1.0, mlm=0.0, mim=0.0, psl=0.0)
  c.model.bert.update(layers=1, dropout=0.0, attention_dropout=0.0)
  mesh = sharding.make_mesh(c.mesh)
  c.itm.negatives_from = "device"
  task = simla_train.make_task(c, mesh)
  state, shardings = sharding.sharded_init(task.init, mesh, c.axis_rules, jax.random.key(0))
  batch = next(task.train_data)
  params = jax.device_get(state.params)
  step = jax.jit(task.train_step, out_shardings=(shardings, None))
  with jax.set_mesh(mesh):
    _, metrics = step(state, sharding.global_batch(batch, mesh))

  model = SIMLA(simla_train.resolve_model_config(
      c, pipeline.make_tokenizer(c.data), mim_targets.MimTargeter(c.data.mim)))
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
  ids, mask = batch["text_ids"], batch["text_mask"]
  neg = np.arange(16) ^ 1                       # the other row of the same 2-row shard
  image_seq = apply("embed_image", batch["image"])
  fused = apply("fuse", np.concatenate([ids, ids, ids[neg]]),
                np.concatenate([mask, mask, mask[neg]]),
                jnp.concatenate([image_seq, image_seq[neg], image_seq]))
  want, _ = obj.itm_loss(apply("itm_logits", fused))
  np.testing.assert_allclose(float(metrics["itm"]), float(want), rtol=1e-5)

