"""Shapes world: a procedural image-caption dataset that needs no files.

Example `i` of split `s` is a pure function of `(config.shapes.seed, s, i)`: a numpy
Generator seeded with that triple places 1-4 coloured shapes on a textured, noisy
background and writes several captions that mention every object (attributes,
counts, spatial relations, positions, background), so image-text retrieval is
learnable yet captions of different images rarely coincide.

World: 8 colours x 8 shapes x 2 sizes, objects in distinct cells of a `grid` x `grid`
layout (so they never overlap), 4 background textures. Some (colour, shape) pairs
(`config.shapes.holdout_pairs`) never occur in the `train`, `val` or `test` splits.
Two splits test compositional generalisation: every image of `comp` contains at least
one held-out pair (next to seen ones), every object of every `strict` image is a
held-out pair, so nothing in a `strict` image was seen as a colour-shape unit in
training. `minimal_pair(example)` turns an image into a 2-way choice: a caption listing
its objects and a foil with one colour or shape swapped. Splits draw from disjoint
random streams (the split code is part of the seed), so no image is shared between
splits.

Usage:
  src = ShapesSource(data_config, "train")   # grain random-access source
  ex = src[7]
  ex["image"]     (H, W, 3) uint8 RGB
  ex["captions"]  list of `captions_per_image` str
  ex["boxes"]     (n, 4) int32 (x0, y0, x1, y1) in pixels; x1, y1 exclusive
  ex["phrases"]   list of n referring phrases ("the small red circle"), unique per image
  ex["objects"]   list of n dicts {colour, shape, size, position, box, phrase, keywords}
  ex["keywords"]  sorted list of the image's attribute words
  ex["background"] texture word; ex["index"] = i; ex["split"] = s
`vocabulary(data_config)` lists every word a caption (or its left/right-flipped
twin) can contain, for the tokenizer.
"""

from typing import Any, Mapping, Sequence

import numpy as np

# The world's fixed vocabulary of attributes. RGB values are the colours' centres;
# `shapes.colour_jitter` perturbs them per object.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 90, 230),
    "yellow": (235, 215, 45),
    "purple": (150, 65, 200),
    "orange": (245, 135, 35),
    "cyan": (50, 210, 220),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "checkered", "shaded")
SPLITS = {"train": 0, "val": 1, "test": 2, "comp": 3, "strict": 4}  # split -> random-stream code
MINIMAL_PAIR_STREAM = 1  # extra seed word: a minimal pair's swap never perturbs the image
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words the caption templates use besides attributes, numbers and positions.
_TEMPLATE_WORDS = ("a", "an", "the", "and", "of", "image", "picture", "shape", "shapes",
                   "left", "right", "above", "below", "at", "on", "in", "background",
                   "there", "is", "are", "with")
_POSITION_WORDS = ("top", "bottom", "left", "right", "center")
# (row third, column third) -> (preposition, position phrase).
_POSITIONS = {
    (0, 0): ("at the", "top left"), (0, 1): ("at the", "top"), (0, 2): ("at the", "top right"),
    (1, 0): ("on the", "left"), (1, 1): ("in the", "center"), (1, 2): ("on the", "right"),
    (2, 0): ("at the", "bottom left"), (2, 1): ("at the", "bottom"),
    (2, 2): ("at the", "bottom right"),
}


def _parse_pairs(pairs: Sequence[str]) -> set[tuple[str, str]]:
  out = set()
  for p in pairs:
    colour, _, shape = p.partition(" ")
    if colour not in COLOURS or shape not in SHAPES:
      raise ValueError(f"shapes.holdout_pairs: {p!r} is not '<colour> <shape>' with colour in "
                       f"{sorted(COLOURS)} and shape in {SHAPES}")
    out.add((colour, shape))
  return out


def vocabulary(data_config: Any) -> list[str]:
  """Every word the shapes world can write (sorted), including flipped captions."""
  del data_config  # the vocabulary does not depend on sizes or seeds
  words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(TEXTURES) | set(NUMBER_WORDS)
  words |= set(_TEMPLATE_WORDS) | set(_POSITION_WORDS)
  for prep, pos in _POSITIONS.values():
    words |= set(prep.split()) | set(pos.split())
  return sorted(words)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of a unit shape on normalised coordinates (u right, v down).

  u, v: arrays of equal shape, pixel centres relative to the object centre divided
  by its radius; the shape fits in the unit disc.
  """
  au, av = np.abs(u), np.abs(v)
  if shape == "circle":
    return u * u + v * v <= 1.0
  if shape == "square":
    return np.maximum(au, av) <= 0.8
  if shape == "triangle":  # apex up at v=-1, base at v=0.75
    return (v <= 0.75) & (au <= 0.95 * (v + 1.0) / 1.75)
  if shape == "diamond":
    return au + av <= 1.0
  if shape == "star":  # five points: radius 1 at the tips, 0.42 in the notches
    rho = np.sqrt(u * u + v * v)
    phase = (np.arctan2(v, u) + np.pi / 2) * 5 / (2 * np.pi)
    tri = np.abs(2 * (phase - np.floor(phase + 0.5)))  # 0 at tips, 1 at notches
    return rho <= 1.0 - 0.58 * tri
  if shape == "cross":
    return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
  if shape == "hexagon":  # flat top, vertices at (+-1, 0)
    return (av <= np.sqrt(3) / 2) & (np.sqrt(3) * au + av <= np.sqrt(3))
  if shape == "ring":
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
  raise ValueError(f"unknown shape {shape!r}")


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: Mapping[str, Any], with_size: bool) -> str:
  words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
  return f"{_article(words[0])} {' '.join(words)}"


def _join(items: Sequence[str]) -> str:
  if len(items) == 1:
    return items[0]
  return ", ".join(items[:-1]) + " and " + items[-1]


class ShapesSource:
  """Random-access source (`len`, `[i]`) of one split of the shapes world.

  data_config: the `config.data` ConfigDict (`image_size` and the `shapes` block).
  split: one of "train", "val", "test", "comp", "strict".
  """

  def __init__(self, data_config: Any, split: str):
    if split not in SPLITS:
      raise ValueError(f"shapes: unknown split {split!r}; expected one of {sorted(SPLITS)}")
    c = data_config.shapes
    self.split = split
    self.image_size = int(data_config.image_size)
    self.seed = int(c.seed)
    if f"{split}_size" not in c:
      raise ValueError(f"shapes: config.data.shapes has no {split}_size")
    self.length = int(c[f"{split}_size"])
    self.min_objects, self.max_objects = (int(n) for n in c.num_objects)
    self.captions_per_image = int(c.captions_per_image)
    self.max_caption_words = int(c.max_caption_words)
    self.grid = int(c.grid)
    self.radius_frac = {"small": float(c.small_radius), "large": float(c.large_radius)}
    self.colour_jitter = int(c.colour_jitter)
    self.background_range = tuple(int(b) for b in c.background_range)
    self.texture_amplitude = float(c.texture_amplitude)
    self.noise_std = float(c.noise_std)
    if not 1 <= self.min_objects <= self.max_objects <= self.grid ** 2:
      raise ValueError(f"shapes.num_objects {tuple(c.num_objects)} must satisfy "
                       f"1 <= min <= max <= grid**2 = {self.grid ** 2}")
    if self.max_objects >= len(NUMBER_WORDS):
      raise ValueError(f"shapes.num_objects: at most {len(NUMBER_WORDS) - 1} objects")
    if max(self.radius_frac.values()) > 0.5:
      raise ValueError("shapes.small_radius / large_radius are fractions of a grid cell, <= 0.5")
    self.holdout = _parse_pairs(c.holdout_pairs)
    all_pairs = [(col, sh) for col in COLOURS for sh in SHAPES]
    self.seen_pairs = [p for p in all_pairs if p not in self.holdout]
    self.holdout_list = sorted(self.holdout)
    if split in ("comp", "strict") and not self.holdout_list:
      raise ValueError(f"shapes: the {split!r} split needs shapes.holdout_pairs")
    ys, xs = np.mgrid[0:self.image_size, 0:self.image_size]
    self._xs = xs.astype(np.float32) + 0.5  # pixel centres
    self._ys = ys.astype(np.float32) + 0.5

  def __len__(self) -> int:
    return self.length

  def __repr__(self) -> str:
    return f"ShapesSource(split={self.split!r}, len={self.length}, size={self.image_size})"

  def rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, SPLITS[self.split], int(index)])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.length:
      raise IndexError(f"shapes {self.split}: index {index} out of range [0, {self.length})")
    rng = self.rng(index)
    objects = self._sample_objects(rng)
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    image = self._render(objects, texture, rng)
    for k, obj in enumerate(objects):
      obj["phrase"] = self._referring_phrase(obj, objects)
      obj["keywords"] = [obj["size"], obj["colour"], obj["shape"]]
      del obj["centre"], obj["radius"], obj["rgb"]
      obj["id"] = k
    captions = self._captions(objects, texture, rng)
    return {
        "image": image,
        "captions": captions,
        "boxes": np.array([o["box"] for o in objects], np.int32).reshape(-1, 4),
        "phrases": [o["phrase"] for o in objects],
        "objects": objects,
        "keywords": sorted({w for o in objects for w in o["keywords"]}),
        "background": texture,
        "index": index,
        "split": self.split,
    }

  # -- scene -----------------------------------------------------------------------
  def _sample_objects(self, rng: np.random.Generator) -> list[dict[str, Any]]:
    n = int(rng.integers(self.min_objects, self.max_objects + 1))
    cells = rng.choice(self.grid ** 2, size=n, replace=False)
    cell = self.image_size / self.grid
    objects = []
    for k, c in enumerate(cells):
      if (self.split == "comp" and k == 0) or self.split == "strict":  # unseen combinations
        colour, shape = self.holdout_list[rng.integers(len(self.holdout_list))]
      else:
        colour, shape = self.seen_pairs[rng.integers(len(self.seen_pairs))]
      size = SIZES[rng.integers(len(SIZES))]
      r = self.radius_frac[size] * cell
      row, col = divmod(int(c), self.grid)
      # Centre uniform inside the cell with the shape fully in it (>= 0.5 px margin).
      lo = np.array([col * cell, row * cell]) + r + 0.5
      hi = np.array([(col + 1) * cell, (row + 1) * cell]) - r - 0.5
      centre = lo + (hi - lo) * rng.random(2)
      jitter = rng.integers(-self.colour_jitter, self.colour_jitter + 1, size=3)
      rgb = np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)
      third_row = min(int(3 * centre[1] / self.image_size), 2)
      third_col = min(int(3 * centre[0] / self.image_size), 2)
      objects.append(dict(colour=colour, shape=shape, size=size, centre=centre, radius=r,
                          rgb=rgb, position=_POSITIONS[(third_row, third_col)]))
    return objects

  def _render(self, objects, texture: str, rng: np.random.Generator) -> np.ndarray:
    s = self.image_size
    lo_bg, hi_bg = self.background_range
    base = rng.integers(lo_bg, hi_bg + 1) + rng.integers(-8, 9, size=3)  # grey with a tint
    amp = self.texture_amplitude
    if texture == "plain":
      tex = np.zeros((s, s), np.float32)
    elif texture == "striped":
      angle = rng.random() * np.pi
      period = s / rng.uniform(4, 8)
      phase = self._xs * np.cos(angle) + self._ys * np.sin(angle)
      tex = amp * np.sin(2 * np.pi * phase / period)
    elif texture == "checkered":
      cell = s / int(rng.integers(4, 9))
      tex = amp * (2 * ((np.floor(self._xs / cell) + np.floor(self._ys / cell)) % 2) - 1)
    else:  # shaded: a linear ramp in a random direction
      angle = rng.random() * 2 * np.pi
      ramp = (self._xs - s / 2) * np.cos(angle) + (self._ys - s / 2) * np.sin(angle)
      tex = amp * 2 * ramp / s
    image = base.astype(np.float32)[None, None, :] + tex.astype(np.float32)[..., None]
    for obj in objects:
      cx, cy = obj["centre"]
      r = obj["radius"]
      x0, x1 = int(np.floor(cx - r)), int(np.ceil(cx + r))
      y0, y1 = int(np.floor(cy - r)), int(np.ceil(cy + r))
      u = (self._xs[y0:y1, x0:x1] - cx) / r
      v = (self._ys[y0:y1, x0:x1] - cy) / r
      m = shape_mask(obj["shape"], u, v)
      image[y0:y1, x0:x1][m] = obj["rgb"]
      ys, xs = np.nonzero(m)
      obj["box"] = (x0 + int(xs.min()), y0 + int(ys.min()),
                    x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= self.noise_std
    image += noise + 0.5  # +0.5 then truncation = rounding
    return np.clip(image, 0, 255, out=image).astype(np.uint8)

  # -- language --------------------------------------------------------------------
  def _referring_phrase(self, obj, objects) -> str:
    same = [o for o in objects if (o["colour"], o["shape"]) == (obj["colour"], obj["shape"])]
    if len(same) == 1:
      return f"the {obj['colour']} {obj['shape']}"
    if sum(o["size"] == obj["size"] for o in same) == 1:
      return f"the {obj['size']} {obj['colour']} {obj['shape']}"
    prep, pos = obj["position"]
    return f"the {obj['size']} {obj['colour']} {obj['shape']} {prep} {pos}"

  def _captions(self, objects, texture: str, rng: np.random.Generator) -> list[str]:
    templates = (self._cap_list, self._cap_count, self._cap_spatial, self._cap_position,
                 self._cap_background)
    order = rng.permutation(len(templates))
    captions = []
    for k in range(self.captions_per_image):
      template = templates[order[k % len(templates)]]
      with_size = rng.random(len(objects)) < 0.75
      perm = rng.permutation(len(objects))
      caption = template(objects, texture, with_size, perm, rng)
      if len(caption.replace(",", " ").split()) > self.max_caption_words:
        caption = template(objects, texture, np.zeros_like(with_size), perm, rng)
      captions.append(caption)
    return captions

  @staticmethod
  def _phrases(objects, with_size, perm):
    return [_noun_phrase(objects[i], bool(with_size[i])) for i in perm]

  def _cap_list(self, objects, texture, with_size, perm, rng):
    prefix = ("", "an image of ", "a picture of ")[rng.integers(3)]
    return prefix + _join(self._phrases(objects, with_size, perm))

  def _cap_count(self, objects, texture, with_size, perm, rng):
    n = len(objects)
    head = f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"
    if rng.random() < 0.5:
      head = f"there {'is' if n == 1 else 'are'} {head}"
    return head + ": " + _join(self._phrases(objects, with_size, perm))

  def _cap_spatial(self, objects, texture, with_size, perm, rng):
    """Objects chained along one axis: 'a red circle left of a blue star above ...'."""
    if len(objects) == 1:
      prep, pos = objects[0]["position"]
      return f"{_noun_phrase(objects[0], bool(with_size[0]))} {prep} {pos} of the image"
    horizontal = rng.random() < 0.5
    reverse = rng.random() < 0.5
    axis = 0 if horizontal else 1
    order = sorted(range(len(objects)),
                   key=lambda i: objects[i]["box"][axis] + objects[i]["box"][axis + 2])
    if reverse:
      order = order[::-1]
    words = [_noun_phrase(objects[order[0]], bool(with_size[order[0]]))]
    for a, b in zip(order[:-1], order[1:]):
      words += [self._relation(objects[a], objects[b]),
                _noun_phrase(objects[b], bool(with_size[b]))]
    return " ".join(words)

  @staticmethod
  def _relation(a, b) -> str:
    """Relation of `a` to `b` from their boxes: strict separation on x, else on y."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
    if ax1 <= bx0:
      return "left of"
    if bx1 <= ax0:
      return "right of"
    if ay1 <= by0:
      return "above"
    if by1 <= ay0:
      return "below"
    return "and"

  def _cap_position(self, objects, texture, with_size, perm, rng):
    parts = [f"{_noun_phrase(objects[i], bool(with_size[i]))} {' '.join(objects[i]['position'])}"
             for i in perm]
    return _join(parts)

  def _cap_background(self, objects, texture, with_size, perm, rng):
    return f"{_join(self._phrases(objects, with_size, perm))} on {_article(texture)} {texture} background"


def minimal_pair(example: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
  """A 2-way caption choice for one shapes example: the truth and a one-word foil.

  caption: every object as "a <size> <colour> <shape>" joined in object order; foil: the
  same caption with the colour or the shape (coin flip) of one object replaced by a
  value that makes a (size, colour, shape) the image does not contain, so the foil is
  false. Deterministic in (seed, split, index). Returns {caption, foil, attribute,
  object}; attribute is "colour" | "shape".
  """
  objects = example["objects"]
  rng = np.random.default_rng([seed, SPLITS[example["split"]], int(example["index"]),
                               MINIMAL_PAIR_STREAM])
  present = {(o["size"], o["colour"], o["shape"]) for o in objects}
  k = int(rng.integers(len(objects)))
  attribute = ("colour", "shape")[rng.integers(2)]
  values = tuple(COLOURS) if attribute == "colour" else SHAPES
  swapped = [dict(objects[k], **{attribute: v}) for v in values if v != objects[k][attribute]]
  swapped = [o for o in swapped if (o["size"], o["colour"], o["shape"]) not in present]
  foil_object = swapped[int(rng.integers(len(swapped)))]
  phrase = lambda objs: _join([_noun_phrase(o, True) for o in objs])
  return {"caption": phrase(objects),
          "foil": phrase([foil_object if i == k else o for i, o in enumerate(objects)]),
          "attribute": attribute, "object": k}
