"""IJB-B / IJB-C 1:1 verification of templates, as insightface's `_evaluation_/ijb` runs it.

Inputs, the insightface meta files (one record a line, fields separated by spaces):
  <t>_face_tid_mid.txt         image name, template id, media id    (one line per image)
  <t>_template_pair_label.txt  template id 1, template id 2, label 1 / 0
  <t>_name_5pts_score.txt      image name, 5 landmarks (x y) x 5, detector face score
with <t> = ijbb / ijbc; the image order of the first and the last is the feature order.

The protocol, step by step:
  1. image features: f(x) + f(flip x) (flip test), optionally scaled by the detector score;
     insightface's default keeps the feature norm (no normalisation before pooling), so
     confident / high-norm faces weigh more.
  2. media pooling: within a template, the images of one media (frames of one video, or
     one still) are averaged; a template feature is the SUM of its media features, then
     L2-normalised.
  3. 1:1 score of a template pair = cosine of the two template features.
  4. TAR at FAR 1e-6 .. 1e-1 (papers report 1e-5 and 1e-4). Here by default exactly: the
     threshold accepts at most floor(FAR * #impostor pairs) impostors (score strictly
     above the threshold is a match), as `face_jax.group_verification` does for distances.
     `method="nearest"` reads insightface's table instead: on sklearn's ROC (thresholds
     at the distinct scores, collinear interior points dropped) the point whose FPR is
     nearest to the target, the larger TPR on ties; it can sit above the target FAR.

`write_synthetic` writes a small IJB-style set (several media per template, multi-frame
media, single-image templates) in these formats, with its image features, for tests.
"""

import argparse
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

# arcface_torch's 112 x 112 five-point template (eyes, nose, mouth corners), (x, y) pixels.
ARCFACE_LANDMARKS = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)


# --- meta files --------------------------------------------------------------------------

def _read_lines(path: str) -> list[str]:
  with open(path) as f:
    lines = f.read().splitlines()
  if not lines:
    raise ValueError(f"{path}: empty")
  return lines


def _parse_columns(path: str, kinds: str, chunk: int = 1 << 20) -> list[np.ndarray]:
  """Columns of a space-separated file; kinds per column: s(tring) i(nt) f(loat).

  Errors name the file, the 1-based line and the field. All-integer files (IJB-C's 15.6 M
  template pairs) are converted a chunk of lines at a time by numpy; a chunk that does
  not convert is parsed line by line to find the bad line.
  """
  lines = _read_lines(path)
  if lines[-1].strip() == "":
    lines = lines[:-1]   # a trailing blank line
  if set(kinds) == {"i"}:
    parts = []
    for start in range(0, len(lines), chunk):
      block = lines[start:start + chunk]
      tokens = " ".join(block).split()
      try:
        if len(tokens) != len(kinds) * len(block):
          raise ValueError
        parts.append(np.array(tokens, np.int64).reshape(len(block), len(kinds)))
      except ValueError:
        _parse_lines(path, block, kinds, start)   # raises, naming the line
        raise AssertionError(f"{path}: lines {start + 1}.. failed to convert") from None
    table = np.concatenate(parts)
    return [table[:, j] for j in range(len(kinds))]
  return _parse_lines(path, lines, kinds, 0)


def _parse_lines(path: str, lines: Sequence[str], kinds: str, first: int) -> list[np.ndarray]:
  cols = [[] for _ in kinds]
  cast = {"s": str, "i": int, "f": float}
  for n, line in enumerate(lines, first + 1):
    fields = line.split()
    if len(fields) != len(kinds):
      raise ValueError(f"{path}:{n}: expected {len(kinds)} fields, got {len(fields)}: {line!r}")
    for j, (k, v) in enumerate(zip(kinds, fields)):
      try:
        cols[j].append(cast[k](v))
      except ValueError:
        what = {"i": "an integer", "f": "a number"}[k]
        raise ValueError(f"{path}:{n}: field {j + 1} {v!r} is not {what}: {line!r}") from None
  dtypes = {"s": object, "i": np.int64, "f": np.float64}
  return [np.asarray(c, dtypes[k]) for c, k in zip(cols, kinds)]


def read_template_media(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """*_face_tid_mid.txt -> (image names, template ids, media ids), (n,) each."""
  return tuple(_parse_columns(path, "sii"))


def read_template_pairs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """*_template_pair_label.txt -> (template 1, template 2, label bool), (p,) each."""
  t1, t2, label = _parse_columns(path, "iii")
  bad = np.flatnonzero((label != 0) & (label != 1))
  if len(bad):
    raise ValueError(f"{path}:{bad[0] + 1}: label {label[bad[0]]} is not 0 or 1")
  return t1, t2, label.astype(bool)


def read_landmarks_scores(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """*_name_5pts_score.txt -> (image names (n,), landmarks (n, 5, 2), face scores (n,))."""
  name, *rest = _parse_columns(path, "s" + "f" * 11)
  values = np.stack(rest, axis=1)
  return name, values[:, :10].reshape(-1, 5, 2), values[:, 10]


@dataclasses.dataclass(frozen=True)
class Meta:
  """One IJB protocol: per image (feature order) and per template pair."""
  names: np.ndarray          # (n,) image names
  templates: np.ndarray      # (n,) template id
  medias: np.ndarray         # (n,) media id
  pair_t1: np.ndarray        # (p,)
  pair_t2: np.ndarray        # (p,)
  pair_label: np.ndarray     # (p,) bool: same subject
  landmarks: Optional[np.ndarray] = None     # (n, 5, 2)
  face_scores: Optional[np.ndarray] = None   # (n,)


def meta_paths(meta_dir: str, target: str) -> dict[str, str]:
  t = target.lower()
  return {"tid_mid": os.path.join(meta_dir, f"{t}_face_tid_mid.txt"),
          "pairs": os.path.join(meta_dir, f"{t}_template_pair_label.txt"),
          "5pts": os.path.join(meta_dir, f"{t}_name_5pts_score.txt")}


def load_meta(meta_dir: str, target: str) -> Meta:
  """The protocol of `target` (IJBB / IJBC) from <meta_dir>; the landmark file is optional."""
  paths = meta_paths(meta_dir, target)
  names, templates, medias = read_template_media(paths["tid_mid"])
  t1, t2, label = read_template_pairs(paths["pairs"])
  landmarks = scores = None
  if os.path.exists(paths["5pts"]):
    names5, landmarks, scores = read_landmarks_scores(paths["5pts"])
    if len(names5) != len(names):
      raise ValueError(f"{paths['5pts']}: {len(names5)} images, {paths['tid_mid']}: {len(names)}")
    differ = np.flatnonzero(names5 != names)
    if len(differ):
      k = differ[0]
      raise ValueError(f"{paths['5pts']}:{k + 1}: image {names5[k]!r}, but line {k + 1} of "
                       f"{paths['tid_mid']} is {names[k]!r} (the two must list images in one order)")
  known = np.unique(templates)
  for ids, col in ((t1, 1), (t2, 2)):
    unknown = np.flatnonzero(~np.isin(ids, known))
    if len(unknown):
      k = unknown[0]
      raise ValueError(f"{paths['pairs']}:{k + 1}: template {ids[k]} (field {col}) has no image "
                       f"in {paths['tid_mid']}")
  return Meta(names, templates, medias, t1, t2, label, landmarks, scores)


# --- features ------------------------------------------------------------------------------

def image_features(features: np.ndarray, flip_features: Optional[np.ndarray] = None,
                   face_scores: Optional[np.ndarray] = None, normalize: bool = False) -> np.ndarray:
  """(n, d) per-image features for pooling: f(x) [+ f(flip x)], [L2-normalised], [* score].

  insightface's defaults: flip test on, normalize off (the norm carries quality), the
  detector score on.
  """
  feats = np.asarray(features, np.float64)
  if flip_features is not None:
    if np.shape(flip_features) != feats.shape:
      raise ValueError(f"flip features {np.shape(flip_features)} vs features {feats.shape}")
    feats = feats + np.asarray(flip_features, np.float64)
  if normalize:
    feats = feats / np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
  if face_scores is not None:
    if np.shape(face_scores) != feats.shape[:1]:
      raise ValueError(f"{np.shape(face_scores)} face scores for {len(feats)} images")
    feats = feats * np.asarray(face_scores, np.float64)[:, None]
  return feats


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(n, d) image features -> (template ids (t,) ascending, L2-normalised features (t, d)).

  Media pooling: mean over the images of each (template, media), then the sum over a
  template's media.
  """
  feats = np.asarray(feats, np.float64)
  templates, medias = np.asarray(templates), np.asarray(medias)
  if not len(feats) == len(templates) == len(medias):
    raise ValueError(f"{len(feats)} features, {len(templates)} template ids, {len(medias)} media ids")
  keys, media_of_image = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
  media_of_image = media_of_image.ravel()
  media_sum = np.zeros((len(keys), feats.shape[1]))
  np.add.at(media_sum, media_of_image, feats)
  media_mean = media_sum / np.bincount(media_of_image, minlength=len(keys))[:, None]
  ids, template_of_media = np.unique(keys[:, 0], return_inverse=True)
  out = np.zeros((len(ids), feats.shape[1]))
  np.add.at(out, template_of_media.ravel(), media_mean)
  return ids, out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray,
                t2: np.ndarray, batch: int = 100_000) -> np.ndarray:
  """(p,) cosine of each template pair (t1[k], t2[k]); templates must be known."""
  template_ids = np.asarray(template_ids)   # ascending, as template_features returns them
  index = []
  for t in (np.asarray(t1), np.asarray(t2)):
    i = np.minimum(np.searchsorted(template_ids, t), len(template_ids) - 1)
    unknown = np.flatnonzero(template_ids[i] != t)
    if len(unknown):
      raise ValueError(f"template pair {unknown[0]} names template {t[unknown[0]]}, which has "
                       "no features")
    index.append(i)
  i1, i2 = index
  out = np.empty(len(t1))
  for s in range(0, len(t1), batch):
    out[s:s + batch] = np.einsum("pd,pd->p", template_feats[i1[s:s + batch]],
                                 template_feats[i2[s:s + batch]])
  return out


# --- TAR @ FAR ----------------------------------------------------------------------------

def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS,
               method: str = "exact") -> dict[str, float]:
  """{"tar@far=<f>": TAR} for similarity scores (higher = same); see the module docstring."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  genuine, impostor = scores[labels], scores[~labels]
  if len(genuine) == 0 or len(impostor) == 0:
    raise ValueError(f"tar_at_far: {len(genuine)} genuine and {len(impostor)} impostor pairs; "
                     "needs both")
  out = {}
  if method == "exact":
    impostor = np.sort(impostor)[::-1]
    for far in fars:
      k = int(np.floor(far * len(impostor)))
      threshold = impostor[k] if k < len(impostor) else -np.inf
      out[f"tar@far={far:g}"] = float(np.mean(genuine > threshold))
  elif method == "nearest":
    fpr, tpr = roc(scores, labels)
    for far in fars:
      gap = np.abs(fpr - far)
      # The last of the nearest points: the largest TPR at that FPR.
      k = len(gap) - 1 - int(np.argmin(gap[::-1]))
      out[f"tar@far={far:g}"] = float(tpr[k])
  else:
    raise ValueError(f"tar_at_far: method={method!r}; known: exact, nearest")
  return out


def roc(scores: np.ndarray, labels: np.ndarray, drop_intermediate: bool = True
        ) -> tuple[np.ndarray, np.ndarray]:
  """(FPR, TPR) accepting score >= t for each distinct score t, descending, from (0, 0).

  drop_intermediate: as sklearn's roc_curve, keep only the first, the last and the
  points where the ROC bends (a non-zero second difference of the FP or TP counts).
  """
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
  s, same = np.asarray(scores)[order], np.asarray(labels, bool)[order]
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]   # end of each run of equal scores
  tp, fp = np.cumsum(same)[last], np.cumsum(~same)[last]
  if drop_intermediate and len(fp) > 2:
    keep = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
    tp, fp = tp[keep], fp[keep]
  return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def evaluate(meta: Meta, features: np.ndarray, flip_features: Optional[np.ndarray] = None,
             use_face_scores: bool = True, normalize: bool = False,
             fars: Sequence[float] = FARS, method: str = "exact") -> dict:
  """The whole protocol -> {"tar@far=<f>", "scores", "genuine_pairs", "impostor_pairs"}."""
  if len(features) != len(meta.names):
    raise ValueError(f"{len(features)} image features for the protocol's {len(meta.names)} images")
  if use_face_scores and meta.face_scores is None:
    raise ValueError("use_face_scores: the protocol has no *_name_5pts_score.txt")
  feats = image_features(features, flip_features, meta.face_scores if use_face_scores else None,
                         normalize)
  ids, tfeats = template_features(feats, meta.templates, meta.medias)
  scores = pair_scores(ids, tfeats, meta.pair_t1, meta.pair_t2)
  return {**tar_at_far(scores, meta.pair_label, fars, method), "scores": scores,
          "genuine_pairs": int(meta.pair_label.sum()),
          "impostor_pairs": int((~meta.pair_label).sum())}


# --- images -> features --------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """(2, 3) least-squares similarity (rotation, scale, shift) mapping src -> dst (Umeyama)."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  xs, xd = src - mu_s, dst - mu_d
  u, sig, vt = np.linalg.svd(xd.T @ xs / len(src))
  d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
  rot = u @ d @ vt
  scale = np.trace(np.diag(sig) @ d) / np.mean(np.sum(xs ** 2, 1))
  return np.c_[scale * rot, mu_d - scale * rot @ mu_s]


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
  """uint8 (H, W, 3) loose crop + its 5 landmarks -> the (size, size, 3) aligned face."""
  m = similarity_transform(landmarks, ARCFACE_LANDMARKS * (size / 112.0))
  # PIL maps output pixels back to input pixels: the inverse transform.
  inv = np.linalg.inv(np.r_[m, [[0.0, 0.0, 1.0]]])[:2]
  out = Image.fromarray(np.asarray(image, np.uint8)).transform(
      (size, size), Image.Transform.AFFINE, tuple(inv.ravel()), resample=Image.Resampling.BILINEAR)
  return np.asarray(out)


def embed_protocol(embed_fn: Callable[[np.ndarray], np.ndarray], image_dir: str, meta: Meta,
                   batch_size: int = 64, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
  """(features, flip features), (n, d) each: aligned loose crops through `embed_fn`.

  embed_fn: uint8 (b, size, size, 3) -> (b, d); called with a fixed batch size.
  """
  from face_jax.data.recordio import decode_image  # pylint: disable=import-outside-toplevel
  if meta.landmarks is None:
    raise ValueError("embed_protocol: the protocol has no landmarks (*_name_5pts_score.txt)")
  feats, flips = [], []
  for start in range(0, len(meta.names), batch_size):
    names = meta.names[start:start + batch_size]
    faces = []
    for k, name in enumerate(names):
      path = os.path.join(image_dir, name)
      try:
        with open(path, "rb") as f:
          image = decode_image(f.read(), path)
      except FileNotFoundError:
        raise ValueError(f"{path}: image {start + k} of the protocol is missing") from None
      faces.append(align_face(image, meta.landmarks[start + k], size))
    x = np.stack(faces + [faces[-1]] * (batch_size - len(faces)))
    feats.append(np.asarray(embed_fn(x))[:len(faces)])
    flips.append(np.asarray(embed_fn(x[:, :, ::-1]))[:len(faces)])
  return np.concatenate(feats), np.concatenate(flips)


# --- a small synthetic protocol ------------------------------------------------------------

def write_synthetic(meta_dir: str, target: str = "ijbs", seed: int = 0, subjects: int = 12,
                    dim: int = 16, noise: float = 0.8) -> tuple[Meta, np.ndarray, np.ndarray]:
  """Writes an IJB-style protocol in the real files' formats -> (meta, features, flip features).

  Each subject has 2-4 templates; a template has 1-3 media of 1-4 frames (a quarter of the
  templates are one image). Image features = subject code + Gaussian noise (the flip a
  second draw). Pairs: every genuine template pair and every impostor pair.
  """
  rng = np.random.default_rng(seed)
  codes = rng.normal(size=(subjects, dim))
  rows, template_subject = [], []
  media_id = 1000
  for s in range(subjects):
    for _ in range(rng.integers(2, 5)):
      tid = len(template_subject) + 1
      template_subject.append(s)
      single = rng.random() < 0.25
      for _ in range(1 if single else rng.integers(1, 4)):
        media_id += 1
        for _ in range(1 if single else rng.integers(1, 5)):
          rows.append((f"{len(rows) + 1}.jpg", tid, media_id, s))
  n = len(rows)
  subject = np.array([r[3] for r in rows])
  feats = codes[subject] + noise * rng.normal(size=(n, dim))
  flips = codes[subject] + noise * rng.normal(size=(n, dim))
  scores = rng.uniform(0.3, 1.0, n)
  landmarks = ARCFACE_LANDMARKS[None] + 40 + rng.normal(scale=2.0, size=(n, 5, 2))
  t = len(template_subject)
  i1, i2 = np.triu_indices(t, 1)
  label = np.array(template_subject)[i1] == np.array(template_subject)[i2]
  os.makedirs(meta_dir, exist_ok=True)
  paths = meta_paths(meta_dir, target)
  with open(paths["tid_mid"], "w") as f:
    f.writelines(f"{name} {tid} {mid}\n" for name, tid, mid, _ in rows)
  with open(paths["pairs"], "w") as f:
    f.writelines(f"{a + 1} {b + 1} {int(l)}\n" for a, b, l in zip(i1, i2, label))
  with open(paths["5pts"], "w") as f:
    for (name, *_), lmk, sc in zip(rows, landmarks, scores):
      f.write(" ".join([name, *(f"{v:.3f}" for v in lmk.ravel()), f"{sc:.6f}"]) + "\n")
  return load_meta(meta_dir, target), feats, flips


# --- command line --------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m face_jax.ijb", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--meta_dir", required=True, help="folder with the <target>_*.txt meta files")
  p.add_argument("--target", default="IJBC", help="IJBB or IJBC (file-name prefix)")
  p.add_argument("--features", default="",
                 help=".npy (n, d) image features in the meta files' image order")
  p.add_argument("--workdir", default="",
                 help="instead of --features: a face run whose newest checkpoint embeds the "
                      "aligned --image_dir loose crops (and their mirror images)")
  p.add_argument("--image_dir", default="", help="the loose crops (IJB's loose_crop folder)")
  p.add_argument("--batch_size", type=int, default=64, help="embedding batch (--workdir)")
  p.add_argument("--flip_features", default="", help=".npy (n, d) features of the flipped images")
  p.add_argument("--concat_flip", action="store_true",
                 help="--features is (n, 2d) with the flipped image's features in the second "
                      "half (insightface's dump)")
  p.add_argument("--no_face_scores", action="store_true", help="do not weight by detector score")
  p.add_argument("--normalize", action="store_true", help="L2-normalise image features first")
  p.add_argument("--method", default="exact", choices=("exact", "nearest"))
  p.add_argument("--scores_out", default="", help="optional .npy for the (p,) pair scores")
  return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parser().parse_args(argv)
  meta = load_meta(args.meta_dir, args.target)
  if bool(args.features) == bool(args.workdir):
    raise ValueError("give --features or --workdir (with --image_dir)")
  if args.workdir:
    if not args.image_dir:
      raise ValueError("--workdir needs --image_dir")
    from face_jax import restore  # pylint: disable=import-outside-toplevel
    embed, size = restore.load_embedder(args.workdir)
    feats, flips = embed_protocol(embed, args.image_dir, meta, args.batch_size, size)
  else:
    feats = np.load(args.features, allow_pickle=False)
    flips = np.load(args.flip_features, allow_pickle=False) if args.flip_features else None
    if args.concat_flip:
      if flips is not None or feats.ndim != 2 or feats.shape[1] % 2:
        raise ValueError(f"--concat_flip: {args.features} must be (n, 2d) and --flip_features unset")
      feats, flips = np.split(feats, 2, axis=1)
  result = evaluate(meta, feats, flips, use_face_scores=not args.no_face_scores,
                    normalize=args.normalize, method=args.method)
  if args.scores_out:
    np.save(args.scores_out, result["scores"])
  summary = {k: v for k, v in result.items() if k != "scores"}
  print(json.dumps(summary, indent=2))
  return summary


if __name__ == "__main__":
  main()
