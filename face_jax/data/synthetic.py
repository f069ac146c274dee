"""Procedural biased faces: identities, ethnicity-like groups and variations, no files.

Example i of a split is a pure function of (seed, split, i).

Renderer. A face is a smooth field on the image grid: a low-frequency cosine basis
(frequencies even in x, so faces are left-right symmetric and a flip is a natural
augmentation), with per-channel coefficients A_g z from the identity code z (dim
`code_dim`), then tanh and a per-group colour tint. Each image perturbs the code
(z + jitter * noise) and adds pixel noise.

Nuisance (expression / lighting-like). With `nuisance_dim` > 0 every image also adds
N_g u, u ~ N(0, nuisance_scale^2 I) of dimension `nuisance_dim` drawn per image, through
a nuisance matrix N_g mixed per group like A_g (below). Unlike the jitter, which moves the
identity code itself and so cannot be undone, u lives in its own directions: an embedding
can learn to discard it, but only from images of groups that render it, and only as far
as the loss asks identities to be compact, so a group's margin can matter for it.

Groups (ethnicity-like). Group g renders with its own matrix
  A_g = sqrt(1 - rho_g) A_shared + sqrt(rho_g) A_own_g,
so with rho_0 = 0 the majority exercises only the shared subspace and a minority with
rho_g > 0 puts much of its identity signal where the majority has none; its codes are
also scaled by `group_spread[g]` < 1 (identities closer together). Training identities
follow `group_fractions` (e.g. 0.80 / 0.17 / 0.03); specs/mvcom.md §6.4 lesson 1.

Hard identities. A fraction `hard_fraction[g]` of each group's identities are look-alikes:
their code is sqrt(1 - d^2) z_partner + d z_own (d = `hard_distance`) for another identity
of the same group and split, so each group has identities that only a tight margin keeps
apart.

Variations. Pose, occlusion and blur (data/variations.py) are applied independently at
a per-split rate, or per group x variation (`train_variation_rates`, `meta_variation_rates`:
one (pose, occlusion, blur) triple per group, e.g. the minority blurrier and more occluded);
the flags are recorded with every image. With `variation_degrees` each applied variation
also has a continuous degree u ~ U(degree_min, 1) that scales it (shift, band height, blur
sigma), recorded as `<variation>_degree` (0 when the variation is absent).

Splits.
  train  `num_train_ids` identities, a variable number of images each (long tail):
         `images_per_id` (lo, hi), or one range per group (`images_per_id_by_group`)
  meta   `meta_ids_per_group` identities of each group (or `meta_ids_by_group`, one count
         per group, for an unbalanced meta set), `meta_images_per_id` images each,
         variations at `meta_variation_rate(s)`; `meta_identities` "train": held-out images
         of training identities, "heldout": new identities (neither train nor test), for an
         open-set meta objective
  test   `test_ids_per_group` new identities per group (disjoint from training)
Test pairs (`test_pairs`): per group, genuine and same-group impostor pairs; per
variation, pairs of one image with that variation against a clean one; clean-clean; with
`group_variation_pairs` also each group x variation cell ("group<g>_<variation>").
"""

import dataclasses
import functools

import numpy as np

from face_jax import mvcom
from face_jax.data import variations

SPLITS = {"train": 1, "meta": 2, "test": 3}
_SALT = {"code": 11, "count": 12, "groups": 13, "render": 14, "meta_ids": 15, "pairs": 16, "tint": 17,
         "hard": 18, "degree": 19, "nuisance": 20}
META_IDENTITIES = ("train", "heldout")


def _rng(*keys) -> np.random.Generator:
  return np.random.default_rng([int(k) for k in keys])


def _cosine_basis(size: int, frequencies: int) -> np.ndarray:
  """(k, size, size) cosine basis, x-frequencies even (symmetric), unit RMS each."""
  grid = (np.arange(size) + 0.5) / size
  out = []
  for v in range(frequencies):
    for u in range(frequencies):
      f = np.cos(np.pi * v * grid)[:, None] * np.cos(np.pi * 2 * u * grid)[None, :]
      out.append(f / np.sqrt(np.mean(f ** 2)))
  return np.stack(out)


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Verification pairs of test images: indices into the test split."""
  a: np.ndarray        # (n,) int
  b: np.ndarray        # (n,) int
  issame: np.ndarray   # (n,) bool


class SyntheticFaces:
  """The biased synthetic face world of one seed; see the module docstring.

  `cfg` is `config.data` (configs/mvcom.py lists every field with its meaning).
  """

  def __init__(self, cfg, seed: int):
    self.cfg, self.seed = cfg, int(seed)
    self.num_groups = len(cfg.group_fractions)
    for name in ("group_spread", "group_specificity", "hard_fraction"):
      if len(cfg[name]) != self.num_groups:
        raise ValueError(f"data.{name} needs one entry per group ({self.num_groups})")
    for name in ("train_variation_rates", "meta_variation_rates"):
      rates = cfg[name]
      if len(rates) and (len(rates) != self.num_groups or
                         any(len(r) != len(variations.VARIATIONS) for r in rates)):
        raise ValueError(f"data.{name} needs one ({', '.join(variations.VARIATIONS)}) rate "
                         f"triple per group ({self.num_groups}), got {tuple(rates)}")
    if cfg.meta_identities not in META_IDENTITIES:
      raise ValueError(f"data.meta_identities={cfg.meta_identities!r}; known: {META_IDENTITIES}")
    c, k, d = cfg.channels, cfg.frequencies ** 2, cfg.code_dim
    self.basis = _cosine_basis(cfg.image_size, cfg.frequencies).reshape(k, -1).astype(np.float32)
    self.mixing = self._group_mixing(_SALT["groups"], c * k, d)
    # The nuisance's render matrices: the same group structure, their own streams.
    nd = int(cfg.get("nuisance_dim", 0))
    self.nuisance_mixing = self._group_mixing(_SALT["nuisance"], c * k, nd) if nd else []
    self.tints = [_rng(self.seed, _SALT["tint"], g).uniform(-cfg.tint, cfg.tint, c).astype(np.float32)
                  for g in range(self.num_groups)]
    # Training identities: exact group counts, shuffled; variable image counts.
    n = cfg.num_train_ids
    counts = np.floor(np.asarray(cfg.group_fractions) * n).astype(int)
    counts[0] += n - counts.sum()
    if (counts <= 0).any():
      raise ValueError(f"data.group_fractions {tuple(cfg.group_fractions)} leave a group without "
                       f"training identities at num_train_ids={n}")
    self.train_groups = _rng(self.seed, _SALT["groups"], 99).permutation(
        np.repeat(np.arange(self.num_groups), counts))
    by_group = cfg.get("images_per_id_by_group", ())
    if len(by_group) and len(by_group) != self.num_groups:
      raise ValueError(f"data.images_per_id_by_group needs one (lo, hi) per group "
                       f"({self.num_groups}), got {tuple(by_group)}")
    ranges = [tuple(by_group[g]) if len(by_group) else tuple(cfg.images_per_id)
              for g in self.train_groups]
    self.train_counts = np.array([_rng(self.seed, _SALT["count"], i).integers(lo, hi + 1)
                                  for i, (lo, hi) in enumerate(ranges)])
    self.train_starts = np.concatenate([[0], np.cumsum(self.train_counts)])
    self.class_prior = mvcom.class_prior(self.train_counts)
    self.test_groups = np.repeat(np.arange(self.num_groups), cfg.test_ids_per_group)
    meta_counts = np.asarray(cfg.meta_ids_by_group if len(cfg.meta_ids_by_group)
                             else [cfg.meta_ids_per_group] * self.num_groups, int)
    if len(meta_counts) != self.num_groups:
      raise ValueError(f"data.meta_ids_by_group needs one count per group ({self.num_groups})")
    if cfg.meta_identities == "heldout":
      # New identities after the test ids, meta_ids_per_group per group.
      first = n + len(self.test_groups)
      self.meta_groups = np.repeat(np.arange(self.num_groups), meta_counts)
      self.meta_ids = first + np.arange(len(self.meta_groups))
      return
    # Meta identities: a balanced subset of the training identities.
    meta_ids = []
    for g in range(self.num_groups):
      members = np.flatnonzero(self.train_groups == g)
      if len(members) < meta_counts[g]:
        raise ValueError(f"data.meta_ids_per_group / meta_ids_by_group={meta_counts[g]} exceeds the "
                         f"{len(members)} training identities of group {g}")
      meta_ids.append(_rng(self.seed, _SALT["meta_ids"], g).choice(
          members, meta_counts[g], replace=False))
    self.meta_ids = np.concatenate(meta_ids)
    self.meta_groups = self.train_groups[self.meta_ids]

  # --- sizes and identities ------------------------------------------------------------

  @property
  def num_classes(self) -> int:
    return int(self.cfg.num_train_ids)

  def __len__(self):
    return int(self.train_starts[-1])

  def size(self, split: str) -> int:
    if split == "train":
      return len(self)
    if split == "meta":
      return len(self.meta_ids) * self.cfg.meta_images_per_id
    if split == "test":
      return len(self.test_groups) * self.cfg.test_images_per_id
    raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")

  def identities(self, split: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(identity id, group) of examples `idx`; test ids follow the training ids."""
    idx = np.asarray(idx, np.int64)
    if np.any(idx < 0) or np.any(idx >= self.size(split)):
      raise IndexError(f"synthetic faces: {split} index out of range [0, {self.size(split)})")
    if split == "train":
      ident = np.searchsorted(self.train_starts, idx, side="right") - 1
      return ident, self.train_groups[ident]
    if split == "meta":
      j = idx // self.cfg.meta_images_per_id
      return self.meta_ids[j], self.meta_groups[j]
    j = idx // self.cfg.test_images_per_id
    return self.cfg.num_train_ids + j, self.test_groups[j]

  def _same_split_group(self, ident: int, group: int) -> np.ndarray:
    """The identity ids of `ident`'s split with group `group` (its look-alike candidates)."""
    n, t = self.cfg.num_train_ids, len(self.test_groups)
    if ident < n:
      return np.flatnonzero(self.train_groups == group)
    if ident < n + t:
      return n + np.flatnonzero(self.test_groups == group)
    return self.meta_ids[self.meta_groups == group]

  def identity_code(self, ident: int, group: int) -> np.ndarray:
    z = _rng(self.seed, _SALT["code"], ident).normal(size=self.cfg.code_dim)
    hard = _rng(self.seed, _SALT["hard"], ident)
    if hard.random() < self.cfg.hard_fraction[group]:
      others = self._same_split_group(ident, group)
      others = others[others != ident]
      if len(others):
        partner = int(others[hard.integers(len(others))])
        d = float(self.cfg.hard_distance)
        z = np.sqrt(1 - d ** 2) * _rng(self.seed, _SALT["code"], partner).normal(
            size=self.cfg.code_dim) + d * z
    return (z * self.cfg.group_spread[group]).astype(np.float32)

  def variation_rates(self, split: str, group: int) -> tuple[float, ...]:
    """(pose, occlusion, blur) rates of `split` for group `group`."""
    by_group = {"train": self.cfg.train_variation_rates, "meta": self.cfg.meta_variation_rates,
                "test": ()}[split]
    if len(by_group):
      return tuple(float(r) for r in by_group[group])
    rate = {"train": self.cfg.train_variation_rate, "meta": self.cfg.meta_variation_rate,
            "test": self.cfg.test_variation_rate}[split]
    return (float(rate),) * len(variations.VARIATIONS)

  # --- rendering ----------------------------------------------------------------------

  def examples(self, split: str, idx) -> dict[str, np.ndarray]:
    """Renders examples `idx` of `split` -> batch dict of numpy arrays:
    image (b, s, s, c) float32 in about [-1, 1], label (b,) int32 (identity id), group
    (b,) int32, pose / occlusion / blur (b,) int32 in {0, 1}, class_prior (b,) float32."""
    cfg = self.cfg
    idx = np.asarray(idx, np.int64).reshape(-1)
    ident, group = self.identities(split, idx)
    s, c = cfg.image_size, cfg.channels
    codes, flags, degrees, rngs = [], [], [], []
    for i, y, g in zip(idx, ident, group):
      rng = _rng(self.seed, _SALT["render"], SPLITS[split], i)
      codes.append(self.mixing[g] @ self._jittered_code(y, g, rng))
      if self.nuisance_mixing:   # a separate stream: worlds without nuisance stay as they were
        u = _rng(self.seed, _SALT["nuisance"], SPLITS[split], i).normal(
            size=self.nuisance_mixing[g].shape[1]).astype(np.float32)
        codes[-1] = codes[-1] + self.nuisance_mixing[g] @ (cfg.nuisance_scale * u)
      rates = self.variation_rates(split, g)
      flags.append({v: bool(rng.random() < r) for v, r in zip(variations.VARIATIONS, rates)})
      rngs.append(rng)
      if cfg.variation_degrees:   # a separate stream: the flags and images of a world
        u = _rng(self.seed, _SALT["degree"], SPLITS[split], i).uniform(  # without degrees stay
            cfg.degree_min, 1.0, len(variations.VARIATIONS))
        degrees.append({v: float(u[k]) if flags[-1][v] else 0.0
                        for k, v in enumerate(variations.VARIATIONS)})
      else:
        degrees.append(None)
    coef = np.stack(codes).reshape(len(idx), c, -1)                       # (b, c, k)
    field = np.einsum("bck,kp->bpc", coef, self.basis).reshape(len(idx), s, s, c)
    images = np.tanh(cfg.gain * field) + np.stack([self.tints[g] for g in group])[:, None, None]
    out = np.empty((len(idx), s, s, c), np.float32)
    for b, (img, f, deg, rng) in enumerate(zip(images, flags, degrees, rngs)):
      img = variations.apply(img.astype(np.float32), f, rng, cfg, deg)
      out[b] = img + cfg.pixel_noise * rng.normal(size=img.shape)
    in_train = ident < cfg.num_train_ids
    prior = np.where(in_train, self.class_prior[np.minimum(ident, cfg.num_train_ids - 1)], 0.0)
    out = {
        "image": out,
        "label": ident.astype(np.int32),
        "group": group.astype(np.int32),
        **{v: np.array([f[v] for f in flags], np.int32) for v in variations.VARIATIONS},
        "class_prior": prior.astype(np.float32),
    }
    if cfg.variation_degrees:
      out.update({f"{v}_degree": np.array([d[v] for d in degrees], np.float32)
                  for v in variations.VARIATIONS})
    return out

  def _group_mixing(self, salt: int, rows: int, dim: int) -> list[np.ndarray]:
    """Per group, (rows, dim) sqrt(1 - rho_g) shared + sqrt(rho_g) own_g, rho_g the group's
    `group_specificity`; the shared matrix from stream (salt, 0), group g's from (salt, 1 + g)."""
    draw = lambda j: _rng(self.seed, salt, j).normal(size=(rows, dim)) / np.sqrt(dim)
    shared, out = draw(0), []
    for g in range(self.num_groups):
      rho = float(self.cfg.group_specificity[g])
      out.append((np.sqrt(1 - rho) * shared + np.sqrt(rho) * draw(1 + g)).astype(np.float32))
    return out

  def _jittered_code(self, y: int, g: int, rng: np.random.Generator) -> np.ndarray:
    """Identity y's code with the image's jitter: the render stream `rng`'s first draw."""
    return self.identity_code(y, g) + self.cfg.jitter * rng.normal(
        size=self.cfg.code_dim).astype(np.float32)

  def latent_codes(self, split: str, idx) -> np.ndarray:
    """(b, code_dim) identity code + jitter of examples `idx`: what the renderer draws
    from, before the group's render matrix, variations and pixel noise. Verification on
    these codes bounds what any embedding can reach from identity alone."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    ident, group = self.identities(split, idx)
    return np.stack([self._jittered_code(y, g, _rng(self.seed, _SALT["render"], SPLITS[split], i))
                     for i, y, g in zip(idx, ident, group)])

  def example(self, split: str, i: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.examples(split, [i]).items()}

  # --- test pairs ---------------------------------------------------------------------

  @functools.cached_property
  def test_set(self) -> dict[str, np.ndarray]:
    """All test images rendered once (they are few)."""
    return self.examples("test", np.arange(self.size("test")))

  def test_pairs(self) -> dict[str, Pairs]:
    """Cells of `pairs_per_cell` pairs (half genuine): 'group<g>', each variation, 'clean'."""
    n = self.cfg.pairs_per_cell
    meta = {k: v for k, v in self.test_set.items() if k != "image"}
    ident, group = meta["label"], meta["group"]
    clean = (meta["pose"] == 0) & (meta["occlusion"] == 0) & (meta["blur"] == 0)
    cells = {f"group{g}": (group == g, group == g) for g in range(self.num_groups)}
    for v in variations.VARIATIONS:
      cells[v] = (meta[v] == 1, clean)
    cells["clean"] = (clean, clean)
    if self.cfg.group_variation_pairs:
      for g in range(self.num_groups):
        for v in variations.VARIATIONS:
          cells[f"group{g}_{v}"] = ((group == g) & (meta[v] == 1), (group == g) & clean)
    out = {}
    for c_i, (name, (mask_a, mask_b)) in enumerate(cells.items()):
      rng = _rng(self.seed, _SALT["pairs"], c_i)
      out[name] = _sample_pairs(rng, ident, group, mask_a, mask_b, n)
    return out


def _sample_pairs(rng, ident, group, mask_a, mask_b, n) -> Pairs:
  """n/2 genuine pairs (same identity, a from mask_a, b from mask_b, a != b) and n/2
  impostor pairs (different identities of the same group), in random order."""
  cand_a = np.flatnonzero(mask_a)
  by_id_b: dict[int, list] = {}
  for i in np.flatnonzero(mask_b):
    by_id_b.setdefault(int(ident[i]), []).append(i)
  by_group_b: dict[int, list] = {}
  for i in np.flatnonzero(mask_b):
    by_group_b.setdefault(int(group[i]), []).append(i)
  genuine_a = [i for i in cand_a if any(j != i for j in by_id_b.get(int(ident[i]), []))]
  if not genuine_a:
    raise ValueError("synthetic faces: a pair cell has no genuine pairs; raise test_images_per_id "
                     "or the test variation rate")
  a, b, same = [], [], []
  while len(a) < n // 2:
    i = genuine_a[rng.integers(len(genuine_a))]
    opts = [j for j in by_id_b[int(ident[i])] if j != i]
    a.append(i); b.append(opts[rng.integers(len(opts))]); same.append(True)
  while len(a) < n:
    i = cand_a[rng.integers(len(cand_a))]
    opts = by_group_b.get(int(group[i]), [])
    if not opts:
      continue
    j = opts[rng.integers(len(opts))]
    if ident[j] == ident[i]:
      continue
    a.append(i); b.append(j); same.append(False)
  order = rng.permutation(n)
  return Pairs(np.asarray(a)[order], np.asarray(b)[order], np.asarray(same)[order])
