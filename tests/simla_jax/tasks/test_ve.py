"""Visual entailment: head, distillation loss, checkpoint loading, text-only, run.py end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_py
from configs import simla_ve
from simla_jax.data import entailment, pipeline
from simla_jax.tasks import ve

def test_head_is_linear_relu_linear_on_the_cls():
  head = ve.ClassifierHead(hidden=4)
  x = np.array([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]], np.float32)
  params = jax.tree.map(np.asarray, head.init(jax.random.key(0), x)["params"])
  params = jax.tree.map(lambda v: getattr(v, "value", v), params,
                        is_leaf=lambda v: hasattr(v, "value"))
  w0, b0 = params["dense_0"]["kernel"], params["dense_0"]["bias"]
  w1, b1 = params["dense_1"]["kernel"], params["dense_1"]["bias"]
  assert w0.shape == (4, 4) and w1.shape == (4, 3)
  bound = 1 / np.sqrt(4)   # torch nn.Linear default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.all(np.abs(w0) <= bound) and np.all(np.abs(b1) <= bound)
  want = np.maximum(x @ w0 + b0, 0) @ w1 + b1
  np.testing.assert_allclose(head.apply({"params": params}, x), want, rtol=1e-6, atol=1e-6)


def test_distill_loss_matches_hand_computed_values():
  # softmax([0, 0, ln 2]) = (1/4, 1/4, 1/2); softmax of the momentum logits [0, ln 3, 0]
  # = (1/5, 3/5, 1/5).
  logits = jnp.array([[0.0, 0.0, np.log(2.0)]])
  logits_m = jnp.array([[0.0, np.log(3.0), 0.0]])
  label = jnp.array([2])
  ce = np.log(2.0)                                          # -log 1/2
  kd = -(0.2 * np.log(0.25) + 0.6 * np.log(0.25) + 0.2 * np.log(0.5))
  assert float(ve.distill_loss(logits, logits_m, label, 0.0)) == pytest.approx(ce, rel=1e-6)
  assert float(ve.distill_loss(logits, logits_m, label, 0.4)) == pytest.approx(
      0.6 * ce + 0.4 * kd, rel=1e-6)
  # Batch mean; no gradient reaches the momentum logits.
  two = ve.distill_loss(jnp.concatenate([logits, logits_m]), jnp.concatenate([logits_m, logits]),
                        jnp.array([2, 1]), 0.4)
  other = 0.6 * -np.log(0.6) + 0.4 * -(0.25 * np.log(0.2) + 0.25 * np.log(0.6) + 0.5 * np.log(0.2))
  assert float(two) == pytest.approx((0.6 * ce + 0.4 * kd + other) / 2, rel=1e-6)
  g = jax.grad(lambda m: ve.distill_loss(logits, m, label, 0.4))(logits_m)
  np.testing.assert_array_equal(g, 0.0)


def test_alpha_warmup_minus_one_is_one_epoch_of_the_training_source():
  c = simla_ve.get_config()
  c.batch_size = 32
  c.alpha_warmup_steps = -1
  assert ve.alpha_warmup_steps(c, 30_000) == 937      # 30,000 // 32: the official epoch-0 ramp
  assert ve.alpha_warmup_steps(c, 10) == 1            # never a zero-length ramp
  c.alpha_warmup_steps = 50
  assert ve.alpha_warmup_steps(c, 30_000) == 50       # an explicit count is kept
  c.alpha_warmup_steps = -2
  with pytest.raises(ValueError, match="alpha_warmup_steps"):
    ve.check_config(c)


# --------------------------------------------------------------------------- loading
def _config(workdir, **overrides):
  c = simla_ve.get_config()
  c.init.checkpoint = workdir
  c.data.image_size = 32
  c.data.shapes.update(val_size=4, test_size=4)
  c.train_images = 8
  c.batch_size = 8
  c.eval.batch_size = 8
  c.progress_bar = False
  c.update(overrides)
  return c


def test_load_keeps_encoders_and_appends_hypothesis_words(pretrained):
  workdir, cfg, state = pretrained
  loaded = ve.load(_config(workdir))
  base = pipeline.make_tokenizer(cfg.data)
  new_words = entailment.vocabulary()
  assert loaded.tokenizer.vocab[:base.vocab_size] == base.vocab
  assert loaded.tokenizer.vocab[base.vocab_size:] == new_words
  table = loaded.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  old = state.params["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert table.shape == (base.vocab_size + len(new_words), old.shape[1])
  np.testing.assert_array_equal(table[:base.vocab_size], old)
  assert 0.005 < np.std(table[base.vocab_size:]) < 0.05      # normal(0, init_std 0.02)
  # Momentum copies come from the checkpoint's, with the same new rows.
  np.testing.assert_array_equal(loaded.params_m["vit"]["pos_embed"],
                                state.extras["momentum"]["vit"]["pos_embed"])
  m_table = loaded.params_m["bert"]["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(m_table[base.vocab_size:], table[base.vocab_size:])
  assert set(loaded.params) == set(ve.VE_MODULES)
  ids, _ = loaded.tokenizer("the red circle is made of wood")
  assert loaded.tokenizer.unk_id not in ids


def test_text_only_predictions_ignore_the_image(pretrained):
  workdir, _, _ = pretrained
  config = _config(workdir, text_only=True)
  loaded = ve.load(config)
  init = ve.make_init(config, loaded, ve.optimizers.make_optimizer(config.optimizer, 10)[0])
  params = jax.tree.map(lambda v: getattr(v, "value", v), init(jax.random.key(0)).params,
                        is_leaf=lambda v: hasattr(v, "value"))
  ids, mask = loaded.tokenizer(["there is a red circle", "the background is plain"] * 4)
  images = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
  logits = jax.jit(lambda im: ve.classify(loaded.model, loaded.head, params, im, ids, mask))
  with_image = np.asarray(logits(images))
  assert not np.allclose(with_image, logits(images[::-1]))   # the full model reads the image
  evaluator = ve.Evaluator(config, loaded, {}, majority=0)
  np.testing.assert_array_equal(evaluator._predict(params, images, ids, mask),
                                evaluator._predict(params, images[::-1], ids, mask))
  np.testing.assert_array_equal(evaluator._predict(params, images, ids, mask),
                                np.asarray(logits(np.zeros_like(images))).argmax(-1))


@pytest.mark.slow
def test_run_py_fine_tunes_and_writes_accuracy_to_metrics(pretrained, tmp_path):
  workdir, _, _ = pretrained
  out = tmp_path / "ve"
  rows, _ = run_py.run([
      "--config=configs/simla_ve.py", f"--config.init.checkpoint={workdir}",
      "--config.data.image_size=32", "--config.data.shapes.val_size=4",
      "--config.data.shapes.test_size=4", "--config.train_images=8", "--config.batch_size=8",
      "--config.eval.batch_size=8", "--config.total_steps=3", "--config.eval_every_steps=2",
      "--config.log_every_steps=1", "--config.alpha_warmup_steps=2"], out)
  evals = [r for r in rows if "eval/val_acc" in r]
  assert [r["step"] for r in evals] == [2, 3]
  assert "eval/test_acc" not in evals[0]          # the test split is scored once, at the end
  final = evals[1]
  for split in ("val", "test"):
    assert 0.0 <= final[f"eval/{split}_acc"] <= 100.0
    assert final[f"eval/{split}_majority_acc"] == pytest.approx(100 / 3)
    assert f"eval/{split}_acc_neutral" in final
  train = [r for r in rows if "train/loss" in r]
  assert [r["train/alpha"] for r in train] == pytest.approx([0.0, 0.2, 0.4])
  assert os.path.isdir(out / "checkpoints" / "3")
  assert json.loads((out / "config.json").read_text())["family"] == "simla_ve"
