"""NLVR2 tasks: text assignment, heads and loss, checkpoint loading, run.py end to end."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_py
from configs import simla_nlvr, simla_nlvr_pretrain
from simla_jax.data import nlvr_shapes, pipeline
from simla_jax.models import nlvr_encoder
from simla_jax.tasks import nlvr

# --------------------------------------------------------------------------- text assignment
def test_text_assignment_labels_and_similarity_negatives_on_a_hand_made_batch():
  # Images 2k and 2k + 1 are near twins, other pairs orthogonal: at temperature 0.07 a
  # text's one negative is its image's twin (weight e^{(0.99 - 0) / 0.07} ~ 1e6 : 1).
  basis = np.eye(3, dtype=np.float32)
  feat = np.stack([basis[0], basis[0] * 0.99 + 0.14 * basis[1], basis[1],
                   basis[1] * 0.99 + 0.14 * basis[2], basis[2], basis[2] * 0.99 + 0.14 * basis[0]])
  feat /= np.linalg.norm(feat, axis=1, keepdims=True)
  twin = np.array([1, 0, 3, 2, 5, 4])
  draw = jax.jit(jax.vmap(lambda k: nlvr.text_assignment(k, jnp.asarray(feat))))
  left, right, label = map(np.asarray, draw(jax.random.split(jax.random.key(0), 3000)))
  own = np.arange(6)[None].repeat(3000, 0)
  t = twin[None].repeat(3000, 0)
  zero, one, two = label == 0, label == 1, label == 2
  np.testing.assert_array_equal(left[zero], own[zero])
  np.testing.assert_array_equal(right[zero], t[zero])
  np.testing.assert_array_equal(right[one], own[one])
  np.testing.assert_array_equal(left[one], t[one])
  assert np.all(left[two] != own[two]) and np.all(right[two] != own[two])
  assert np.all(left[two] != right[two])                # two distinct negatives
  assert np.all((left[two] == t[two]) | (right[two] == t[two]))   # the twin is one of them
  for frac in (zero.mean(), one.mean(), two.mean()):
    assert abs(frac - 1 / 3) < 0.02


def test_pair_loss_matches_hand_computed_values():
  logits = jnp.array([[2.0, 0.0], [0.5, 1.5]])
  logits_m = jnp.array([[0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([1, 1])
  logp = np.log(np.exp([[2.0, 0.0], [0.5, 1.5]]) / np.exp([[2.0, 0.0], [0.5, 1.5]]).sum(1,
                                                                                   keepdims=True))
  q = np.exp([[0.0, 1.0], [1.0, 1.0]]) / np.exp([[0.0, 1.0], [1.0, 1.0]]).sum(1, keepdims=True)
  ce = -logp[[0, 1], [1, 1]]
  soft = -(q * logp).sum(1)
  want = np.mean(0.6 * ce + 0.4 * soft)
  np.testing.assert_allclose(nlvr.pair_loss(logits, logits_m, labels, 0.4, True), want,
                             rtol=1e-6)
  np.testing.assert_allclose(nlvr.pair_loss(logits, None, labels, 0.4, False), ce.mean(),
                             rtol=1e-6)


# --------------------------------------------------------------------------- loading
def _config(module, workdir, **overrides):
  c = module.get_config()
  c.init.checkpoint = workdir
  c.data.image_size = 32
  c.data.max_len = 16
  c.update(overrides)
  return c


def test_load_builds_the_two_image_encoder_from_the_pretrained_bert(pretrained):
  workdir, cfg, state = pretrained
  loaded = nlvr.load(_config(simla_nlvr_pretrain, workdir))
  layers = cfg.model.bert.layers
  sources = nlvr_encoder.layer_sources(layers, layers // 2)
  assert loaded.net.bert.sources == sources and len(sources) == 2 * layers - layers // 2
  bert, pre = loaded.params["bert"], state.params["bert"]
  for i, s in enumerate(sources):
    np.testing.assert_array_equal(bert["layer"]["mlp"]["fc1"]["kernel"][i],
                                  pre[f"layer_{s}"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_array_equal(bert["layer"]["crossattention"]["query"]["kernel"][i],
                                  pre[f"layer_{s}"]["crossattention"]["query"]["kernel"])
  for j in range(layers):
    np.testing.assert_array_equal(bert["cross_kv"]["value"]["kernel"][j],
                                  pre[f"layer_{j}"]["crossattention"]["value"]["kernel"])
  # The statement words are appended after the pretraining vocabulary.
  base = pipeline.make_tokenizer(cfg.data)
  assert loaded.tokenizer.vocab[base.vocab_size:] == [
      w for w in nlvr_shapes.vocabulary() if w not in set(base.vocab)]
  table = bert["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(table[:base.vocab_size],
                                pre["embeddings"]["word_embeddings"]["embedding"])
  # Text assignment keeps the pretrained vision_proj (frozen negatives' similarity).
  np.testing.assert_array_equal(loaded.params["vision_proj"]["kernel"],
                                state.params["vision_proj"]["kernel"])
  np.testing.assert_array_equal(loaded.params_m["vit"]["pos_embed"],
                                state.extras["momentum"]["vit"]["pos_embed"])
  ids, _ = loaded.tokenizer("only the left image has more shapes than the right image")
  assert loaded.tokenizer.unk_id not in ids


# --------------------------------------------------------------------------- end to end
def _run(args, workdir):
  rows, _ = run_py.run([*args, "--config.data.image_size=32", "--config.data.max_len=16",
                        "--config.total_steps=3", "--config.eval_every_steps=3",
                        "--config.log_every_steps=1"], workdir, timeout=1200)
  return rows


@pytest.mark.slow
def test_run_py_text_assignment_then_fine_tuning_from_it(pretrained, tmp_path):
  workdir, _, _ = pretrained
  ta = tmp_path / "ta"
  rows = _run(["--config=configs/simla_nlvr_pretrain.py", f"--config.init.checkpoint={workdir}",
               "--config.data.shapes.val_size=8", "--config.batch_size=8",
               "--config.eval.batch_size=8"], ta)
  evals = [r for r in rows if "eval/val_ta_acc" in r]
  assert [r["step"] for r in evals] == [3] and 0 <= evals[0]["eval/val_ta_acc"] <= 100
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
  ft = tmp_path / "ft"
  rows = _run(["--config=configs/simla_nlvr.py", f"--config.init.checkpoint={ta}",
               "--config.data.shapes.val_size=8", "--config.data.shapes.test_size=8",
               "--config.train_pairs=4", "--config.batch_size=8", "--config.eval.batch_size=8",
               "--config.alpha_warmup_steps=2"], ft)
  final = [r for r in rows if "eval/val_acc" in r][-1]
  assert final["step"] == 3
  for split in ("val", "test"):
    assert 0 <= final[f"eval/{split}_acc"] <= 100
    assert final[f"eval/{split}_majority_acc"] == 50.0
  alphas = [r["train/alpha"] for r in rows if "train/alpha" in r]
  np.testing.assert_allclose(alphas, [0.0, 0.2, 0.4])


def test_config_variants_name_their_families_and_official_sizes():
  assert simla_nlvr_pretrain.get_config().family == "simla_nlvr_pretrain"
  official = simla_nlvr_pretrain.get_config("official")
  assert (official.data.image_size, official.data.max_len, official.optimizer.lr) == (256, 25, 2e-5)
  c = simla_nlvr.get_config("nlvr2")
  assert (c.family, c.data.name, c.data.image_size, c.alpha) == ("simla_nlvr", "nlvr2", 384, 0.4)
  assert c.total_steps == 10 * (simla_nlvr.NLVR2_TRAIN_PAIRS // c.batch_size)
  with pytest.raises(ValueError, match="unknown variant"):
    simla_nlvr.get_config("nlvr3")
