"""SIMLA's pretraining objectives as pure functions (spec §2).

Conventions: B = global batch, Q = queue length, E = embed dim, L = text length,
N = image patches, V = vocabulary, K = MIM codebook. Features are L2-normalised.
Queues are stored row-major, (Q, E).
"""

import jax
import jax.numpy as jnp
import optax

IGNORE = -100  # label of positions that take no part in MLM


def alpha_at(step, alpha: float, warmup_steps: int):
  """Distillation weight: linear 0 -> alpha over the first epoch, then alpha."""
  if warmup_steps <= 0:
    return jnp.asarray(alpha, jnp.float32)
  return alpha * jnp.minimum(1.0, step / warmup_steps).astype(jnp.float32)


def clamp_temperature(temp, low: float = 1e-3, high: float = 0.5):
  """The official code clamps `temp` in place before each forward: the clamped value
  is used and the gradient still reaches the parameter (straight through)."""
  return temp + jax.lax.stop_gradient(jnp.clip(temp, low, high) - temp)


def soft_cross_entropy(logits, targets, axis=-1):
  """-sum(targets * log_softmax(logits)) along `axis`."""
  return -jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32), axis=axis) * targets, axis=axis)


# --------------------------------------------------------------------------- ITC
def itc_loss(img_b_e, txt_b_e, img_m_b_e, txt_m_b_e, image_queue_q_e, text_queue_q_e,
             temp, alpha, targets_b_n=None):
  """Contrastive loss with momentum distillation (ALBEF / spec §2.1).

  Online features are compared with [momentum batch ; queue] (N = B + Q entries);
  targets mix the momentum model's softmax (weight alpha) with the hard targets:
  `targets_b_n` (B, N), rows summing to 1, or by default the one-hot on the pair itself.
  Returns (loss, sim_i2t (B, B+Q), sim_t2i (B, B+Q)).
  """
  img_all = jnp.concatenate([img_m_b_e, image_queue_q_e], axis=0)   # (B+Q, E)
  txt_all = jnp.concatenate([txt_m_b_e, text_queue_q_e], axis=0)
  sim_i2t = img_b_e @ txt_all.T / temp
  sim_t2i = txt_b_e @ img_all.T / temp
  sim_i2t_m = jax.lax.stop_gradient(img_m_b_e @ txt_all.T / temp)
  sim_t2i_m = jax.lax.stop_gradient(txt_m_b_e @ img_all.T / temp)
  if targets_b_n is None:
    targets_b_n = jax.nn.one_hot(jnp.arange(img_b_e.shape[0]), img_all.shape[0])
  target_i2t = alpha * jax.nn.softmax(sim_i2t_m, -1) + (1 - alpha) * targets_b_n
  target_t2i = alpha * jax.nn.softmax(sim_t2i_m, -1) + (1 - alpha) * targets_b_n
  loss = 0.5 * (soft_cross_entropy(sim_i2t, target_i2t).mean()
                + soft_cross_entropy(sim_t2i, target_t2i).mean())
  return loss, sim_i2t, sim_t2i


def enqueue(queue_q_e, feats_b_e, ptr):
  """Overwrites rows [ptr, ptr+B) with the batch; returns (queue, next ptr).

  Q must be a multiple of B (checked by the caller's config), so no wrap-around.
  """
  b = feats_b_e.shape[0]
  queue = jax.lax.dynamic_update_slice(queue_q_e, feats_b_e.astype(queue_q_e.dtype), (ptr, 0))
  return queue, (ptr + b) % queue_q_e.shape[0]


# --------------------------------------------------------------------------- ITM
def sample_hard_negatives(rng, sim_i2t_b_b, sim_t2i_b_b, shards: int = 1,
                          random_fraction: float = 0.0):
  """One negative text per image and one negative image per text (spec §2.2).

  Drawn from the softmax of the in-batch similarities with the diagonal excluded.
  `random_fraction` (0 = official): each row's negative is instead drawn uniformly among
  the other rows with this probability (1: all random negatives).
  `shards` > 1: the batch is that many contiguous blocks (the data-parallel shards of the
  global batch) and a row's negative is drawn only within its own block, as the official
  code draws them per GPU; the blocks are taken from the (shards, per_shard, shards,
  per_shard) view, so this runs under jit on a sharded batch. 1: the whole batch.
  Returns (neg_text_for_image (B,), neg_image_for_text (B,)) indices into the batch.
  """
  b = sim_i2t_b_b.shape[0]
  if b % shards:
    raise ValueError(f"ITM negatives: batch {b} does not split into {shards} shards")
  p = b // shards
  if shards > 1 and p < 2:
    raise ValueError(f"ITM negatives per shard need at least 2 rows per shard, got {p} "
                     f"(batch {b}, {shards} shards); use itm.negatives_from='global'")
  rng_t, rng_i = jax.random.split(rng)
  sims = jax.lax.stop_gradient((sim_i2t_b_b.astype(jnp.float32), sim_t2i_b_b.astype(jnp.float32)))
  if not 0.0 <= random_fraction <= 1.0:
    raise ValueError(f"ITM random_fraction {random_fraction} must lie in [0, 1]")
  if random_fraction > 0:   # equal logits on a row: uniform over its candidates
    coins = [jax.random.bernoulli(jax.random.fold_in(rng, i), random_fraction, (b, 1))
             for i in (2, 3)]
    sims = tuple(jnp.where(c, 0.0, s) for c, s in zip(coins, sims))
  if shards == 1:
    off_diag = jnp.where(jnp.eye(b, dtype=bool), -jnp.inf, 0.0)
    neg_text = jax.random.categorical(rng_t, sims[0] + off_diag, axis=-1)
    neg_image = jax.random.categorical(rng_i, sims[1] + off_diag, axis=-1)
    return neg_text, neg_image
  shard = jnp.arange(shards)
  off_diag = jnp.where(jnp.eye(p, dtype=bool), -jnp.inf, 0.0)

  def draw(key, sim_b_b):
    blocks_s_p_p = sim_b_b.reshape(shards, p, shards, p)[shard, :, shard, :]
    local_s_p = jax.random.categorical(key, blocks_s_p_p + off_diag, axis=-1)
    return (local_s_p + p * shard[:, None]).reshape(b)
  return draw(rng_t, sims[0]), draw(rng_i, sims[1])


def itm_loss(logits_3b_2):
  """Cross-entropy with labels [1]*B (positives) + [0]*2B (hard negatives)."""
  b = logits_3b_2.shape[0] // 3
  labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
  logits = logits_3b_2.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, accuracy


# --------------------------------------------------------------------------- MLM / MIM
def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(mask.sum(), 1.0)


def mlm_loss(logits_b_l_v, logits_m_b_l_v, labels_b_l, alpha, distill_over_sequence=False):
  """(1-α)·CE on masked tokens + α·distillation from the momentum model's softmax.

  `distill_over_sequence=True` reproduces the official code's bug (log_softmax over
  the sequence axis instead of the vocabulary, salesforce/ALBEF#58).
  """
  masked = labels_b_l != IGNORE
  logits = logits_b_l_v.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(masked, labels_b_l, 0))
  soft = jax.nn.softmax(jax.lax.stop_gradient(logits_m_b_l_v).astype(jnp.float32), -1)
  log_p = jax.nn.log_softmax(logits, axis=1 if distill_over_sequence else -1)
  distill = -jnp.sum(log_p * soft, -1)
  loss = (1 - alpha) * _masked_mean(ce, masked) + alpha * _masked_mean(distill, masked)
  accuracy = _masked_mean(jnp.argmax(logits, -1) == labels_b_l, masked)
  return loss, accuracy


def masked_positions(labels_b_l, group_rows: int, capacity: int):
  """Where MLM needs logits: per group of `group_rows` rows, up to `capacity` positions.

  Returns (index (G, K) into the group's flattened (group_rows * L) positions, masked
  ones first in order; labels (G, K) at them, IGNORE on the padding; fits () bool: every
  group has at most K masked positions, so the masked mean over them is the full one).
  """
  b, l = labels_b_l.shape
  if b % group_rows:
    raise ValueError(f"mlm_capacity.group_rows {group_rows} must divide the batch {b}")
  labels_g_n = labels_b_l.reshape(b // group_rows, group_rows * l)
  masked = labels_g_n != IGNORE
  index = jnp.argsort(~masked, axis=-1, stable=True)[:, :capacity]
  labels = jnp.take_along_axis(labels_g_n, index, axis=-1)
  valid = jnp.arange(index.shape[-1])[None] < masked.sum(-1, keepdims=True)
  return index, jnp.where(valid, labels, IGNORE), jnp.all(masked.sum(-1) <= capacity)


def gather_positions(seq_b_l_d, index_g_k, group_rows: int):
  """(B, L, D) -> (G, K, D): the rows of `masked_positions`' index."""
  b, l, d = seq_b_l_d.shape
  flat = seq_b_l_d.reshape(b // group_rows, group_rows * l, d)
  return jnp.take_along_axis(flat, index_g_k[..., None], axis=1)


def mim_loss(logits_b_n_k, logits_m_b_n_k, targets_b_n, patch_mask_b_n, alpha):
  """(1-α)·CE against the visual tokens + α·distillation, on masked patches only."""
  logits = logits_b_n_k.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_b_n)
  distill = soft_cross_entropy(logits, jax.nn.softmax(
      jax.lax.stop_gradient(logits_m_b_n_k).astype(jnp.float32), -1))
  loss = (1 - alpha) * _masked_mean(ce, patch_mask_b_n) + alpha * _masked_mean(distill, patch_mask_b_n)
  accuracy = _masked_mean(jnp.argmax(logits, -1) == targets_b_n, patch_mask_b_n)
  return loss, accuracy


# --------------------------------------------------------------------------- PSL
def psl_keywords(cls_attn_b_h_l, ids_b_l, vocab_size: int, per_head: int, n_keywords: int,
                 cls_id: int):
  """Multi-hot keyword targets from the CLS row of a self-attention map (spec §2.4).

  Each head votes for its `per_head` most attended positions; the `n_keywords`
  positions with most votes give the keywords. As in the official code, the
  [CLS] column of the multi-hot is zeroed afterwards.

  Ties: the official `torch.topk` over the vote counts leaves their order unspecified.
  Here, at equal votes a position holding [CLS] ranks after every other position (its
  keyword would be zeroed, so picking it wastes a slot), then lower positions first.
  This is one of the selections the official rule can return, and never one that loses a
  keyword to [CLS] while a position with as many votes is left out.
  Returns (B, V) float32.
  """
  l = cls_attn_b_h_l.shape[-1]
  _, top_b_h_k = jax.lax.top_k(jax.lax.stop_gradient(cls_attn_b_h_l), per_head)
  votes_b_l = jax.nn.one_hot(top_b_h_k, l).sum(axis=(1, 2))
  # Votes are integers: -0.5 orders [CLS] last among its ties and above any fewer votes.
  rank_b_l = votes_b_l - 0.5 * (ids_b_l == cls_id)
  _, pos_b_n = jax.lax.top_k(rank_b_l, n_keywords)
  words_b_n = jnp.take_along_axis(ids_b_l, pos_b_n, axis=1)
  hot_b_v = jax.nn.one_hot(words_b_n, vocab_size).max(axis=1)
  return hot_b_v.at[:, cls_id].set(0.0)


def psl_loss(concept_logits_b_v, concept_logits_m_b_v, keywords_b_v, alpha):
  """(1-α)·BCE to the selected keywords + α·BCE to the momentum model's sigmoid."""
  logits = concept_logits_b_v.astype(jnp.float32)
  soft = jax.nn.sigmoid(jax.lax.stop_gradient(concept_logits_m_b_v).astype(jnp.float32))
  hard = optax.sigmoid_binary_cross_entropy(logits, keywords_b_v).mean()
  distill = optax.sigmoid_binary_cross_entropy(logits, soft).mean()
  return (1 - alpha) * hard + alpha * distill
