"""Per-group verification as face-bias papers report it: every pair, one global threshold.

A sampled pair list (e.g. 1,500 impostor pairs per group) cannot resolve FAR 1e-4: one
impostor sets the threshold. Here every pair of a group's test images is scored: same
identity = genuine, different identities = impostor, so a group of n images from
identities with n_c images each has sum_c n_c (n_c - 1) / 2 genuine and
n (n - 1) / 2 - that many impostor pairs (1,500 images of 150 identities: 6,750 genuine,
1.12 M impostor pairs).

Distances are squared L2 between L2-normalised embeddings (as `face_jax.evaluate`); a
pair is accepted when its distance is below the threshold, and the threshold at a false
accept rate `far` over N impostor pairs is the k-th smallest impostor distance,
k = floor(far * N) (0-based), so at most k impostors pass (as `evaluate.tar_at_far`).
Only the k + 1 smallest impostor distances are ever needed, so they are kept while the
distance matrix is swept in row blocks: memory O(block * n + k), not O(n^2).

  tar_at_far_by_group   per group: TAR at each FAR, threshold from the group's own impostors
  global_threshold_errors   one threshold for all groups (a deployed system's), set at a
                        false-match rate over the pooled impostors; per group its FNMR and FMR,
                        and across groups their STD and skewed error ratio (max / min), the
                        way RFW (Wang et al. 2019) reports bias.
  report                both from one sweep, as flat metric keys (what the evaluators log).
"""

from typing import Mapping, Sequence

import numpy as np

from face_jax.evaluate import l2_normalize


class GroupPairs:
  """Every pair of one group's images: genuine distances, and the smallest impostor ones.

  Attributes:
    genuine: (n_genuine,) float64 distances of all same-identity pairs.
    impostor_smallest: (min(keep, n_impostor),) float64, the smallest impostor distances,
      ascending.
    n_impostor: the number of impostor pairs (all of them, not only those kept).
  """

  def __init__(self, embeddings: np.ndarray, identities: np.ndarray, keep: int,
               block: int = 1024):
    emb = l2_normalize(embeddings)
    ids = np.asarray(identities)
    if emb.ndim != 2 or len(emb) != len(ids):
      raise ValueError(f"GroupPairs: embeddings {emb.shape} and identities {ids.shape} must be "
                       "(n, d) and (n,)")
    n = len(ids)
    _, counts = np.unique(ids, return_counts=True)
    n_genuine = int(np.sum(counts * (counts - 1) // 2))
    self.n_impostor = n * (n - 1) // 2 - n_genuine
    genuine, smallest = [], np.empty((0,), np.float64)
    for start in range(0, n, block):
      rows = slice(start, min(start + block, n))
      # Pairs (i, j) with i in this block and j > i: the strict upper triangle.
      dist = np.maximum(2.0 - 2.0 * emb[rows] @ emb.T, 0.0)    # squared L2 of unit vectors
      upper = np.arange(n)[None, :] > np.arange(rows.start, rows.stop)[:, None]
      same = ids[rows, None] == ids[None, :]
      genuine.append(dist[upper & same])
      impostor = dist[upper & ~same]
      smallest = np.concatenate([smallest, impostor])
      if len(smallest) > keep:
        smallest = np.partition(smallest, keep - 1)[:keep]
    self.genuine = np.concatenate(genuine) if genuine else np.empty((0,))
    self.impostor_smallest = np.sort(smallest)
    if len(self.genuine) != n_genuine:
      raise AssertionError("GroupPairs: genuine pair count does not add up")

  def threshold(self, far: float) -> float:
    """The distance below which at most floor(far * n_impostor) impostor pairs fall."""
    return threshold_at(self.impostor_smallest, self.n_impostor, far)


def impostors_to_keep(far: float, n_impostor: int) -> int:
  """How many of the smallest impostor distances fix the threshold at `far`."""
  return int(np.floor(far * n_impostor)) + 1


def threshold_at(impostor_smallest: np.ndarray, n_impostor: int, far: float) -> float:
  """k-th smallest impostor distance, k = floor(far * n_impostor); inf when k = n_impostor."""
  if n_impostor == 0:
    raise ValueError("threshold_at: no impostor pairs")
  if not 0.0 <= far <= 1.0:
    raise ValueError(f"threshold_at: far={far} is not a rate in [0, 1]")
  k = int(np.floor(far * n_impostor))
  if k >= n_impostor:
    return float("inf")
  if k >= len(impostor_smallest):
    raise ValueError(f"threshold_at: FAR {far} needs the {k + 1} smallest impostor distances, "
                     f"only {len(impostor_smallest)} were kept")
  return float(impostor_smallest[k])


def _split_groups(embeddings, identities, groups):
  embeddings, identities, groups = map(np.asarray, (embeddings, identities, groups))
  if not len(embeddings) == len(identities) == len(groups):
    raise ValueError(f"per-group verification: {len(embeddings)} embeddings, "
                     f"{len(identities)} identities, {len(groups)} group labels")
  return {g.item(): (embeddings[groups == g], identities[groups == g])
          for g in np.unique(groups)}


def _group_pairs(embeddings, identities, groups, far_max: float, block: int):
  """{group: GroupPairs} keeping enough impostors for `far_max` (also pooled over groups)."""
  parts = _split_groups(embeddings, identities, groups)
  total = 0
  for emb, ids in parts.values():
    n, (_, counts) = len(ids), np.unique(ids, return_counts=True)
    total += n * (n - 1) // 2 - int(np.sum(counts * (counts - 1) // 2))
  # A group's share of the pooled k smallest is at most k: keeping that many per group
  # makes the pooled threshold exact as well.
  keep = impostors_to_keep(far_max, total)
  return {g: GroupPairs(emb, ids, keep, block) for g, (emb, ids) in parts.items()}


def tar_at_far_by_group(embeddings: np.ndarray, identities: np.ndarray, groups: np.ndarray,
                        fars: Sequence[float] = (1e-4, 1e-3), block: int = 1024
                        ) -> dict[object, dict[str, float]]:
  """{group: {"tar@far=<f>", "threshold@far=<f>", "genuine_pairs", "impostor_pairs"}}.

  embeddings (n, d), identities (n,), groups (n,): the test images; every pair within a
  group is scored, and each group's threshold comes from its own impostor pairs.
  """
  return _tar_rows(_group_pairs(embeddings, identities, groups, max(fars), block), fars)


def _check_pairs(g, p: GroupPairs) -> None:
  if len(p.genuine) == 0 or p.n_impostor == 0:
    raise ValueError(f"group {g!r}: needs genuine and impostor pairs "
                     f"({len(p.genuine)} genuine, {p.n_impostor} impostor)")


def _tar_rows(pairs: Mapping[object, GroupPairs], fars: Sequence[float]) -> dict:
  out = {}
  for g, p in pairs.items():
    _check_pairs(g, p)
    row = {"genuine_pairs": float(len(p.genuine)), "impostor_pairs": float(p.n_impostor)}
    for far in fars:
      t = p.threshold(far)
      row[f"tar@far={far:g}"] = float(np.mean(p.genuine < t))
      row[f"threshold@far={far:g}"] = t
    out[g] = row
  return out


def skewed_error_ratio(errors: Sequence[float]) -> float:
  """max / min of per-group error rates (RFW's SER); inf when the best group makes none."""
  errors = np.asarray(errors, np.float64)
  lo = errors.min()
  return float(errors.max() / lo) if lo > 0 else (float("inf") if errors.max() > 0 else 1.0)


def global_threshold_errors(embeddings: np.ndarray, identities: np.ndarray, groups: np.ndarray,
                            fmr: float = 1e-3, threshold: float | None = None,
                            block: int = 1024) -> dict:
  """Error rates of every group at one global threshold.

  The threshold is `threshold` if given, else the one with a false-match rate `fmr` over
  the impostor pairs of all groups pooled. Returns {"threshold", "groups": {group:
  {"fnmr", "fmr", "genuine_pairs", "impostor_pairs"}}, and across groups "fnmr_std",
  "fnmr_ser", "fmr_std", "fmr_ser", "fnmr_max_group"}. STD is the population standard
  deviation over groups, SER = max / min (`skewed_error_ratio`).
  """
  return _global_errors(_group_pairs(embeddings, identities, groups, fmr, block), fmr, threshold)


def _global_errors(pairs: Mapping[object, GroupPairs], fmr: float,
                   threshold: float | None = None) -> dict:
  if threshold is None:
    pooled = np.sort(np.concatenate([p.impostor_smallest for p in pairs.values()]))
    threshold = threshold_at(pooled, sum(p.n_impostor for p in pairs.values()), fmr)
  rows = {}
  for g, p in pairs.items():
    _check_pairs(g, p)
    accepted = int(np.sum(p.impostor_smallest < threshold))
    if accepted == len(p.impostor_smallest) and accepted < p.n_impostor:
      raise ValueError(f"group {g!r}: threshold {threshold} accepts more impostors than the "
                       f"{accepted} kept; pass a smaller threshold or let fmr set it")
    rows[g] = {"fnmr": float(np.mean(p.genuine >= threshold)),
               "fmr": accepted / p.n_impostor,
               "genuine_pairs": float(len(p.genuine)), "impostor_pairs": float(p.n_impostor)}
  fnmr = [r["fnmr"] for r in rows.values()]
  fmrs = [r["fmr"] for r in rows.values()]
  return {"threshold": float(threshold), "groups": rows,
          "fnmr_std": float(np.std(fnmr)), "fnmr_ser": skewed_error_ratio(fnmr),
          "fmr_std": float(np.std(fmrs)), "fmr_ser": skewed_error_ratio(fmrs),
          "fnmr_max_group": list(rows)[int(np.argmax(fnmr))]}


def summarize(by_group: Mapping[object, Mapping[str, float]], errors: Mapping,
              prefix: str = "") -> dict[str, float]:
  """Flat scalars for metric files: <prefix>tar@far=<f>_group<g>, <prefix>fnmr_group<g>,
  <prefix>fmr_group<g>, and <prefix>threshold / fnmr_std / fnmr_ser / fmr_std / fmr_ser."""
  out = {}
  for g, row in by_group.items():
    for k, v in row.items():
      if k.startswith("tar@far"):
        out[f"{prefix}{k}_group{g}"] = v
  for g, row in errors["groups"].items():
    out[f"{prefix}fnmr_group{g}"] = row["fnmr"]
    out[f"{prefix}fmr_group{g}"] = row["fmr"]
  out.update({f"{prefix}{k}": errors[k]
              for k in ("threshold", "fnmr_std", "fnmr_ser", "fmr_std", "fmr_ser")})
  return out


def report(embeddings: np.ndarray, identities: np.ndarray, groups: np.ndarray,
           fars: Sequence[float] = (1e-4, 1e-3), fmr: float = 1e-3, prefix: str = "allpairs_",
           block: int = 1024) -> dict[str, float]:
  """Both measurements from one sweep over the pairs, flattened by `summarize`.

  The default prefix keeps these keys apart from the sampled-pair cells' `tar@far=..._group<g>`.
  """
  pairs = _group_pairs(embeddings, identities, groups, max(*fars, fmr), block)
  return summarize(_tar_rows(pairs, fars), _global_errors(pairs, fmr), prefix)
