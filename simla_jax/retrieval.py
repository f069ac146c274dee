"""Image-text retrieval: ITC candidates re-ranked by the ITM head; minimal pairs.

As the official `evaluation()`: ITC similarities for all pairs; for each image the
top `k_test` texts (and for each text the top `k_test` images) are re-scored by the
ITM match logit; every other pair scores -100. TR/IR R@1/5/10 follow `itm_eval`
(for TR, the rank of the best of the image's ground-truth captions).

Minimal pairs (shapes world, `shapes.minimal_pair`): each image with its true object
list and a foil that swaps one colour or shape; the model is right when it scores the
truth above the foil, by the ITM match logit and by the ITC similarity (chance 50 %).
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simla_jax.data import pipeline
from simla_jax.data import shapes
from simla_jax.data.tokenizer import pre_caption
from simla_jax.models import SIMLA
from train_jax.sharding import to_host

FLOOR = -100.0


def recall_at_k(score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt: Sequence[np.ndarray],
                txt2img: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """Percent recall of text (TR) and image (IR) retrieval from score matrices.

  score_i2t: (N_img, N_txt); score_t2i: (N_txt, N_img); img2txt[i]: caption indices
  of image i; txt2img[t]: image of caption t.
  """
  order_i2t = np.argsort(-score_i2t, axis=1, kind="stable")
  tr_rank = np.array([np.min(np.nonzero(np.isin(order_i2t[i], img2txt[i]))[0])
                      for i in range(len(img2txt))])
  order_t2i = np.argsort(-score_t2i, axis=1, kind="stable")
  ir_rank = np.array([np.nonzero(order_t2i[t] == txt2img[t])[0][0] for t in range(len(txt2img))])
  out = {}
  for k in ks:
    out[f"tr_r{k}"] = 100.0 * np.mean(tr_rank < k)
    out[f"ir_r{k}"] = 100.0 * np.mean(ir_rank < k)
  out["r_mean"] = float(np.mean(list(out.values())))
  return out


class Evaluator:
  """Retrieval on the splits named in `eval_cfg.splits`, returning {"<split>_<metric>": %}.

  eval_cfg keys: splits (e.g. ("test", "comp")), k_test, batch_size.
  `splits` overrides eval_cfg.splits; `data_cfgs` maps a split to its own data config
  (e.g. a caption JSON per split); `minimal_pairs`: shapes splits scored as 2-way
  choices as well ("<split>_pairs_itm_acc", "<split>_pairs_itc_acc").
  """

  def __init__(self, model: SIMLA, eval_cfg: Any, data_cfg: Any, tokenizer,
               splits: Sequence[str] | None = None, data_cfgs: dict[str, Any] | None = None,
               minimal_pairs: Sequence[str] = ()):
    self.model = model
    self.k = int(eval_cfg.k_test)
    self.batch_size = int(eval_cfg.batch_size)
    data_cfgs = data_cfgs or {}
    self.data = {s: pipeline.make_eval_data(data_cfgs.get(s, data_cfg), s, tokenizer)
                 for s in (eval_cfg.splits if splits is None else splits)}
    unknown = [s for s in minimal_pairs if s not in self.data]
    if unknown:
      raise ValueError(f"eval: minimal_pairs splits {unknown} are not evaluated splits "
                       f"{sorted(self.data)}")
    self.pairs = {s: MinimalPairs(self.data[s], tokenizer, int(data_cfg.tokenizer.max_words))
                  for s in minimal_pairs}
    apply = lambda p, *a, method: model.apply({"params": p}, *a, method=method)

    @jax.jit
    def encode_images(params, images):
      seq = apply(params, images, method=SIMLA.embed_image)
      return seq, apply(params, seq, method=SIMLA.image_feature)

    @jax.jit
    def encode_texts(params, ids, mask):
      return apply(params, apply(params, ids, mask, method=SIMLA.embed_text),
                   method=SIMLA.text_feature)

    @jax.jit
    def match_logit(params, ids, mask, image_seq):
      fused = apply(params, ids, mask, image_seq, method=SIMLA.fuse)
      return apply(params, fused, method=SIMLA.itm_logits)[:, 1]

    self._encode_images, self._encode_texts, self._match = encode_images, encode_texts, match_logit

  def embed(self, params, data):
    """(image_seq (N, 1+P, D), image_feat (N, E), text_feat (M, E)) as numpy."""
    seqs, img_feats, txt_feats = [], [], []
    for b in data.image_batches(self.batch_size):
      # to_host: under FSDP over several processes the outputs span other hosts' devices.
      seq, feat = to_host(self._encode_images(params, b["image"]))
      seqs.append(seq[b["valid"]])
      img_feats.append(feat[b["valid"]])
    for b in data.text_batches(self.batch_size):
      feat = to_host(self._encode_texts(params, b["text_ids"], b["text_mask"]))
      txt_feats.append(feat[b["valid"]])
    return np.concatenate(seqs), np.concatenate(img_feats), np.concatenate(txt_feats)

  def _itm_scores(self, params, pairs: np.ndarray, data, image_seq) -> np.ndarray:
    """ITM match logits of (image, text) index pairs (P, 2), in fixed-size batches."""
    out = np.empty(len(pairs), np.float32)
    bs = self.batch_size
    for start in range(0, len(pairs), bs):
      chunk = pairs[start:start + bs]
      pad = np.concatenate([chunk, np.repeat(chunk[-1:], bs - len(chunk), 0)])
      logits = self._match(params, data.text_ids[pad[:, 1]], data.text_mask[pad[:, 1]],
                           image_seq[pad[:, 0]])
      out[start:start + len(chunk)] = to_host(logits)[:len(chunk)]
    return out

  def scores(self, params, data):
    """(ITC sims (N, M), score_i2t (N, M), score_t2i (M, N)) for one split."""
    image_seq, img, txt = self.embed(params, data)
    sims = img @ txt.T
    k_t, k_i = min(self.k, sims.shape[1]), min(self.k, sims.shape[0])
    top_t = np.argsort(-sims, axis=1)[:, :k_t]                       # (N, k) texts per image
    top_i = np.argsort(-sims.T, axis=1)[:, :k_i]                     # (M, k) images per text
    pairs_i2t = np.stack([np.repeat(np.arange(len(img)), k_t), top_t.ravel()], 1)
    pairs_t2i = np.stack([top_i.ravel(), np.repeat(np.arange(len(txt)), k_i)], 1)
    score_i2t = np.full(sims.shape, FLOOR, np.float32)
    score_t2i = np.full(sims.T.shape, FLOOR, np.float32)
    score_i2t[pairs_i2t[:, 0], pairs_i2t[:, 1]] = self._itm_scores(params, pairs_i2t, data, image_seq)
    score_t2i[pairs_t2i[:, 1], pairs_t2i[:, 0]] = self._itm_scores(params, pairs_t2i, data, image_seq)
    return sims, score_i2t, score_t2i

  def minimal_pair_accuracy(self, params, pairs: "MinimalPairs") -> dict[str, float]:
    """Percent of images whose true caption beats its foil, by ITM and by ITC."""
    n, bs = len(pairs.index), self.batch_size
    itm = {"caption": [], "foil": []}
    itc = {"caption": [], "foil": []}
    for start in range(0, n, bs):
      keep = min(bs, n - start)
      images = np.stack([pairs.data.image(int(i)) for i in _padded(pairs.index, start, bs)])
      image_seq, img = self._encode_images(params, images)
      for name, (ids, mask) in (("caption", pairs.caption), ("foil", pairs.foil)):
        ids_b, mask_b = _padded(ids, start, bs), _padded(mask, start, bs)
        txt = self._encode_texts(params, ids_b, mask_b)
        itc[name].append(np.sum(to_host(img) * to_host(txt), -1)[:keep])
        itm[name].append(to_host(self._match(params, ids_b, mask_b, image_seq))[:keep])
    wins = lambda s: 100.0 * float(np.mean(np.concatenate(s["caption"]) >
                                           np.concatenate(s["foil"])))
    return {"itm_acc": wins(itm), "itc_acc": wins(itc)}

  def __call__(self, params, splits: Sequence[str] | None = None) -> dict[str, float]:
    """Scores of `splits` (default: every split this evaluator holds)."""
    out = {}
    for split in (self.data if splits is None else splits):
      data = self.data[split]
      if split in self.pairs:
        for name, value in self.minimal_pair_accuracy(params, self.pairs[split]).items():
          out[f"{split}_pairs_{name}"] = value
      sims, score_i2t, score_t2i = self.scores(params, data)
      for name, value in recall_at_k(score_i2t, score_t2i, data.img2txt, data.txt2img).items():
        out[f"{split}_{name}"] = value
      for name, value in recall_at_k(sims, sims.T, data.img2txt, data.txt2img, ks=(1,)).items():
        if name != "r_mean":
          out[f"{split}_itc_{name}"] = value
    return out


def _padded(rows: np.ndarray, start: int, size: int) -> np.ndarray:
  """rows[start:start+size], the last row repeated to `size` rows (fixed jit shapes)."""
  chunk = rows[start:start + size]
  return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), 0)])


class MinimalPairs:
  """Every image of a shapes split with its true object list and a one-word foil."""

  def __init__(self, data: pipeline.EvalData, tokenizer, max_words: int = 30):
    if not isinstance(data.source, shapes.ShapesSource):
      raise ValueError("eval.minimal_pairs needs shapes-world splits")
    self.data = data
    self.index = np.arange(data.num_images)
    pairs = [shapes.minimal_pair(data.source[int(i)], data.source.seed) for i in self.index]
    self.caption = tokenizer([pre_caption(p["caption"], max_words) for p in pairs])
    self.foil = tokenizer([pre_caption(p["foil"], max_words) for p in pairs])
    self.pairs = pairs
