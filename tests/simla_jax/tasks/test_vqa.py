"""VQA: the answer LM loss with distillation and the official bugs, answer-list ranking
(brute force), loading the decoder from a pretraining checkpoint, run.py end to end."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_py
import tiny_checkpoint
from configs import simla_vqa
from simla_jax.data import pipeline, vqa_shapes
from simla_jax.models import answer_decoder
from simla_jax.tasks import vqa

LN = np.log

# One answer row [tok 2, tok 0, tok 1]: position 0 predicts token 0, position 1 token 1.
# softmax([0, 0, ln 2]) = (1/4, 1/4, 1/2); softmax([ln 3, 0, 0]) = (3/5, 1/5, 1/5).
IDS = jnp.array([[2, 0, 1]])
LOGITS = jnp.array([[[0.0, 0.0, LN(2)], [LN(3), 0.0, 0.0], [5.0, -1.0, 2.0]]])
# Momentum softmax: (1/5, 3/5, 1/5), then uniform.
LOGITS_M = jnp.array([[[0.0, LN(3), 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
LM = LN(4) + LN(5)
DISTILL = (0.8 * LN(4) + 0.2 * LN(2)) + (LN(5 / 3) + 2 * LN(5)) / 3


def test_answer_lm_loss_matches_hand_computed_values():
  full = jnp.ones((1, 3), jnp.int32)
  assert float(vqa.answer_lm_loss(LOGITS, None, IDS, full, 0.0)[0]) == pytest.approx(LM, rel=1e-6)
  # Padding takes no part: only token 0 is predicted.
  padded = jnp.array([[1, 1, 0]])
  assert float(vqa.answer_lm_loss(LOGITS, None, IDS, padded, 0.0)[0]) == pytest.approx(LN(4))
  got = float(vqa.answer_lm_loss(LOGITS, LOGITS_M, IDS, full, 0.4)[0])
  assert got == pytest.approx(0.6 * LM + 0.4 * DISTILL, rel=1e-6)
  g = jax.grad(lambda m: vqa.answer_lm_loss(LOGITS, m, IDS, full, 0.4).sum())(LOGITS_M)
  np.testing.assert_array_equal(g, 0.0)


def test_compat_distill_over_sequence_reproduces_the_official_log_softmax():
  # log_softmax over positions {0, 1} per vocabulary column: column 0 [0, ln 3] -> (1/4, 3/4),
  # column 1 [0, 0] -> (1/2, 1/2), column 2 [ln 2, 0] -> (2/3, 1/3).
  bug = (-(0.2 * LN(1 / 4) + 0.6 * LN(1 / 2) + 0.2 * LN(2 / 3))
         - (LN(3 / 4) + LN(1 / 2) + LN(1 / 3)) / 3)
  full = jnp.ones((1, 3), jnp.int32)
  got = float(vqa.answer_lm_loss(LOGITS, LOGITS_M, IDS, full, 0.4, distill_over_sequence=True)[0])
  assert got == pytest.approx(0.6 * LM + 0.4 * bug, rel=1e-6)


def test_compat_alpha_not_passed_turns_distillation_off_and_is_off_by_default():
  c = simla_vqa.get_config()
  assert not any(c.compat.values())                   # the official bugs are fixed by default
  c.alpha, c.alpha_warmup_steps = 0.4, 10
  assert float(vqa.distill_alpha(5, c)) == pytest.approx(0.2)
  c.compat.alpha_not_passed = True
  assert float(vqa.distill_alpha(5, c)) == 0.0
  # With alpha 0 the loss is the LM loss whatever the momentum logits.
  full = jnp.ones((1, 3), jnp.int32)
  loss = vqa.answer_lm_loss(LOGITS, LOGITS_M, IDS, full, vqa.distill_alpha(5, c))
  assert float(loss[0]) == pytest.approx(LM, rel=1e-6)


def test_weighted_loss_is_the_official_weighted_sum_over_the_batch():
  rows = jnp.array([[1.0, 2.0], [3.0, 5.0]])
  weights = jnp.array([[0.6, 0.4], [1.0, 0.0]])      # question 1 has one answer
  assert float(vqa.weighted_loss(rows, weights)) == pytest.approx((0.6 + 0.8 + 3.0) / 2)


# --------------------------------------------------------------------------- ranking
VOCAB, HIDDEN = 12, 16
BOS, SEP = 1, 2
# Answers as word tokens (3..11); several share a first token.
ANSWER_TOKENS = [[3], [3, 4], [3, 5, 6], [4], [4, 7], [5], [6, 3], [7, 8, 9], [8], [9, 3, 4],
                 [10], [11, 11]]


def _answer_arrays(length=6):
  ids = np.zeros((len(ANSWER_TOKENS), length), np.int32)
  mask = np.zeros_like(ids)
  for n, toks in enumerate(ANSWER_TOKENS):
    seq = [BOS] + toks + [SEP]
    ids[n, :len(seq)], mask[n, :len(seq)] = seq, 1
  return ids, mask


@pytest.fixture(scope="module")
def ranker():
  decoder = answer_decoder.AnswerDecoder(vocab_size=VOCAB, hidden=HIDDEN, num_layers=2, heads=2,
                                         ffn=32, max_position=16, init_std=0.3)
  rng = np.random.default_rng(0)
  states = rng.standard_normal((3, 4, HIDDEN)).astype(np.float32)
  states_mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
  ids = jnp.ones((1, 2), jnp.int32)
  params = nn.meta.unbox(decoder.init(jax.random.key(1), ids, ids, states[:1],
                                      states_mask[:1])["params"])
  return decoder, {"decoder": params}, states, states_mask


def _brute_force(decoder, params, states, states_mask):
  """Per question: log p(first token) of every answer and its sequence log-likelihood,
  each token scored by running the decoder on its unpadded prefix alone."""
  apply = jax.jit(lambda prefix, s, m: decoder.apply({"params": params["decoder"]}, prefix,
                                                    jnp.ones_like(prefix), s, m))
  first, loglik = [], []
  for q in range(states.shape[0]):
    s, m = states[q:q + 1], states_mask[q:q + 1]
    f, ll = [], []
    for toks in ANSWER_TOKENS:
      seq = [BOS] + toks + [SEP]
      total = 0.0
      for t in range(1, len(seq)):
        prefix = jnp.array([seq[:t]])
        logits = apply(prefix, s, m)
        logp = float(jax.nn.log_softmax(logits[0, -1])[seq[t]])
        total += logp
        if t == 1:
          f.append(logp)
      ll.append(total)
    first.append(f)
    loglik.append(ll)
  return np.array(first), np.array(loglik)


def test_ranking_picks_the_best_sequence_among_the_first_token_top_k(ranker):
  decoder, params, states, states_mask = ranker
  ids, mask = _answer_arrays()
  first, loglik = _brute_force(decoder, params, states, states_mask)
  rank = jax.jit(lambda k, twice: vqa.rank_answers(decoder, params, states, states_mask, ids,
                                                   mask, k, twice), static_argnums=(0, 1))
  for k in (1, 4):
    best, top, scores = (np.asarray(x) for x in rank(k, False))
    for q in range(states.shape[0]):
      candidates = np.argsort(-first[q], kind="stable")[:k]     # ties: the lower index first
      np.testing.assert_array_equal(np.sort(top[q]), np.sort(candidates))
      np.testing.assert_allclose(scores[q], loglik[q][top[q]], rtol=1e-4, atol=1e-4)
      assert best[q] == candidates[np.argmax(loglik[q][candidates])]
  # The top-k cut matters on this model: with k = 1 some question loses its global best.
  best_1 = np.asarray(rank(1, False)[0])
  assert np.any(best_1 != np.argmax(loglik, -1))
  # Official score: the first token's log-probability counted twice.
  best, top, scores = (np.asarray(x) for x in rank(4, True))
  for q in range(states.shape[0]):
    np.testing.assert_allclose(scores[q], loglik[q][top[q]] + first[q][top[q]], rtol=1e-4,
                               atol=1e-4)
    assert best[q] == top[q][np.argmax(loglik[q][top[q]] + first[q][top[q]])]


# --------------------------------------------------------------------------- loading
def _config(workdir, **overrides):
  c = simla_vqa.get_config()
  c.init.checkpoint = workdir
  c.data.image_size = 32
  c.data.shapes.update(val_size=2, test_size=2)
  c.decoder.update(layers=1, first_layer=1)          # the tiny BERT has 2 layers
  c.train_images = 4
  c.batch_size = 8
  c.eval.batch_size = 8
  c.progress_bar = False
  c.update(overrides)
  return c


def test_load_builds_the_decoder_from_the_checkpoint_encoder(pretrained):
  workdir, cfg, state = pretrained
  config = _config(workdir)
  answers = vqa.read_answer_list(config)
  loaded = vqa.load(config, answers)
  base = pipeline.make_tokenizer(cfg.data)
  assert loaded.tokenizer.vocab[:base.vocab_size] == base.vocab
  bert = state.params["bert"]
  dec = loaded.params["decoder"]
  jax.tree.map(np.testing.assert_array_equal, dec["layer_0"], bert["layer_1"])
  assert sorted(dec) == ["embeddings", "layer_0", "mlm_head"]
  assert "mlm_head" not in loaded.params["bert"]
  table = dec["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(table[:base.vocab_size],
                                bert["embeddings"]["word_embeddings"]["embedding"])
  np.testing.assert_array_equal(table, loaded.params["bert"]["embeddings"]["word_embeddings"]
                                ["embedding"])            # new question words: the same rows
  bias = dec["mlm_head"]["bias"]
  assert bias.shape == (loaded.tokenizer.vocab_size,)
  np.testing.assert_array_equal(bias[:base.vocab_size], bert["mlm_head"]["bias"])
  np.testing.assert_array_equal(bias[base.vocab_size:], 0.0)
  # The momentum decoder comes from the checkpoint's momentum BERT.
  jax.tree.map(np.testing.assert_array_equal, loaded.params_m["decoder"]["layer_0"],
               state.extras["momentum"]["bert"]["layer_1"])
  # Answers are [CLS] answer [SEP]; none has an unknown word.
  assert loaded.answer_ids.shape == (len(answers), config.data.answer_max_len)
  assert np.all(loaded.answer_ids[:, 0] == loaded.tokenizer.cls_id)
  assert loaded.tokenizer.unk_id not in loaded.answer_ids
  with pytest.raises(ValueError, match=r"decoder.layers 2 from decoder.first_layer 1: the "
                                       r"encoder has 2 layers"):
    vqa.load(_config(workdir, decoder=dict(layers=2, first_layer=1)), answers)


def test_an_official_pth_gives_the_same_decoder(pretrained, tmp_path):
  pytest.importorskip("torch")
  workdir, _, state = pretrained
  config = _config(workdir)
  model_cfg = tiny_checkpoint.write_official_pth(workdir, state, config.data,
                                                 str(tmp_path / "simla.pth"))
  answers = vqa.read_answer_list(config)
  from_workdir = vqa.load(config, answers)
  from_pth = vqa.load(_config(str(tmp_path / "simla.pth"), model=model_cfg), answers)
  jax.tree.map(np.testing.assert_allclose, from_pth.params, from_workdir.params)
  jax.tree.map(np.testing.assert_allclose, from_pth.params_m, from_workdir.params_m)


@pytest.mark.slow
def test_run_py_fine_tunes_ranks_and_writes_the_result_json(pretrained, tmp_path):
  workdir, _, _ = pretrained
  out = tmp_path / "vqa"
  rows, _ = run_py.run([
      "--config=configs/simla_vqa.py", f"--config.init.checkpoint={workdir}",
      "--config.data.image_size=32", "--config.data.shapes.val_size=2",
      "--config.data.shapes.test_size=2", "--config.decoder.layers=1",
      "--config.decoder.first_layer=1", "--config.train_images=4", "--config.batch_size=8",
      "--config.eval.batch_size=8", "--config.total_steps=3", "--config.eval_every_steps=2",
      "--config.log_every_steps=1", "--config.alpha_warmup_steps=2"], out)
  evals = [r for r in rows if "eval/val_acc" in r]
  assert [r["step"] for r in evals] == [2, 3]
  assert "eval/test_acc" not in evals[0]
  final = evals[1]
  for split in ("val", "test"):
    assert 0.0 <= final[f"eval/{split}_acc"] <= 100.0
    assert 0.0 <= final[f"eval/{split}_majority_acc"] <= 100.0
  train = [r for r in rows if "train/loss" in r]
  assert [r["train/alpha"] for r in train] == pytest.approx([0.0, 0.2, 0.4])
  results = json.loads((out / "vqa_result_test.json").read_text())
  assert [r["question_id"] for r in results] == list(range(2 * len(vqa_shapes.KINDS)))
  assert {r["answer"] for r in results} <= set(vqa_shapes.answer_list(4))
  assert json.loads((out / "config.json").read_text())["family"] == "simla_vqa"
