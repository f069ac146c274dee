"""SIMLA objectives against explicit NumPy computations on small cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from simla_jax import objectives as obj


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_itc_equals_explicit_cross_entropy_with_distilled_targets():
  rng = np.random.default_rng(0)
  b, q, e, temp, alpha = 3, 6, 4, 0.07, 0.4
  img, txt, img_m, txt_m = (_norm(rng.normal(size=(b, e))).astype(np.float32) for _ in range(4))
  iq, tq = (_norm(rng.normal(size=(q, e))).astype(np.float32) for _ in range(2))
  loss, sim_i2t, _ = obj.itc_loss(img, txt, img_m, txt_m, iq, tq, temp, alpha)

  def direction(a, a_m, other_all):
    s, s_m = a @ other_all.T / temp, a_m @ other_all.T / temp
    tgt = alpha * np.exp(_log_softmax(s_m)) + (1 - alpha) * np.eye(b, b + q)
    return -(tgt * _log_softmax(s)).sum(-1).mean()

  expect = 0.5 * (direction(img, img_m, np.concatenate([txt_m, tq]))
                  + direction(txt, txt_m, np.concatenate([img_m, iq])))
  np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
  assert sim_i2t.shape == (b, b + q)


def test_itc_gradients_reach_batch_columns_and_temperature():
  rng = np.random.default_rng(1)
  f = [jnp.asarray(_norm(rng.normal(size=(2, 4))), jnp.float32) for _ in range(6)]
  g = jax.grad(lambda m: obj.itc_loss(f[0], f[1], m, f[3], f[4], f[5], 0.1, 0.0)[0])(f[2])
  # Momentum batch features are columns of the online logits, so they get gradient.
  assert np.abs(np.asarray(g)).sum() > 0
  g_t = jax.grad(lambda t: obj.itc_loss(f[0], f[1], f[2], f[3], f[4], f[5], t, 0.4)[0])(0.1)
  assert np.isfinite(float(g_t))


def test_enqueue_overwrites_rows_and_wraps_pointer():
  queue = jnp.zeros((6, 2))
  feats = jnp.ones((3, 2))
  queue, ptr = obj.enqueue(queue, feats, 3)
  assert int(ptr) == 0
  np.testing.assert_array_equal(np.asarray(queue)[3:], 1.0)
  np.testing.assert_array_equal(np.asarray(queue)[:3], 0.0)


def test_hard_negatives_never_pick_the_positive_and_follow_similarity():
  b = 4
  sim = np.full((b, b), -5.0, np.float32)
  np.fill_diagonal(sim, 10.0)                 # the positive is most similar ...
  sim[np.arange(b), (np.arange(b) + 1) % b] = 5.0  # ... the next item is the hard negative
  counts = np.zeros((b, b))
  for seed in range(50):
    neg_t, neg_i = obj.sample_hard_negatives(jax.random.key(seed), sim, sim)
    counts[np.arange(b), np.asarray(neg_t)] += 1
    assert np.all(np.asarray(neg_i) != np.arange(b))
  assert np.all(np.diag(counts) == 0)
  assert np.all(counts[np.arange(b), (np.arange(b) + 1) % b] >= 45)


def test_random_negatives_ignore_similarity():
  """random_fraction=1: uniform over the other rows, however strongly one is favoured."""
  b = 4
  sim = np.full((b, b), -50.0, np.float32)
  sim[np.arange(b), (np.arange(b) + 1) % b] = 50.0   # a hard draw would always take this one
  counts = np.zeros((b, b))
  for seed in range(60):
    neg_t, neg_i = obj.sample_hard_negatives(jax.random.key(seed), sim, sim,
                                              random_fraction=1.0)
    counts[np.arange(b), np.asarray(neg_t)] += 1
    counts[np.arange(b), np.asarray(neg_i)] += 1
  assert np.all(np.diag(counts) == 0)
  # 120 draws per row over 3 candidates: each near 40, far from the hard draw's 120 / 0 / 0.
  off = counts[~np.eye(b, dtype=bool)]
  assert off.min() >= 20 and off.max() <= 60


def test_random_fraction_mixes_hard_and_uniform_draws():
  b = 8
  sim = np.full((b, b), -50.0, np.float32)
  hard = (np.arange(b) + 1) % b
  sim[np.arange(b), hard] = 50.0
  took_hard = []
  for seed in range(40):
    neg_t, _ = obj.sample_hard_negatives(jax.random.key(seed), sim, sim, random_fraction=0.5)
    took_hard.append(np.asarray(neg_t) == hard)
  # Half the rows random (then 1/7 of them still hit the hard one): 0.5 + 0.5 / 7 = 0.57.
  assert 0.45 < np.mean(took_hard) < 0.7
  with pytest.raises(ValueError, match="random_fraction 1.5"):
    obj.sample_hard_negatives(jax.random.key(0), sim, sim, random_fraction=1.5)


def test_device_negatives_never_cross_shards():
  """negatives_from="device": under jit on a batch sharded over 8 devices, every negative
  comes from the row's own shard; drawn from the whole batch, they do cross."""
  shards, per_shard = 8, 4
  b = shards * per_shard
  mesh = jax.make_mesh((shards,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
  rng = np.random.default_rng(0)
  # Flat similarities: without the shard rule, most negatives would lie in other shards.
  sims = [jax.device_put(rng.normal(scale=0.1, size=(b, b)).astype(np.float32), rows)
          for _ in range(2)]
  draw = {n: jax.jit(functools.partial(obj.sample_hard_negatives, shards=n)) for n in (shards, 1)}
  own_shard = np.arange(b) // per_shard
  crossed = 0
  with jax.set_mesh(mesh):
    for seed in range(20):
      for neg in draw[shards](jax.random.key(seed), *sims):
        neg = np.asarray(neg)
        assert np.all(neg // per_shard == own_shard) and np.all(neg != np.arange(b))
      neg_t, _ = draw[1](jax.random.key(seed), *sims)
      crossed += np.sum(np.asarray(neg_t) // per_shard != own_shard)
  assert crossed > 0.5 * 20 * b
  # Within a shard, the draw follows the similarity like the whole-batch one.
  sim = np.full((b, b), -5.0, np.float32)
  np.fill_diagonal(sim, 10.0)
  nxt = np.arange(b) // per_shard * per_shard + (np.arange(b) + 1) % per_shard
  sim[np.arange(b), nxt] = 5.0
  neg_t, neg_i = draw[shards](jax.random.key(1), sim, sim)
  assert np.mean(np.asarray(neg_t) == nxt) > 0.9 and np.mean(np.asarray(neg_i) == nxt) > 0.9


def test_device_negatives_need_two_rows_per_shard():
  with pytest.raises(ValueError, match="at least 2 rows per shard"):
    obj.sample_hard_negatives(jax.random.key(0), np.zeros((8, 8)), np.zeros((8, 8)), shards=8)


def test_itm_loss_labels_positives_first():
  b = 2
  logits = np.zeros((3 * b, 2), np.float32)
  logits[:b, 1] = 4.0
  logits[b:, 0] = 4.0
  loss, acc = obj.itm_loss(logits)
  np.testing.assert_allclose(float(loss), np.log1p(np.exp(-4.0)), rtol=1e-5)
  assert float(acc) == 1.0


@pytest.mark.parametrize("over_sequence", [False, True])
def test_mlm_loss_masked_positions_and_distill_axis(over_sequence):
  rng = np.random.default_rng(2)
  b, l, v, alpha = 2, 5, 7, 0.4
  logits = rng.normal(size=(b, l, v)).astype(np.float32)
  logits_m = rng.normal(size=(b, l, v)).astype(np.float32)
  labels = np.full((b, l), obj.IGNORE)
  labels[0, 1], labels[1, 4], labels[1, 0] = 3, 6, 0
  loss, _ = obj.mlm_loss(logits, logits_m, labels, alpha, distill_over_sequence=over_sequence)

  m = labels != obj.IGNORE
  ce = -_log_softmax(logits)[m, labels[m]].mean()
  soft = np.exp(_log_softmax(logits_m))
  log_p = _log_softmax(logits, axis=1 if over_sequence else -1)
  distill = -(log_p * soft).sum(-1)[m].mean()
  np.testing.assert_allclose(float(loss), (1 - alpha) * ce + alpha * distill, rtol=1e-5)


def test_mim_loss_counts_only_masked_patches():
  rng = np.random.default_rng(3)
  b, n, k, alpha = 2, 4, 5, 0.4
  logits = rng.normal(size=(b, n, k)).astype(np.float32)
  logits_m = rng.normal(size=(b, n, k)).astype(np.float32)
  tokens = rng.integers(0, k, size=(b, n))
  mask = np.array([[1, 0, 1, 0], [0, 0, 0, 1]], bool)
  loss, _ = obj.mim_loss(logits, logits_m, tokens, mask, alpha)
  lp = _log_softmax(logits)
  ce = -np.take_along_axis(lp, tokens[..., None], -1)[..., 0][mask].mean()
  distill = -(lp * np.exp(_log_softmax(logits_m))).sum(-1)[mask].mean()
  np.testing.assert_allclose(float(loss), (1 - alpha) * ce + alpha * distill, rtol=1e-5)
  # Unmasked patches do not matter.
  logits2 = logits.copy()
  logits2[~mask] = 100.0
  np.testing.assert_allclose(float(obj.mim_loss(logits2, logits_m, tokens, mask, alpha)[0]),
                             float(loss), rtol=1e-6)


def test_psl_picks_the_positions_the_attention_implies():
  # 3 heads over 6 positions; ids 10..15, [CLS]=0 at position 0.
  ids = np.array([[0, 11, 12, 13, 14, 15]])
  attn = np.zeros((1, 3, 6), np.float32)
  attn[0, 0] = [0.5, 0.2, 0.15, 0.1, 0.04, 0.01]   # top-2: 0, 1
  attn[0, 1] = [0.1, 0.4, 0.05, 0.3, 0.1, 0.05]    # top-2: 1, 3
  attn[0, 2] = [0.1, 0.05, 0.05, 0.5, 0.05, 0.25]  # top-2: 3, 5
  hot = obj.psl_keywords(attn, ids, vocab_size=20, per_head=2, n_keywords=2, cls_id=0)
  # Votes: pos1=2, pos3=2, pos0=1, pos5=1 -> keywords are ids 11 and 13.
  assert set(np.flatnonzero(np.asarray(hot[0]))) == {11, 13}
  hot = obj.psl_keywords(attn, ids, vocab_size=20, per_head=2, n_keywords=3, cls_id=0)
  # Third place is a tie between [CLS] (pos 0) and pos 5; [CLS] is never a keyword.
  assert 0 not in set(np.flatnonzero(np.asarray(hot[0])))


def _official_keyword_positions(attn_b_h_l, per_head, n_keywords):
  """The official count rule (models/simla/pretrain.py, Pseudo-label Supervision): per-head
  torch.topk, scatter_add of the votes, torch.topk of the counts. (positions, counts)."""
  attn = torch.from_numpy(np.asarray(attn_b_h_l))
  b, _, l = attn.shape
  top = attn.reshape(-1, l).topk(per_head, dim=-1).indices.view(b, -1)
  counts = torch.zeros(b, l, dtype=top.dtype).scatter_add_(1, top, torch.ones_like(top))
  return counts.topk(n_keywords, dim=-1).indices.numpy(), counts.numpy()


def test_psl_ties_never_lose_a_keyword_to_cls():
  """[CLS] ties for 5th place: the selection is one the official count rule allows (the
  same vote counts) and takes the tied keyword instead of [CLS], whose column is zeroed."""
  rng = np.random.default_rng(0)
  b, h, l, per_head, n = 32, 12, 10, 4, 5
  ids = np.stack([rng.permutation(np.arange(1, 40))[:l] for _ in range(b)])
  ids[:, 0] = 0                                   # [CLS]
  attn = rng.uniform(0.0, 0.01, (b, h, l)).astype(np.float32)
  for i in range(b):
    others = rng.permutation(np.arange(1, l))
    top, tied = others[:4], others[4:6]           # 9 votes each; [CLS] and `tied`: 4 each
    for j in range(h):
      attn[i, j, np.delete(top, j % 4)] += 1.0
      attn[i, j, [0, *tied][j % 3]] += 1.0
  official, counts = _official_keyword_positions(attn, per_head, n)
  hot = np.asarray(obj.psl_keywords(attn, ids, vocab_size=40, per_head=per_head,
                                    n_keywords=n, cls_id=0))
  lowest_index = np.asarray(jax.lax.top_k(jnp.asarray(counts, jnp.float32), n)[1])
  for i in range(b):
    assert counts[i, 0] == 4 and sorted(counts[i])[-5:] == [4, 9, 9, 9, 9]
    words = set(np.flatnonzero(hot[i]))
    assert len(words) == n and 0 not in words                # five keywords, no [CLS]
    ours = [int(np.flatnonzero(ids[i] == w)[0]) for w in words]
    assert sorted(counts[i, ours]) == sorted(counts[i, official[i]])   # a valid official pick
    assert 0 in lowest_index[i]      # what plain top_k on the counts picks: 4 keywords left
  print("keywords: ours", int(hot.sum()), "official topk", sum(
      len(set(ids[i, official[i]]) - {0}) for i in range(b)), "lowest index", 4 * b)


def test_psl_loss_is_bce_mixed_by_alpha():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5)).astype(np.float32)
  logits_m = rng.normal(size=(2, 5)).astype(np.float32)
  hard = (rng.random((2, 5)) > 0.5).astype(np.float32)
  bce = lambda x, y: np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
  soft = 1 / (1 + np.exp(-logits_m))
  np.testing.assert_allclose(float(obj.psl_loss(logits, logits_m, hard, 0.4)),
                             0.6 * bce(logits, hard) + 0.4 * bce(logits, soft), rtol=1e-5)


def test_alpha_ramps_over_warmup_and_temperature_clamps():
  np.testing.assert_allclose([float(obj.alpha_at(s, 0.4, 100)) for s in (0, 50, 100, 500)],
                             [0.0, 0.2, 0.4, 0.4], rtol=1e-6)
  assert float(obj.clamp_temperature(jnp.float32(0.9))) == 0.5
  assert float(jax.grad(lambda t: obj.clamp_temperature(t) * 2.0)(0.9)) == 2.0
