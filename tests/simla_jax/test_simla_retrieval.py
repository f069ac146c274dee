"""Retrieval metrics against a brute-force count on random score matrices."""

import numpy as np
import pytest

from simla_jax import retrieval


def _brute_force(score_i2t, score_t2i, img2txt, txt2img, k):
  """Rank = how many candidates score strictly higher (ties have probability 0 here)."""
  tr = [min(int(np.sum(score_i2t[i] > score_i2t[i, t])) for t in img2txt[i])
        for i in range(len(img2txt))]
  ir = [int(np.sum(score_t2i[t] > score_t2i[t, txt2img[t]])) for t in range(len(txt2img))]
  return 100.0 * np.mean(np.array(tr) < k), 100.0 * np.mean(np.array(ir) < k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_equals_brute_force_on_random_scores(seed):
  rng = np.random.default_rng(seed)
  per_image = rng.integers(1, 6, size=40)            # 1-5 captions per image
  txt2img = np.repeat(np.arange(40), per_image)
  img2txt = [np.nonzero(txt2img == i)[0] for i in range(40)]
  score_i2t = rng.standard_normal((40, len(txt2img)))
  score_t2i = rng.standard_normal((len(txt2img), 40))
  r = retrieval.recall_at_k(score_i2t, score_t2i, img2txt, txt2img, ks=(1, 5, 10))
  for k in (1, 5, 10):
    tr, ir = _brute_force(score_i2t, score_t2i, img2txt, txt2img, k)
    assert r[f"tr_r{k}"] == pytest.approx(tr) and r[f"ir_r{k}"] == pytest.approx(ir)
  assert r["r_mean"] == pytest.approx(np.mean([r[f"{d}_r{k}"] for d in ("tr", "ir")
                                               for k in (1, 5, 10)]))
