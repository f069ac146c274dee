"""Retrieval fine-tuning: id-aware objectives, checkpoint loading, :eval, minimal pairs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import run_py
import tiny_checkpoint
from configs import simla_retrieval
from simla_jax import retrieval
from simla_jax.data import pipeline, shapes
from simla_jax.data.tokenizer import vocab_from_words
from simla_jax.models import SIMLA
from simla_jax.models import vit as vit_lib
from simla_jax.tasks import retrieval as rt
from train_jax import loop
from train_jax import metrics as metrics_lib

# --------------------------------------------------------------------------- objectives
def test_id_positive_targets_match_hand_computed():
  idx = jnp.array([3, 5, 3])
  idx_all = jnp.array([3, 5, 3, -100, 5, 7])          # batch ; queue
  expected = np.array([[.5, 0, .5, 0, 0, 0],
                       [0, .5, 0, 0, .5, 0],
                       [.5, 0, .5, 0, 0, 0]])
  np.testing.assert_allclose(rt.id_positive_targets(idx, idx_all), expected)


def test_itc_id_loss_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.standard_normal(s).astype(np.float32))
  img, txt, img_m, txt_m, iq, tq = unit(4, 8), unit(4, 8), unit(4, 8), unit(4, 8), unit(6, 8), unit(6, 8)
  idx, idx_queue = np.array([1, 2, 1, 9]), np.array([2, -100, -100, 9, 4, 1])
  temp, alpha = 0.1, 0.3
  loss, sim_i2t, _ = rt.itc_id_loss(img, txt, img_m, txt_m, iq, tq, idx, idx_queue, temp, alpha)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  pos = (idx[:, None] == np.concatenate([idx, idx_queue])[None]).astype(np.float64)
  targets = pos / pos.sum(1, keepdims=True)
  terms = []
  for a, b_all, a_m in ((img, np.concatenate([txt_m, tq]), img_m),
                        (txt, np.concatenate([img_m, iq]), txt_m)):
    t = alpha * np.exp(log_softmax(a_m @ b_all.T / temp)) + (1 - alpha) * targets
    terms.append(-(t * log_softmax(a @ b_all.T / temp)).sum(1).mean())
  assert float(loss) == pytest.approx(0.5 * sum(terms), rel=1e-5)
  np.testing.assert_allclose(sim_i2t, img @ np.concatenate([txt_m, tq]).T / temp, rtol=1e-5)


def test_hard_negatives_never_share_the_image_id():
  idx = jnp.array([0, 0, 1, 2])
  # The same-id entries are the most similar; row 0's only candidates are 2 and 3,
  # with probabilities 1/4 and 3/4 (logits 0 and log 3).
  sims = jnp.array([[10., 10., 0., np.log(3.)],
                    [10., 10., 0., np.log(3.)],
                    [0., 0., 10., 0.],
                    [0., 0., 0., 10.]])
  keys = jax.random.split(jax.random.key(0), 4000)
  neg_t, neg_i = jax.vmap(lambda k: rt.sample_negatives_excluding_ids(k, sims, sims, idx))(keys)
  for neg in (np.asarray(neg_t), np.asarray(neg_i)):
    assert not np.any(np.asarray(idx)[neg] == np.asarray(idx)[None]), "a same-id negative"
    assert np.mean(neg[:, 0] == 3) == pytest.approx(0.75, abs=0.03)
    assert set(neg[:, 0]) == {2, 3}


def test_device_negatives_stay_in_their_shard_and_skip_the_same_id():
  # 2 shards of 3 rows; in shard 0 rows 0 and 1 share an id, so row 0's only candidate
  # is row 2 although row 3 (another shard) is far more similar.
  idx = jnp.array([5, 5, 6, 7, 8, 9])
  sims = jnp.zeros((6, 6)).at[:, 3].set(20.0)
  keys = jax.random.split(jax.random.key(1), 500)
  neg_t, neg_i = jax.vmap(
      lambda k: rt.sample_negatives_excluding_ids(k, sims, sims, idx, shards=2))(keys)
  for neg in (np.asarray(neg_t), np.asarray(neg_i)):
    assert np.all(neg[:, 0] == 2) and np.all(neg[:, 1] == 2)
    assert np.all(neg[:, :3] < 3) and np.all(neg[:, 3:] >= 3)
    assert not np.any(np.asarray(idx)[neg] == np.asarray(idx)[None])


def test_id_queue_follows_the_feature_queue_unless_frozen():
  extras = dict(image_queue=jnp.zeros((8, 3)), text_queue=jnp.zeros((8, 3)),
                queue_ptr=jnp.int32(6), idx_queue=jnp.full((8,), rt.IDX_QUEUE_INIT, jnp.int32))
  feats, ids = jnp.ones((2, 3)), jnp.array([4, 2])
  out = rt.update_queues(extras, feats, 2 * feats, ids, idx_queue_frozen=False)
  np.testing.assert_array_equal(out["idx_queue"], [-100] * 6 + [4, 2])
  np.testing.assert_array_equal(out["text_queue"][6:], 2 * np.ones((2, 3)))
  assert int(out["queue_ptr"]) == 0
  # The official code never enqueues ids: queue entries never become positives.
  frozen = rt.update_queues(extras, feats, feats, ids, idx_queue_frozen=True)
  np.testing.assert_array_equal(frozen["idx_queue"], [-100] * 8)
  np.testing.assert_array_equal(frozen["image_queue"], out["image_queue"])


# --------------------------------------------------------------------------- checkpoints
def _config(workdir, **data):
  c = simla_retrieval.get_config()
  c.init.checkpoint = workdir
  c.data.image_size = 32
  c.data.shapes.update(val_size=8, test_size=8, comp_size=8, strict_size=8)
  c.data.update(data)
  c.finetune_images = 8
  c.batch_size = 8
  c.queue_size = 16
  c.eval.update(k_test=4, batch_size=8)
  c.itm.negatives_from = "global"   # 8 rows over 8 fake devices: 1 per shard
  c.progress_bar = False
  return c


def test_load_drops_pretraining_heads_and_keeps_weights(pretrained):
  workdir, _, state = pretrained
  p = rt.load_pretrained(_config(workdir))
  assert p.step == tiny_checkpoint.STEP
  assert set(p.params) == set(rt.RETRIEVAL_MODULES)
  assert "mask_token" not in p.params["vit"] and "mlm_head" not in p.params["bert"]
  assert set(p.params_m) == set(rt.MOMENTUM_MODULES) and not p.model_config.use_mask_token
  np.testing.assert_array_equal(p.params["bert"]["embeddings"]["word_embeddings"]["embedding"],
                                state.params["bert"]["embeddings"]["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(p.params_m["vit"]["pos_embed"],
                                state.extras["momentum"]["vit"]["pos_embed"])
  np.testing.assert_array_equal(p.queues["text_queue"], state.extras["text_queue"])


def test_load_interpolates_positions_to_a_larger_image(pretrained):
  workdir, _, state = pretrained
  p = rt.load_pretrained(_config(workdir, image_size=64))    # 2x2 -> 4x4 patches
  assert p.params["vit"]["pos_embed"].shape == (1, 17, 64)
  np.testing.assert_allclose(p.params["vit"]["pos_embed"],
                             vit_lib.interpolate_pos_embed(state.params["vit"]["pos_embed"], 16))


def test_finetuning_sets_its_own_bert_dropout_whatever_pretraining_used(pretrained):
  workdir, pretrain_cfg, _ = pretrained
  c = _config(workdir)
  c.bert_dropout.update(dropout=0.25, attention_dropout=0.15)
  bert = rt.load_pretrained(c).model_config.bert
  assert (bert.dropout, bert.attention_dropout) == (0.25, 0.15)
  assert (pretrain_cfg.model.bert.dropout, pretrain_cfg.model.bert.attention_dropout) != (0.25, 0.15)


def test_an_official_pth_loads_the_same_weights(pretrained, tmp_path):
  pytest.importorskip("torch")
  workdir, _, state = pretrained
  c = _config(workdir)
  model_cfg = tiny_checkpoint.write_official_pth(workdir, state, c.data,
                                                 str(tmp_path / "simla.pth"))
  c.init.checkpoint = str(tmp_path / "simla.pth")
  c.model = model_cfg
  from_pth, from_workdir = rt.load_pretrained(c), rt.load_pretrained(_config(workdir))
  jax.tree.map(np.testing.assert_allclose, from_pth.params, from_workdir.params)
  jax.tree.map(np.testing.assert_allclose, from_pth.params_m, from_workdir.params_m)
  np.testing.assert_allclose(from_pth.queues["image_queue"], from_workdir.queues["image_queue"])


def test_a_different_vocabulary_is_refused(pretrained, tmp_path):
  workdir, _, _ = pretrained
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(vocab_from_words(["a", "b"])))
  c = _config(workdir)
  c.data.tokenizer.vocab_file = str(vocab)
  tok = pipeline.make_tokenizer(c.data)
  with pytest.raises(ValueError, match="vocabulary"):
    rt.build_model(c, tok, rt.load_pretrained(c))


# --------------------------------------------------------------------------- evaluation
def test_minimal_pair_accuracy_equals_direct_model_scores(pretrained):
  workdir, _, _ = pretrained
  c = _config(workdir)
  tok = pipeline.make_tokenizer(c.data)
  p = rt.load_pretrained(c)
  model = rt.build_model(c, tok, p)
  params = jax.tree.map(jnp.asarray, p.params)
  evaluator = retrieval.Evaluator(model, c.eval, c.data, tok, splits=("strict",),
                                  minimal_pairs=("strict",))
  got = evaluator.minimal_pair_accuracy(params, evaluator.pairs["strict"])

  data = evaluator.data["strict"]
  images = np.stack([data.image(i) for i in range(8)])
  apply = lambda *a, method: model.apply({"params": params}, *a, method=method)
  image_seq = apply(images, method=SIMLA.embed_image)
  img = apply(image_seq, method=SIMLA.image_feature)
  itm, itc = {}, {}
  for name in ("caption", "foil"):
    texts = [shapes.minimal_pair(data.source[i])[name] for i in range(8)]
    ids, mask = tok([t.replace(",", "") for t in texts])
    itm[name] = apply(apply(ids, mask, image_seq, method=SIMLA.fuse), method=SIMLA.itm_logits)[:, 1]
    itc[name] = np.sum(img * apply(apply(ids, mask, method=SIMLA.embed_text),
                                   method=SIMLA.text_feature), -1)
  assert got["itm_acc"] == pytest.approx(100 * np.mean(itm["caption"] > itm["foil"]))
  assert got["itc_acc"] == pytest.approx(100 * np.mean(itc["caption"] > itc["foil"]))


def test_eval_mode_on_an_albef_json_prints_and_writes_metrics(pretrained, tmp_path):
  workdir, cfg, _ = pretrained
  source = shapes.ShapesSource(cfg.data, "test")
  records = []
  for i in range(4):
    Image.fromarray(source[i]["image"]).save(tmp_path / f"{i}.png")
    records.append({"image": f"{i}.png", "caption": source[i]["captions"][:3]})
  (tmp_path / "test.json").write_text(json.dumps(records))
  (tmp_path / "vocab.txt").write_text("\n".join(vocab_from_words(shapes.vocabulary(cfg.data))))
  out = tmp_path / "eval"
  rows, stdout = run_py.run([
      "--config=configs/simla_retrieval.py:eval", f"--config.init.checkpoint={workdir}",
      f"--config.eval.files.test={tmp_path}/test.json",
      f"--config.data.captions.image_root={tmp_path}",
      f"--config.data.tokenizer.vocab_file={tmp_path}/vocab.txt",
      "--config.data.image_size=32", "--config.data.loader.worker_count=0",
      "--config.eval.k_test=2", "--config.eval.batch_size=4"], out, timeout=600)
  assert "tr_r1" in stdout and "ir_r10" in stdout and "\ntest " in stdout
  (row,) = rows
  assert row["step"] == tiny_checkpoint.STEP
  for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean"):
    assert 0.0 <= row[f"eval/test_{k}"] <= 100.0
  assert row["eval/test_tr_r10"] == 100.0     # 4 images: every rank is < 10


@pytest.mark.slow
def test_finetuning_end_to_end_updates_the_id_queue_and_reports_test_once(pretrained, tmp_path):
  workdir, _, state0 = pretrained
  c = _config(workdir)
  c.total_steps = 3
  c.eval_every_steps = 2
  c.log_every_steps = 1
  state = loop.train_and_evaluate(c, str(tmp_path), rt.make_task)
  rows = metrics_lib.read_metrics(str(tmp_path))
  evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
  assert [r["step"] for r in evals] == [2, 3]
  assert not any(k.startswith(("eval/test", "eval/comp", "eval/strict")) for k in evals[0])
  for split in ("val", "test", "comp", "strict"):
    assert f"eval/{split}_tr_r1" in evals[1]
  for split in ("test", "comp", "strict"):
    assert 0 <= evals[1][f"eval/{split}_pairs_itm_acc"] <= 100
  # 3 batches of 8 from 8 images x 5 captions: the queue (16) holds the last two batches' ids.
  queue = np.asarray(state.extras["idx_queue"])
  assert set(queue) <= set(range(8)) and len(set(queue)) > 1
  assert int(state.extras["queue_ptr"]) == (3 * 8) % 16
  assert not np.allclose(state.params["itm_head"]["kernel"], state0.params["itm_head"]["kernel"])
