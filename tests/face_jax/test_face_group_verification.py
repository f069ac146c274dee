"""Per-group TAR@FAR over all pairs and global-threshold FNMR, against brute force over
explicitly enumerated pairs."""

import itertools

import numpy as np
import pytest

from face_jax import group_verification as gv


def _faces(seed=0):
  """Three groups of identities with 1-6 images each; noisier groups are harder."""
  rng = np.random.default_rng(seed)
  emb, ids, groups = [], [], []
  identity = 0
  for g, (n_ids, noise) in enumerate(((14, 0.5), (11, 0.8), (9, 1.1))):
    for _ in range(n_ids):
      centre = rng.normal(size=16)
      for _ in range(rng.integers(1, 7)):
        emb.append(centre + noise * rng.normal(size=16))
        ids.append(identity)
        groups.append(g)
      identity += 1
  return np.array(emb), np.array(ids), np.array(groups)


def _brute_force_pairs(emb, ids, groups, g):
  """(genuine, impostor) squared L2 distances of every pair of group g, one by one."""
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  members = np.flatnonzero(groups == g)
  genuine, impostor = [], []
  for i, j in itertools.combinations(members, 2):
    d = float(np.sum((unit[i] - unit[j]) ** 2))
    (genuine if ids[i] == ids[j] else impostor).append(d)
  return np.array(genuine), np.array(impostor)


@pytest.mark.parametrize("block", [7, 1024])
def test_tar_at_far_uses_every_pair_and_equals_brute_force(block):
  emb, ids, groups = _faces()
  fars = (1e-3, 1e-2, 0.1)
  got = gv.tar_at_far_by_group(emb, ids, groups, fars, block=block)
  assert set(got) == {0, 1, 2}
  tars = []
  for g in range(3):
    genuine, impostor = _brute_force_pairs(emb, ids, groups, g)
    assert got[g]["genuine_pairs"] == len(genuine) and got[g]["impostor_pairs"] == len(impostor)
    ordered = sorted(impostor)
    for far in fars:
      k = int(np.floor(far * len(impostor)))
      t = ordered[k]
      assert sum(d < t for d in impostor) <= k   # at most the allowed impostors pass
      assert got[g][f"threshold@far={far:g}"] == pytest.approx(t, abs=1e-12)
      assert got[g][f"tar@far={far:g}"] == pytest.approx(np.mean(genuine < t), abs=1e-12)
    tars.append(got[g]["tar@far=0.01"])
  assert tars[0] > tars[2]   # the noisier group is worse: the measurement sees the bias


def test_global_threshold_fnmr_std_and_ser_equal_brute_force():
  emb, ids, groups = _faces(seed=1)
  fmr = 0.01
  got = gv.global_threshold_errors(emb, ids, groups, fmr=fmr, block=5)
  per_group = {g: _brute_force_pairs(emb, ids, groups, g) for g in range(3)}
  pooled = np.sort(np.concatenate([imp for _, imp in per_group.values()]))
  t = pooled[int(np.floor(fmr * len(pooled)))]
  assert got["threshold"] == pytest.approx(t, abs=1e-12)
  fnmr = {g: np.mean(gen >= t) for g, (gen, _) in per_group.items()}
  fmrs = {g: np.mean(imp < t) for g, (_, imp) in per_group.items()}
  for g in range(3):
    assert got["groups"][g]["fnmr"] == pytest.approx(fnmr[g], abs=1e-12)
    assert got["groups"][g]["fmr"] == pytest.approx(fmrs[g], abs=1e-12)
  values = list(fnmr.values())
  assert min(values) > 0 and max(values) > min(values)   # SER is a real ratio here
  assert got["fnmr_std"] == pytest.approx(np.std(values), abs=1e-12)
  assert got["fnmr_ser"] == pytest.approx(max(values) / min(values), rel=1e-12)
  assert got["fnmr_max_group"] == max(fnmr, key=fnmr.get) == 2
  # A given threshold is used as is.
  fixed = gv.global_threshold_errors(emb, ids, groups, fmr=0.5, threshold=0.9 * t, block=5)
  assert fixed["threshold"] == 0.9 * t
  for g, (gen, imp) in per_group.items():
    assert fixed["groups"][g]["fnmr"] == pytest.approx(np.mean(gen >= 0.9 * t), abs=1e-12)
    assert fixed["groups"][g]["fmr"] == pytest.approx(np.mean(imp < 0.9 * t), abs=1e-12)
  flat = gv.summarize(gv.tar_at_far_by_group(emb, ids, groups, (0.01,)), got)
  assert flat["fnmr_group2"] == got["groups"][2]["fnmr"] and "tar@far=0.01_group0" in flat


def test_skewed_error_ratio_edges():
  assert gv.skewed_error_ratio([0.02, 0.05, 0.04]) == pytest.approx(2.5)
  assert gv.skewed_error_ratio([0.0, 0.01]) == float("inf")
  assert gv.skewed_error_ratio([0.0, 0.0]) == 1.0


def test_bad_input_is_named():
  emb, ids, groups = _faces()
  with pytest.raises(ValueError, match="3 embeddings, 2 identities"):
    gv.tar_at_far_by_group(emb[:3], ids[:2], groups[:3])
  solo = np.arange(len(ids))   # every image its own identity: no genuine pairs
  with pytest.raises(ValueError, match=r"group 0: needs genuine and impostor pairs \(0 genuine"):
    gv.tar_at_far_by_group(emb, solo, groups)
  with pytest.raises(ValueError, match="accepts more impostors than the"):
    gv.global_threshold_errors(emb, ids, groups, fmr=1e-3, threshold=3.9)
  with pytest.raises(ValueError, match="far=2 is not a rate"):
    gv.threshold_at(np.array([0.1]), 10, 2)


def test_report_is_both_measurements_in_one_sweep():
  emb, ids, groups = _faces(seed=2)
  got = gv.report(emb, ids, groups, fars=(1e-2, 0.1), fmr=0.05, block=9)
  want = gv.summarize(gv.tar_at_far_by_group(emb, ids, groups, (1e-2, 0.1)),
                      gv.global_threshold_errors(emb, ids, groups, fmr=0.05), prefix="allpairs_")
  assert got == pytest.approx(want)
  assert {"allpairs_tar@far=0.01_group2", "allpairs_fnmr_group0", "allpairs_fnmr_ser",
          "allpairs_threshold"} <= set(got)
