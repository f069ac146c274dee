"""Synthetic biased faces: determinism, split disjointness, group mix, pairs, sampling."""

import numpy as np
import pytest

from configs import mvcom as mvcom_config
from face_jax.data import sampling, synthetic, variations


def _cfg(**kw):
  c = mvcom_config.get_config().data
  c.update({**dict(num_train_ids=100, group_fractions=(0.8, 0.15, 0.05), meta_ids_per_group=4,
                   meta_images_per_id=3, test_ids_per_group=6, test_images_per_id=6,
                   pairs_per_cell=40, image_size=16), **kw})
  return c


def test_examples_are_pure_functions_of_seed_split_index():
  a, b = synthetic.SyntheticFaces(_cfg(), 7), synthetic.SyntheticFaces(_cfg(), 7)
  idx = np.array([5, 0, 33, 5])
  for split in ("train", "meta", "test"):
    x, y = a.examples(split, idx), b.examples(split, idx[::-1])
    for k in x:
      np.testing.assert_array_equal(x[k], y[k][::-1])
    single = a.example(split, 33)
    for k in x:                       # batch rendering == one-at-a-time rendering
      np.testing.assert_array_equal(single[k], x[k][2])
    np.testing.assert_array_equal(x["image"][0], x["image"][3])
  other = synthetic.SyntheticFaces(_cfg(), 8).examples("train", idx)
  assert not np.allclose(other["image"], a.examples("train", idx)["image"])
  e = a.examples("train", np.arange(64))
  assert e["image"].shape == (64, 16, 16, 3) and e["image"].dtype == np.float32
  assert set(e) == {"image", "label", "group", "pose", "occlusion", "blur", "class_prior"}


def test_splits_groups_and_identities():
  cfg = _cfg()
  f = synthetic.SyntheticFaces(cfg, 0)
  assert np.bincount(f.train_groups).tolist() == [80, 15, 5]
  train_ids, _ = f.identities("train", np.arange(len(f)))
  assert np.array_equal(np.unique(train_ids), np.arange(100))
  lo, hi = cfg.images_per_id
  assert len(f) == f.train_counts.sum() and f.train_counts.min() >= lo and f.train_counts.max() <= hi
  assert len(set(f.train_counts.tolist())) > 1          # a long tail, not a constant
  # Meta: held-out images of training identities, balanced over groups.
  meta = f.examples("meta", np.arange(f.size("meta")))
  assert set(meta["label"]) <= set(range(100))
  assert np.bincount(meta["group"]).tolist() == [12, 12, 12]
  first = f.examples("train", [int(f.train_starts[meta["label"][0]])])
  assert not np.allclose(first["image"][0], meta["image"][0])   # a different image
  # Test identities are new; their codes differ from every training code.
  test = f.test_set
  assert set(test["label"]).isdisjoint(set(range(100)))
  assert np.bincount(test["group"]).tolist() == [36, 36, 36]
  train_codes = np.stack([f.identity_code(i, f.train_groups[i]) for i in range(100)])
  for i in np.unique(test["label"]):
    code = f.identity_code(i, 0)
    assert np.min(np.abs(train_codes - code).sum(1)) > 1e-3
  # Errors name the config key.
  with pytest.raises(ValueError, match="meta_ids_per_group"):
    synthetic.SyntheticFaces(_cfg(meta_ids_per_group=6), 0)
  with pytest.raises(IndexError):
    f.examples("test", [f.size("test")])


def test_images_per_id_by_group():
  f = synthetic.SyntheticFaces(_cfg(images_per_id_by_group=((8, 10), (2, 3), (2, 2))), 0)
  for g, (lo, hi) in enumerate(((8, 10), (2, 3), (2, 2))):
    counts = f.train_counts[f.train_groups == g]
    assert counts.min() >= lo and counts.max() <= hi, g
  ident, _ = f.identities("train", np.arange(len(f)))
  np.testing.assert_array_equal(np.bincount(ident), f.train_counts)
  with pytest.raises(ValueError, match="images_per_id_by_group"):
    synthetic.SyntheticFaces(_cfg(images_per_id_by_group=((2, 3),)), 0)


def test_latent_codes_are_what_the_renderer_draws():
  cfg = _cfg(pixel_noise=0.0, train_variation_rate=0.0, test_variation_rate=0.0)
  f = synthetic.SyntheticFaces(cfg, 3)
  idx = np.array([0, 7, 40])
  codes = f.latent_codes("test", idx)
  e = f.examples("test", idx)
  for img, code, g in zip(e["image"], codes, e["group"]):
    coef = (f.mixing[g] @ code).reshape(cfg.channels, -1)
    field = np.einsum("ck,kp->pc", coef, f.basis).reshape(img.shape)
    np.testing.assert_allclose(np.tanh(cfg.gain * field) + f.tints[g], img, atol=1e-5)
  same = f.latent_codes("test", [0, 1])                 # one identity, two jitters
  assert not np.allclose(same[0], same[1])


def test_variation_rates_and_attributes():
  f = synthetic.SyntheticFaces(_cfg(train_variation_rate=0.3), 1)
  e = f.examples("train", np.arange(600))
  for v in variations.VARIATIONS:
    assert 0.2 < e[v].mean() < 0.4
  clean = f.examples("train", [int(i) for i in np.flatnonzero(
      (e["pose"] == 0) & (e["occlusion"] == 0) & (e["blur"] == 0))[:1]])
  assert clean["image"].std() > 0.3
  occluded = np.flatnonzero(e["occlusion"] == 1)[0]
  rows = np.all(np.abs(e["image"][occluded]) < 0.3, axis=(1, 2))   # a near-constant band
  assert rows.sum() >= int(0.4 * 16) - 1


def test_variation_ops():
  img = np.random.default_rng(0).normal(size=(8, 10, 2)).astype(np.float32)
  shifted = variations.pose(img, +1, 2, 0.0)
  np.testing.assert_array_equal(shifted[:, 2:], img[:, :-2])
  np.testing.assert_array_equal(shifted[:, 0], img[:, 0])
  ramp = variations.pose(np.zeros_like(img), -1, 0, 0.5)
  np.testing.assert_allclose(ramp[0, [0, -1], 0], [0.5, -0.5])
  np.testing.assert_array_equal(variations.occlusion(img, 2, 3)[2:5], 0)
  blurred = variations.blur(img, 1.0)
  assert blurred.shape == img.shape and blurred.std() < img.std()
  np.testing.assert_allclose(variations.blur(np.ones_like(img), 1.0), 1.0, rtol=1e-6)


def test_pairs_per_cell():
  f = synthetic.SyntheticFaces(_cfg(test_variation_rate=0.4), 0)
  t = f.test_set
  clean = (t["pose"] == 0) & (t["occlusion"] == 0) & (t["blur"] == 0)
  cells = f.test_pairs()
  assert sorted(cells) == ["blur", "clean", "group0", "group1", "group2", "occlusion", "pose"]
  for name, p in cells.items():
    assert len(p.a) == 40 and p.issame.sum() == 20
    assert np.all((t["label"][p.a] == t["label"][p.b]) == p.issame)
    assert np.all(t["group"][p.a] == t["group"][p.b])       # impostors within a group
    assert np.all(p.a != p.b)
    if name.startswith("group"):
      assert np.all(t["group"][p.a] == int(name[-1]))
    elif name != "clean":
      assert np.all(t[name][p.a] == 1) and np.all(clean[p.b])
  again = f.test_pairs()
  assert all(np.array_equal(again[k].a, cells[k].a) for k in cells)


def test_samplers():
  s = sampling.EpochSampler(10, 4, seed=0)
  seq = np.concatenate([s(j) for j in range(5)])            # 20 = two epochs
  assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
  np.testing.assert_array_equal(s(3), sampling.EpochSampler(10, 4, seed=0)(3))
  groups = np.array([0] * 95 + [1] * 4 + [2] * 1)
  g = sampling.GroupBalancedSampler(groups, 300, seed=0)
  counts = np.bincount(groups[g(0)], minlength=3)
  assert all(70 < c < 130 for c in counts)
  assert sampling.process_rows(8, 1, 2) == slice(4, 8)
  with pytest.raises(ValueError):
    sampling.process_rows(9, 0, 2)


def test_group_variation_rates_and_degrees():
  rates = ((0.6, 0.0, 0.1), (0.1, 0.5, 0.0), (0.0, 0.0, 0.9))
  f = synthetic.SyntheticFaces(_cfg(num_train_ids=300, group_fractions=(0.4, 0.3, 0.3),
                                    train_variation_rates=rates, variation_degrees=True,
                                    degree_min=0.3), 1)
  e = f.examples("train", np.arange(1500))
  for g in range(3):
    for k, v in enumerate(variations.VARIATIONS):
      assert abs(e[v][e["group"] == g].mean() - rates[g][k]) < 0.08, (g, v)
  for v in variations.VARIATIONS:
    d = e[f"{v}_degree"]
    assert np.all(d[e[v] == 0] == 0)
    on = d[e[v] == 1]
    assert on.min() >= 0.3 and on.max() <= 1.0 and on.std() > 0.1
  # A degree scales the variation: a weaker blur changes the clean image less.
  img = f.examples("test", [0])["image"][0]
  weak = variations.apply(img, {"pose": False, "occlusion": False, "blur": True},
                          np.random.default_rng(0), f.cfg, {"blur": 0.3})
  strong = variations.apply(img, {"pose": False, "occlusion": False, "blur": True},
                            np.random.default_rng(0), f.cfg, {"blur": 1.0})
  assert 0 < np.abs(weak - img).mean() < np.abs(strong - img).mean()
  with pytest.raises(ValueError, match="train_variation_rates"):
    synthetic.SyntheticFaces(_cfg(train_variation_rates=((0.1, 0.1, 0.1),)), 0)


def test_hard_identities_are_look_alikes_of_their_group():
  base = synthetic.SyntheticFaces(_cfg(), 3)
  hard = synthetic.SyntheticFaces(_cfg(hard_fraction=(0.0, 0.0, 1.0), hard_distance=0.3), 3)
  minority = np.flatnonzero(hard.train_groups == 2)
  codes = np.stack([hard.identity_code(i, 2) for i in minority])
  plain = np.stack([base.identity_code(i, 2) for i in minority])
  # Each look-alike sits near another member's own code: sqrt(1 - d^2) z_partner + d z.
  dist = np.linalg.norm(codes[:, None] - plain[None], axis=-1)
  np.fill_diagonal(dist, np.inf)
  plain_dist = np.linalg.norm(plain[:, None] - plain[None], axis=-1)
  np.fill_diagonal(plain_dist, np.inf)
  assert np.all(dist.min(1) < 0.6 * plain_dist.min(1))
  for i in np.flatnonzero(hard.train_groups == 0)[:5]:       # other groups unchanged
    np.testing.assert_array_equal(hard.identity_code(i, 0), base.identity_code(i, 0))


def test_heldout_meta_identities_and_stratified_batches():
  cfg = _cfg(meta_identities="heldout", meta_ids_per_group=4, meta_images_per_id=3)
  f = synthetic.SyntheticFaces(cfg, 0)
  meta = f.examples("meta", np.arange(f.size("meta")))
  assert np.bincount(meta["group"]).tolist() == [12, 12, 12]
  assert set(meta["label"]).isdisjoint(set(range(100)) | set(f.test_set["label"]))
  np.testing.assert_array_equal(meta["class_prior"], 0.0)
  sampler = sampling.StratifiedIdentitySampler(f.meta_groups, 3, 18, seed=0, salt=2)
  idx = sampler(5)
  ids, groups = f.identities("meta", idx)
  assert np.bincount(groups).tolist() == [6, 6, 6]          # 2 identities x 3 images per group
  assert all(np.sum(ids == i) == 3 for i in np.unique(ids))
  assert not np.array_equal(idx, sampler(6))
  with pytest.raises(ValueError, match="multiple"):
    sampling.StratifiedIdentitySampler(f.meta_groups, 3, 20, seed=0)
  unbalanced = synthetic.SyntheticFaces(_cfg(meta_ids_by_group=(4, 2, 1)), 0)
  assert np.bincount(unbalanced.meta_groups).tolist() == [4, 2, 1]


def test_group_variation_pair_cells():
  f = synthetic.SyntheticFaces(_cfg(group_variation_pairs=True, test_variation_rate=0.4), 0)
  cells = f.test_pairs()
  meta = f.test_set
  for g in range(3):
    for v in variations.VARIATIONS:
      p = cells[f"group{g}_{v}"]
      assert np.all(meta["group"][p.a] == g) and np.all(meta["group"][p.b] == g)
      assert np.all(meta[v][p.a] == 1) and np.all(meta[v][p.b] == 0)


def test_nuisance_lives_in_its_own_render_directions():
  # Pre-tanh fields recovered from noise-free, variation-free images (a small gain keeps
  # tanh invertible in float32); the basis is an orthogonal DCT set, so lstsq is exact.
  plain = _cfg(pixel_noise=0.0, train_variation_rate=0.0, test_variation_rate=0.0, gain=0.05)
  noisy = _cfg(pixel_noise=0.0, train_variation_rate=0.0, test_variation_rate=0.0, gain=0.05,
               nuisance_dim=4, nuisance_scale=0.5)
  fp, fn = synthetic.SyntheticFaces(plain, 3), synthetic.SyntheticFaces(noisy, 3)
  idx = np.array([0, 7, 40])
  ep, en = fp.examples("test", idx), fn.examples("test", idx)
  for k in ("label", "group", "pose", "occlusion", "blur"):
    np.testing.assert_array_equal(ep[k], en[k])
  np.testing.assert_array_equal(fp.latent_codes("test", idx), fn.latent_codes("test", idx))

  def coefficients(f, img, g):
    field = np.arctanh(np.clip(img - f.tints[g], -0.999999, 0.999999)) / plain.gain
    per_channel = field.reshape(-1, plain.channels).T                        # (c, pixels)
    return np.linalg.lstsq(f.basis.T, per_channel.T, rcond=None)[0].T.reshape(-1)   # (c * k,)

  for a, b, g in zip(ep["image"], en["image"], ep["group"]):
    diff = coefficients(fn, b, g) - coefficients(fp, a, g)
    span = fn.nuisance_mixing[g]                                            # (c * k, 4)
    inside = span @ np.linalg.lstsq(span, diff, rcond=None)[0]
    assert np.linalg.norm(diff) > 0.1
    # float32 rendering: a 4-d span of 108 leaves ~98 % of a random vector outside
    assert np.linalg.norm(diff - inside) < 0.01 * np.linalg.norm(diff)
  # Group-specific like the identity renderers: a minority's nuisance directions differ.
  assert not np.allclose(fn.nuisance_mixing[0], fn.nuisance_mixing[2])
