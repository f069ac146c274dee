"""IJB 1:1 templates: media pooling and scores by hand, the protocol vs a loop, TAR@FAR vs brute force."""

import os

import numpy as np
import pytest
from PIL import Image

from face_jax import ijb


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _hand_protocol(tmp_path, scores=(1, 1, 1, 1, 1, 1, 1)):
  """T1: media 10 = {a, b}, media 11 = {c}; T2: one image; T3: media 20 = {e}, 21 = {f, g}."""
  _write(tmp_path / "ijbx_face_tid_mid.txt",
         ["a.jpg 1 10", "b.jpg 1 10", "c.jpg 1 11", "d.jpg 2 12", "e.jpg 3 20", "f.jpg 3 21",
          "g.jpg 3 21"])
  _write(tmp_path / "ijbx_template_pair_label.txt", ["1 2 0", "1 3 1", "2 3 0"])
  lmk = " ".join(["1.0"] * 10)
  _write(tmp_path / "ijbx_name_5pts_score.txt",
         [f"{n}.jpg {lmk} {s}" for n, s in zip("abcdefg", scores)])
  feats = np.array([[1, 0], [3, 0], [0, 2], [0, -5], [1, 1], [1, -1], [3, -3]], np.float64)
  return ijb.load_meta(str(tmp_path), "IJBX"), feats


def test_template_pooling_and_scores_by_hand(tmp_path):
  meta, feats = _hand_protocol(tmp_path)
  ids, tfeats = ijb.template_features(feats, meta.templates, meta.medias)
  # T1: mean(a, b) = (2, 0), plus c = (0, 2) -> (2, 2); T2: (0, -5); T3: (1, 1) + mean(f, g) = (3, -1).
  want = np.array([[1, 1] / np.sqrt(2), [0, -1], [3, -1] / np.sqrt(10)])
  np.testing.assert_array_equal(ids, [1, 2, 3])
  np.testing.assert_allclose(tfeats, want, atol=1e-12)
  out = ijb.evaluate(meta, feats, use_face_scores=False, fars=(0.0, 0.5))
  np.testing.assert_allclose(out["scores"], [-1 / np.sqrt(2), 2 / np.sqrt(20), 1 / np.sqrt(10)])
  # Impostors -0.707, 0.316; the genuine 0.447 beats both, so TAR = 1 at FAR 0 and 0.5.
  assert out["tar@far=0"] == out["tar@far=0.5"] == 1.0
  assert (out["genuine_pairs"], out["impostor_pairs"]) == (1, 2)


def test_flip_and_detector_scores_weigh_images_before_pooling(tmp_path):
  meta, feats = _hand_protocol(tmp_path, scores=(1, 0.5, 1, 1, 1, 1, 1))
  flips = np.zeros_like(feats)
  flips[2] = [0, 1]                     # c + flip(c) = (0, 3)
  out = ijb.evaluate(meta, feats, flips, use_face_scores=True)
  # T1: mean(a, 0.5 b) = (1.25, 0), plus (0, 3) -> (1.25, 3); T2 = (0, -1).
  t1 = np.array([1.25, 3.0]) / np.hypot(1.25, 3.0)
  assert out["scores"][0] == pytest.approx(-t1[1])
  assert out["scores"][1] == pytest.approx(t1 @ np.array([3, -1]) / np.sqrt(10))
  normed = ijb.image_features(feats, normalize=True)
  np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0)


def _loop_protocol(meta, feats, flips):
  """The procedure written plainly: per template, per media, mean; sum; normalise; cosine."""
  x = (feats + flips) * meta.face_scores[:, None]
  tfeat = {}
  for t in sorted(set(meta.templates.tolist())):
    media = {}
    for k in np.flatnonzero(meta.templates == t):
      media.setdefault(int(meta.medias[k]), []).append(x[k])
    v = sum(np.mean(rows, axis=0) for rows in media.values())
    tfeat[t] = v / np.linalg.norm(v)
  return np.array([tfeat[a] @ tfeat[b] for a, b in zip(meta.pair_t1, meta.pair_t2)])


def test_synthetic_protocol_matches_a_loop(tmp_path):
  meta, feats, flips = ijb.write_synthetic(str(tmp_path), seed=3)
  sizes = np.bincount(meta.templates)[np.unique(meta.templates)]
  media_per_template = [len(np.unique(meta.medias[meta.templates == t]))
                        for t in np.unique(meta.templates)]
  assert (sizes == 1).any() and max(media_per_template) > 1 and sizes.max() > max(media_per_template)
  out = ijb.evaluate(meta, feats, flips, fars=(1e-3, 1e-2, 0.1))
  np.testing.assert_allclose(out["scores"], _loop_protocol(meta, feats, flips), atol=1e-12)
  for far in (1e-3, 1e-2, 0.1):
    assert out[f"tar@far={far:g}"] == _brute_force_exact(out["scores"], meta.pair_label, far)
  assert out["tar@far=0.1"] > 0.5       # subject codes dominate the noise
  assert out["genuine_pairs"] > 0 and out["impostor_pairs"] > 10 * out["genuine_pairs"]


def _brute_force_exact(scores, labels, far):
  """Best TAR over every threshold t (accept > t) whose false accept rate is <= far."""
  imp, gen = scores[~labels], scores[labels]
  best = 0.0
  for t in np.r_[scores, -np.inf, np.inf]:
    if np.mean(imp > t) <= far:
      best = max(best, np.mean(gen > t))
  return best


def _brute_force_nearest(scores, labels, far):
  """insightface's read-out, point by point: the ROC at every distinct score t (accept
  >= t) without its straight-line interior points (sklearn's drop_intermediate), from
  (0, 0); among the FPRs nearest to far, the largest TPR."""
  imp, gen = scores[~labels], scores[labels]
  counts = [(np.sum(imp >= t), np.sum(gen >= t)) for t in sorted(set(scores), reverse=True)]
  kept = [counts[0]]
  for i in range(1, len(counts) - 1):
    (f0, t0), (f1, t1), (f2, t2) = counts[i - 1], counts[i], counts[i + 1]
    if f2 - f1 != f1 - f0 or t2 - t1 != t1 - t0:
      kept.append(counts[i])
  kept.append(counts[-1])
  pts = [(0.0, 0.0)] + [(f / len(imp), t / len(gen)) for f, t in kept]
  gap = min(abs(f - far) for f, _ in pts)
  return max(tp for f, tp in pts if abs(f - far) == gap)


def test_tar_at_far_vs_brute_force_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.random(600) < 0.2
  scores = np.round(rng.normal(size=600) + 1.5 * labels, 1)   # many ties
  fars = (0.0, 1e-3, 0.01, 0.05, 0.2, 1.0)
  exact = ijb.tar_at_far(scores, labels, fars)
  nearest = ijb.tar_at_far(scores, labels, fars, method="nearest")
  for far in fars:
    assert exact[f"tar@far={far:g}"] == pytest.approx(_brute_force_exact(scores, labels, far))
    assert nearest[f"tar@far={far:g}"] == pytest.approx(_brute_force_nearest(scores, labels, far))
  assert exact["tar@far=0.2"] > exact["tar@far=0.01"]
  with pytest.raises(ValueError, match="needs both"):
    ijb.tar_at_far(scores[labels], labels[labels])


@pytest.mark.parametrize("name,line,match", [
    ("ijbx_face_tid_mid.txt", "b.jpg 1", r"ijbx_face_tid_mid.txt:2: expected 3 fields"),
    ("ijbx_face_tid_mid.txt", "b.jpg one 10", r"ijbx_face_tid_mid.txt:2: field 2 'one' is not an integer"),
    ("ijbx_template_pair_label.txt", "1 3 2", r"ijbx_template_pair_label.txt:2: label 2"),
    ("ijbx_template_pair_label.txt", "1 9 1", r"ijbx_template_pair_label.txt:2: template 9"),
    ("ijbx_name_5pts_score.txt", "b.jpg 1 2 3 4 5 6 7 8 9 10 x", r"5pts_score.txt:2: field 12 'x'"),
    ("ijbx_name_5pts_score.txt", "z.jpg 1 2 3 4 5 6 7 8 9 10 1", r"5pts_score.txt:2: image 'z.jpg'"),
])
def test_malformed_meta_lines_name_file_and_line(tmp_path, name, line, match):
  _hand_protocol(tmp_path)
  path = tmp_path / name
  lines = path.read_text().splitlines()
  lines[1] = line
  _write(path, lines)
  with pytest.raises(ValueError, match=match):
    ijb.load_meta(str(tmp_path), "IJBX")


def test_align_face_undoes_a_similarity_transform():
  angle, scale, shift = 0.3, 1.7, np.array([20.0, 35.0])
  rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  landmarks = ijb.ARCFACE_LANDMARKS @ rot.T + shift
  m = ijb.similarity_transform(landmarks, ijb.ARCFACE_LANDMARKS)
  np.testing.assert_allclose(m[:, :2] @ landmarks.T + m[:, 2:], ijb.ARCFACE_LANDMARKS.T, atol=1e-9)
  # A smooth face-sized image, warped by the transform: aligning it gives it back.
  yy, xx = np.mgrid[:112, :112]
  face = np.stack([128 + 100 * np.sin(xx / 9.0), 128 + 100 * np.cos(yy / 11.0),
                   128 + 60 * np.sin((xx + yy) / 13.0)], -1).astype(np.uint8)
  fwd = np.linalg.inv(np.r_[np.c_[rot, shift], [[0, 0, 1]]])[:2]
  loose = np.asarray(Image.fromarray(face).transform((260, 260), Image.Transform.AFFINE,
                                                     tuple(fwd.ravel()), resample=Image.Resampling.BILINEAR))
  aligned = ijb.align_face(loose, landmarks)
  inner = (slice(10, 102), slice(10, 102))
  assert np.mean(np.abs(aligned[inner].astype(float) - face[inner])) < 4.0


def test_embed_protocol_reads_aligns_and_flips(tmp_path):
  meta, _, _ = ijb.write_synthetic(str(tmp_path / "meta"), subjects=2, seed=1)
  os.makedirs(tmp_path / "img")
  rng = np.random.default_rng(0)
  for name in meta.names:
    Image.fromarray(rng.integers(0, 255, (150, 150, 3), np.uint8)).save(tmp_path / "img" / name)
  calls = []

  def embed(x):
    calls.append(x.shape)
    return np.stack([x[..., 0].mean((1, 2)), x[:, :, :56].mean((1, 2, 3))], 1)

  feats, flips = ijb.embed_protocol(embed, str(tmp_path / "img"), meta, batch_size=8)
  assert feats.shape == flips.shape == (len(meta.names), 2)
  assert set(calls) == {(8, 112, 112, 3)}
  np.testing.assert_allclose(feats[:, 0], flips[:, 0])     # channel mean: flip invariant
  assert not np.allclose(feats[:, 1], flips[:, 1])         # left half: not
  os.remove(tmp_path / "img" / meta.names[-1])
  with pytest.raises(ValueError, match=f"{meta.names[-1]}: image {len(meta.names) - 1}"):
    ijb.embed_protocol(embed, str(tmp_path / "img"), meta, batch_size=8)


def test_cli_reads_insightface_concatenated_features(tmp_path, capsys):
  meta, feats, flips = ijb.write_synthetic(str(tmp_path), target="ijbb", seed=2)
  np.save(tmp_path / "feats.npy", np.concatenate([feats, flips], 1))
  summary = ijb.main(["--meta_dir", str(tmp_path), "--target", "IJBB", "--features",
                      str(tmp_path / "feats.npy"), "--concat_flip"])
  want = ijb.evaluate(meta, feats, flips)
  assert summary["tar@far=0.01"] == want["tar@far=0.01"]
  assert '"tar@far=0.0001"' in capsys.readouterr().out


def test_integer_files_convert_in_chunks_and_name_the_bad_line(tmp_path):
  path = tmp_path / "pairs.txt"
  rows = [f"{k} {k + 1} {k % 2}" for k in range(7)]
  _write(path, rows)
  t1, t2, label = ijb._parse_columns(str(path), "iii", chunk=2)
  np.testing.assert_array_equal(t1, np.arange(7))
  np.testing.assert_array_equal(label, np.arange(7) % 2)
  rows[5] = "5 6 1.5"
  _write(path, rows)
  with pytest.raises(ValueError, match=r"pairs.txt:6: field 3 '1.5' is not an integer"):
    ijb._parse_columns(str(path), "iii", chunk=2)
  rows[5] = "5 6"
  _write(path, rows)
  with pytest.raises(ValueError, match=r"pairs.txt:6: expected 3 fields, got 2"):
    ijb._parse_columns(str(path), "iii", chunk=4)


def test_pair_with_a_template_without_features_is_named():
  feats = np.eye(3)
  ids, tfeats = ijb.template_features(feats, np.array([2, 5, 9]), np.array([1, 2, 3]))
  np.testing.assert_allclose(ijb.pair_scores(ids, tfeats, np.array([2, 5]), np.array([9, 5])), [0, 1])
  with pytest.raises(ValueError, match="pair 1 names template 7"):
    ijb.pair_scores(ids, tfeats, np.array([2, 7]), np.array([9, 5]))
  with pytest.raises(ValueError, match="pair 0 names template 10"):
    ijb.pair_scores(ids, tfeats, np.array([10]), np.array([9]))


def test_nearest_reads_sklearns_roc_without_collinear_points():
  # Counts (FP, TP) down the thresholds: (1, 1), (2, 2), (3, 3), (10, 3), (10, 4); the
  # middle of the diagonal run, FPR 0.2, is not on sklearn's ROC, so FAR 0.2 reads FPR 0.3.
  scores = np.array([0.9, 0.8, 0.7, 0.05] + [0.9, 0.8, 0.7] + [0.1] * 7)
  labels = np.array([True] * 4 + [False] * 10)
  fpr, tpr = ijb.roc(scores, labels)
  np.testing.assert_allclose(fpr, [0, 0.1, 0.3, 1.0, 1.0])
  np.testing.assert_allclose(tpr, [0, 0.25, 0.75, 0.75, 1.0])
  assert ijb.tar_at_far(scores, labels, (0.2,), method="nearest")["tar@far=0.2"] == 0.75
  assert _brute_force_nearest(scores, labels, 0.2) == 0.75
  assert ijb.tar_at_far(scores, labels, (0.2,))["tar@far=0.2"] == 0.5   # exact: 2 impostors pass
