"""Verification protocol against a direct NumPy computation on constructed embeddings."""

import numpy as np
import pytest

from face_jax import evaluate


def _reference_lfw(emb_a, emb_b, issame, n_folds=10):
  """Direct loops: insightface calculate_roc with an unshuffled KFold written out."""
  a = emb_a / np.linalg.norm(emb_a, axis=1, keepdims=True)
  b = emb_b / np.linalg.norm(emb_b, axis=1, keepdims=True)
  dist = ((a - b) ** 2).sum(1)
  n = len(issame)
  sizes = [n // n_folds + (1 if f < n % n_folds else 0) for f in range(n_folds)]
  thresholds = [i / 100 for i in range(400)]
  accs, ths, start = [], [], 0
  for size in sizes:
    test = list(range(start, start + size))
    train = [i for i in range(n) if i < start or i >= start + size]
    start += size
    best_t, best_acc = None, -1.0
    for t in thresholds:
      correct = sum((dist[i] < t) == issame[i] for i in train)
      if correct / len(train) > best_acc:  # first maximum, as np.argmax
        best_acc, best_t = correct / len(train), t
    ths.append(best_t)
    accs.append(sum((dist[i] < best_t) == issame[i] for i in test) / len(test))
  return np.mean(accs), np.std(accs), np.mean(ths)


def _constructed(n, d, noise, seed):
  rng = np.random.default_rng(seed)
  issame = rng.random(n) < 0.5
  a = rng.normal(size=(n, d))
  b = np.where(issame[:, None], a + noise * rng.normal(size=(n, d)), rng.normal(size=(n, d)))
  return a, b, issame


@pytest.mark.parametrize("n, noise", [(203, 0.9), (120, 1.5)])
def test_lfw_protocol_matches_direct_computation(n, noise):
  a, b, issame = _constructed(n, 6, noise, seed=n)
  got = evaluate.verification(a, b, issame)
  mean, std, thr = _reference_lfw(a, b, issame)
  assert 0.55 < got["accuracy"] < 0.99      # neither trivial nor chance
  np.testing.assert_allclose([got["accuracy"], got["accuracy_std"], got["threshold"]],
                             [mean, std, thr], rtol=1e-12, atol=1e-12)


def test_separable_pairs_give_100_percent():
  a, b, issame = _constructed(100, 8, 0.01, seed=3)
  r = evaluate.verification(a, b, issame)
  assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
  assert r["tar@far=0.001"] == 1.0


def test_folds_are_contiguous_like_kfold():
  folds = evaluate.fold_slices(23, 10)
  assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
  assert np.array_equal(np.concatenate(folds), np.arange(23))
  with pytest.raises(ValueError, match="folds"):
    evaluate.fold_slices(5, 10)


def test_tar_at_far_on_constructed_distances():
  impostor = np.arange(100) / 100 + 1.0        # 1.00 .. 1.99
  genuine = np.array([0.5, 0.9, 1.005, 1.015, 1.5, 3.0])
  dist = np.concatenate([genuine, impostor])
  issame = np.concatenate([np.ones(6, bool), np.zeros(100, bool)])
  # FAR 0.01: at most 1 impostor accepted -> threshold 1.01 (accept < 1.01): 3 genuine.
  tar, thr = evaluate.tar_at_far(dist, issame, 0.01)
  assert thr == pytest.approx(1.01) and tar == pytest.approx(3 / 6)
  tar, thr = evaluate.tar_at_far(dist, issame, 0.0)
  assert thr == pytest.approx(1.0) and tar == pytest.approx(2 / 6)
  far, tar_curve = evaluate.roc_curve(dist, issame)
  assert far[0] == 0 and far[-1] == 1 and tar_curve[-1] == 1 and np.all(np.diff(far) >= 0)


def test_summary_worst_group_and_gap():
  results = {"group0": {"accuracy": 0.95, "tar@far=0.001": 0.8}, "group1": {"accuracy": 0.81},
             "group2": {"accuracy": 0.88}, "pose": {"accuracy": 0.7}}
  s = evaluate.summarize(results, ["group0", "group1", "group2"])
  assert s["acc_worst_group"] == 0.81 and s["group_gap"] == pytest.approx(0.14)
  assert s["acc_pose"] == 0.7 and s["tar@far=0.001_group0"] == 0.8
  assert s["acc_group_mean"] == pytest.approx((0.95 + 0.81 + 0.88) / 3)


def test_embed_images_flip_sum_and_padding():
  calls = []

  def embed(x):
    calls.append(len(x))
    return np.stack([x[:, :, :1].sum((1, 2, 3)), x[:, :, -1:].sum((1, 2, 3)) * 2], axis=1)

  images = np.random.default_rng(0).random((7, 4, 5, 1))
  got = evaluate.embed_images(embed, images, batch_size=3, flip=True)
  assert calls == [3] * 6                               # fixed batch size, padded
  left, right = images[:, :, 0, 0].sum(1), images[:, :, -1, 0].sum(1)
  want = np.stack([left + right, 2 * right + 2 * left], 1)   # f(x) + f(flip x)
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-12)
