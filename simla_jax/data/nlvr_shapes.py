"""Shapes-world NLVR2: statements about a pair of shapes images, true of the pair or not.

Example i of a split is a pure function of (shapes.seed, split, i): it shows shapes
images 2p and 2p + 1 of that split (p = i // 2) as the left and right image, and carries
a statement whose label is i % 2 (1 = true, 0 = false, the official NLVR2 ids), so each
pair gets one true and one false statement and labels are balanced. Statements are
written from the two scene graphs and checked against both:

  kind       example                                           true when
  contains   the left image contains a red square              a red square (any size) is in it
  both       both images contain a blue circle                 it is in each image
  only       only the right image contains a green star        in the right image, not the left
  more       the left image has more shapes than the right     object count left > right
             image
  same       the two images have the same number of shapes     equal counts
  total      there are five shapes in the two images           count left + count right

A statement is drawn (kind, then its colour / shape / side / number) and kept when its
truth is the wanted label; a kind that cannot reach the label within a few draws is
skipped for another one. The colour-shape pairs a statement names are those of the
pair's objects half of the time (else any pair training shows), so both truth values
are reachable for every kind. The statements never use left / right *within* an image,
so "left" and "right" always mean the two images.

  src = ShapesNlvr(data_cfg, "train", num_pairs=1000)
  ex = src[i]  # {"image0", "image1": uint8 HWC, "sentence", "label", "kind", "index"}
  src.labels   # (len,) int32, without rendering images
"""

from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax.data import shapes

KINDS = ("contains", "both", "only", "more", "same", "total")
NLVR_STREAM = 3    # seed word: statements never perturb the images' own draws
SIDES = ("left", "right")
_DRAWS = 20        # draws of a kind before it is skipped


def vocabulary() -> list[str]:
  """Words the statements use beyond the shapes world's caption vocabulary (sorted)."""
  words = {"the", "left", "right", "image", "images", "contains", "contain", "both", "only",
           "has", "have", "more", "shapes", "than", "two", "same", "number", "of", "there",
           "are", "in", "a", "an"}
  words |= set(shapes.NUMBER_WORDS) | set(shapes.COLOURS) | set(shapes.SHAPES)
  return sorted(words - set(shapes.vocabulary(None)))


# --------------------------------------------------------------------------- scene logic
def contains(objects: Sequence[Mapping[str, Any]], colour: str, shape: str) -> bool:
  """Whether some object of an image is a `colour` `shape` (any size)."""
  return any(o["colour"] == colour and o["shape"] == shape for o in objects)


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def truth(kind: str, args: Mapping[str, Any], left, right) -> bool:
  """Whether the statement (kind, args) holds of the pair (left, right object lists)."""
  sides = {"left": left, "right": right}
  if kind == "contains":
    return contains(sides[args["side"]], args["colour"], args["shape"])
  if kind == "both":
    return contains(left, args["colour"], args["shape"]) and contains(right, args["colour"],
                                                                      args["shape"])
  if kind == "only":
    other = "right" if args["side"] == "left" else "left"
    return (contains(sides[args["side"]], args["colour"], args["shape"])
            and not contains(sides[other], args["colour"], args["shape"]))
  if kind == "more":
    other = "right" if args["side"] == "left" else "left"
    return len(sides[args["side"]]) > len(sides[other])
  if kind == "same":
    return len(left) == len(right)
  if kind == "total":
    return len(left) + len(right) == args["number"]
  raise ValueError(f"nlvr shapes: unknown statement kind {kind!r}")


def sentence(kind: str, args: Mapping[str, Any]) -> str:
  """The statement's text."""
  if kind in ("contains", "both", "only"):
    thing = f"{_article(args['colour'])} {args['colour']} {args['shape']}"
    if kind == "contains":
      return f"the {args['side']} image contains {thing}"
    if kind == "both":
      return f"both images contain {thing}"
    return f"only the {args['side']} image contains {thing}"
  if kind == "more":
    other = "right" if args["side"] == "left" else "left"
    return f"the {args['side']} image has more shapes than the {other} image"
  if kind == "same":
    return "the two images have the same number of shapes"
  if kind == "total":
    return f"there are {shapes.NUMBER_WORDS[args['number']]} shapes in the two images"
  raise ValueError(f"nlvr shapes: unknown statement kind {kind!r}")


def _draw_args(kind: str, left, right, rng, seen_pairs, max_objects: int) -> dict[str, Any]:
  args: dict[str, Any] = {"side": SIDES[int(rng.integers(2))]}
  if kind in ("contains", "both", "only"):
    present = [(o["colour"], o["shape"]) for o in list(left) + list(right)]
    pool = present if rng.random() < 0.5 else seen_pairs
    args["colour"], args["shape"] = pool[int(rng.integers(len(pool)))]
  if kind == "total":
    args["number"] = int(rng.integers(2, 2 * max_objects + 1))
  return args


def statement(left, right, label: int, rng: np.random.Generator, *, seen_pairs,
              max_objects: int) -> tuple[str, str]:
  """(sentence, kind) whose truth on (left, right) is `label` (1 true, 0 false)."""
  for k in rng.permutation(len(KINDS)):
    kind = KINDS[int(k)]
    for _ in range(_DRAWS):
      args = _draw_args(kind, left, right, rng, seen_pairs, max_objects)
      if truth(kind, args, left, right) == bool(label):
        return sentence(kind, args), kind
  # Every kind missed (rare): a total count, which reaches either label by construction.
  number = len(left) + len(right)
  if not label:
    others = [k for k in range(2, 2 * max_objects + 1) if k != number]
    number = others[int(rng.integers(len(others)))]
  return sentence("total", {"number": number}), "total"


class ShapesNlvr:
  """Random-access source of shapes-world NLVR2 examples (see module doc)."""

  def __init__(self, data_cfg: Any, split: str, num_pairs: int | None = None):
    self.source = shapes.ShapesSource(data_cfg, split)
    n = len(self.source) // 2 if num_pairs is None else int(num_pairs)
    if not 0 < 2 * n <= len(self.source):
      raise ValueError(f"shapes nlvr: {n} image pairs requested, the {split!r} split has "
                       f"{len(self.source)} images (shapes.{split}_size)")
    self.num_pairs, self.split, self.seed = n, split, self.source.seed
    self.seen_pairs = list(self.source.seen_pairs)
    self.labels = np.arange(2 * n, dtype=np.int32) % 2

  def __len__(self) -> int:
    return 2 * self.num_pairs

  def scenes(self, index: int) -> tuple[dict, dict]:
    pair = int(index) // 2
    return self.source[2 * pair], self.source[2 * pair + 1]

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"shapes nlvr {self.split}: index {index} out of range [0, {len(self)})")
    left, right = self.scenes(index)
    label = index % 2
    rng = np.random.default_rng([self.seed, shapes.SPLITS[self.split], index, NLVR_STREAM])
    text, kind = statement(left["objects"], right["objects"], label, rng,
                           seen_pairs=self.seen_pairs, max_objects=self.source.max_objects)
    return {"image0": left["image"], "image1": right["image"], "sentence": text,
            "label": np.int32(label), "kind": kind, "index": index}
