"""Face verification: the LFW protocol, TAR@FAR, and per-group / per-variation breakdowns.

LFW protocol as insightface `eval/verification.py` (specs/mvcom.md §4.6): embeddings are
L2-normalised (the caller passes flip-summed embeddings, see `embed_images`), the
distance is the squared L2 distance between them (in [0, 4]); the pairs are split into
`n_folds` contiguous folds (sizes as sklearn's unshuffled KFold); for each fold the
threshold from `arange(0, 4, 0.01)` with the best accuracy on the other folds is applied
to the held-out fold; reported: mean and std of the held-out accuracies and the mean
threshold. A pair is predicted "same" when distance < threshold.

TAR@FAR is read off the ROC of all pairs (as IJB evaluations do): the threshold that
accepts at most FAR x (number of impostor pairs) impostors, and the fraction of genuine
pairs it accepts.
"""

from typing import Callable, Mapping, Sequence

import numpy as np

THRESHOLDS = np.arange(0.0, 4.0, 0.01)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def squared_distances(emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
  """(n, d), (n, d) -> (n,) squared L2 distance of the normalised embeddings."""
  return np.sum((l2_normalize(emb_a) - l2_normalize(emb_b)) ** 2, axis=-1)


def fold_slices(n: int, n_folds: int) -> list[np.ndarray]:
  """Contiguous folds; the first n % n_folds folds have one extra pair (sklearn KFold)."""
  if n < n_folds:
    raise ValueError(f"verification: {n} pairs cannot be split into {n_folds} folds")
  return np.array_split(np.arange(n), n_folds)


def _accuracies(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """(t,) accuracy of 'same iff dist < threshold' for each threshold."""
  predict = dist[None, :] < thresholds[:, None]
  return np.mean(predict == issame[None, :], axis=1)


def tar_at_far(dist: np.ndarray, issame: np.ndarray, far: float) -> tuple[float, float]:
  """(TAR, threshold) at the threshold accepting at most far * #impostors impostor pairs."""
  impostor = np.sort(dist[~issame])
  genuine = dist[issame]
  if len(impostor) == 0 or len(genuine) == 0:
    raise ValueError("tar_at_far needs genuine and impostor pairs")
  k = int(np.floor(far * len(impostor)))
  threshold = impostor[k] if k < len(impostor) else np.inf
  # Ties at the threshold: accept strictly below, so at most k impostors pass.
  return float(np.mean(genuine < threshold)), float(threshold)


def roc_curve(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(FAR, TAR) at every distinct distance used as threshold (accept dist <= t)."""
  order = np.argsort(dist, kind="stable")
  same = np.asarray(issame, bool)[order]
  tar = np.cumsum(same) / max(same.sum(), 1)
  far = np.cumsum(~same) / max((~same).sum(), 1)
  return np.concatenate([[0.0], far]), np.concatenate([[0.0], tar])


def verification(emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray, n_folds: int = 10,
                 thresholds: np.ndarray = THRESHOLDS,
                 far_targets: Sequence[float] = (1e-3, 1e-2)) -> dict:
  """LFW-protocol verification of pairs (emb_a[k], emb_b[k]).

  Returns: accuracy (mean over folds), accuracy_std, threshold (mean best threshold),
  tar@far=<f> for each target, and dist / issame for ROC plots.
  """
  issame = np.asarray(issame, bool)
  if not (len(emb_a) == len(emb_b) == len(issame)):
    raise ValueError(f"verification: {len(emb_a)}, {len(emb_b)} embeddings for {len(issame)} pairs")
  dist = squared_distances(emb_a, emb_b)
  accs, best = [], []
  all_idx = np.arange(len(issame))
  for test in fold_slices(len(issame), n_folds):
    train = np.setdiff1d(all_idx, test)
    t = thresholds[int(np.argmax(_accuracies(dist[train], issame[train], thresholds)))]
    best.append(t)
    accs.append(float(np.mean((dist[test] < t) == issame[test])))
  out = {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
         "threshold": float(np.mean(best)), "dist": dist, "issame": issame}
  for far in far_targets:
    out[f"tar@far={far:g}"] = tar_at_far(dist, issame, far)[0]
  return out


def evaluate_cells(embeddings: np.ndarray, cells: Mapping[str, object], **kwargs) -> dict[str, dict]:
  """{cell: verification(...)} for pair cells with index arrays `.a`, `.b`, `.issame`."""
  return {name: verification(embeddings[p.a], embeddings[p.b], p.issame, **kwargs)
          for name, p in cells.items()}


def summarize(results: Mapping[str, dict], group_cells: Sequence[str]) -> dict[str, float]:
  """Flat scalars: acc_<cell>, tar@far=..._<cell>, and over the group cells the worst
  group accuracy, the max-min gap, and the mean and std of group accuracies."""
  out = {}
  for name, r in results.items():
    out[f"acc_{name}"] = r["accuracy"]
    for k, v in r.items():
      if k.startswith("tar@far"):
        out[f"{k}_{name}"] = v
  if group_cells:
    accs = np.array([results[g]["accuracy"] for g in group_cells])
    out.update(acc_worst_group=float(accs.min()), group_gap=float(accs.max() - accs.min()),
               acc_group_mean=float(accs.mean()), acc_group_std=float(accs.std()))
  return out


def embed_images(embed_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                 batch_size: int, flip: bool = True) -> np.ndarray:
  """(n, h, w, c) images -> (n, d) normalised embeddings, f(x) + f(flip x) when `flip`.

  Batches have a fixed size (the last one padded) so a jitted `embed_fn` compiles once.
  """
  out = []
  n = len(images)
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    emb = np.asarray(embed_fn(chunk), np.float64)
    if flip:
      emb = emb + np.asarray(embed_fn(chunk[:, :, ::-1]), np.float64)
    out.append(emb[:batch_size - pad])
  return l2_normalize(np.concatenate(out))


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
  """A plain-text table: one row per name, the given columns (as %)."""
  width = max(len(c) for c in columns) + 2
  lines = ["".ljust(16) + "".join(c.rjust(width) for c in columns)]
  for name, vals in rows.items():
    lines.append(name.ljust(16) + "".join(
        (f"{100 * vals[c]:.2f}" if c in vals else "-").rjust(width) for c in columns))
  return "\n".join(lines)
