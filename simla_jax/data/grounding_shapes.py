"""Shapes-world referring expressions with box proposals: weakly-supervised grounding.

Each shapes-world image (`simla_jax.data.shapes.ShapesSource`) knows its objects and
their boxes. For every object (the target) an expression that singles it out is drawn:
  "the red circle", "the small shape", "the large blue square at the top left",
  "the circle left of the small star", "the green shape above the triangle";
the set of objects an expression describes is computed from the scene (attributes,
position word, relation to some object matching the anchor description) and only
expressions describing exactly the target are kept, so each is unique in its scene.

Proposals (the detector's role in RefCOCO+): every object box plus `num_distractors`
random boxes, sized like objects, each with IoU < 0.5 against every object box (so
exactly one proposal is correct), in random order.

  src = GroundingShapes(data_cfg, "val")        # every object of every val image
  ex = src[r]   # {"image", "text", "kind", "proposals" (p, 4) xywh, "truth" (4,) xywh,
                #  "target" index in proposals, "index": r, "image_index", "split"}
  train = GroundingShapesPairs(data_cfg, 2000)   # fine-tuning records of train images:
  train[r]      # {"image", "captions": [expression], "index": r, "image_id": image}

Everything is a pure function of (shapes seed, split, image index, object).
"""

from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax import gradcam
from simla_jax.data import shapes

STREAM = 7   # extra seed word: the expressions never perturb the image's own stream
RELATIONS = ("left of", "right of", "above", "below")
# Attribute subsets an expression may name (the head noun is the shape, else "shape").
ATTRIBUTE_SETS = (("shape",), ("colour", "shape"), ("size", "shape"),
                  ("size", "colour", "shape"), ("colour",), ("size", "colour"))


def related(relation: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Whether object `a` is `relation` object `b`, from boxes (x0, y0, x1, y1), strict."""
  (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
  if relation == "left of":
    return ax1 <= bx0
  if relation == "right of":
    return bx1 <= ax0
  if relation == "above":
    return ay1 <= by0
  if relation == "below":
    return by1 <= ay0
  raise ValueError(f"unknown relation {relation!r}")


def describe(obj: Mapping[str, Any], attributes: Sequence[str]) -> str:
  """Noun phrase without article: 'small red circle', 'red shape'."""
  words = [obj[a] for a in ("size", "colour") if a in attributes]
  return " ".join(words + [obj["shape"] if "shape" in attributes else "shape"])


def _fits(obj, attributes, like) -> bool:
  return all(obj[a] == like[a] for a in attributes)


def referents(objects: Sequence[Mapping[str, Any]], attributes, like, position=None,
              relation=None, anchor_attributes=(), anchor=None) -> list[int]:
  """Indices of the objects an expression describes: those with `like`'s `attributes`,
  at `position` (if given) and `relation` some object with `anchor`'s
  `anchor_attributes` (if given)."""
  out = []
  for i, o in enumerate(objects):
    if not _fits(o, attributes, like):
      continue
    if position is not None and o["position"] != position:
      continue
    if relation is not None and not any(
        j != i and _fits(p, anchor_attributes, anchor) and related(relation, o, p)
        for j, p in enumerate(objects)):
      continue
    out.append(i)
  return out


KINDS = ("attributes", "position", "relation")


def expressions(objects: Sequence[Mapping[str, Any]], target: int) -> dict[str, list[str]]:
  """Every expression that describes exactly object `target`, by kind (KINDS), each list
  in a fixed order without repeats."""
  t = objects[target]
  out = []
  for attrs in ATTRIBUTE_SETS:
    head = describe(t, attrs)
    if referents(objects, attrs, t) == [target]:
      out.append(("attributes", f"the {head}"))
    prep, pos = t["position"]
    if referents(objects, attrs, t, position=t["position"]) == [target]:
      out.append(("position", f"the {head} {prep} {pos}"))
    for j, anchor in enumerate(objects):
      if j == target:
        continue
      for relation in RELATIONS:
        if not related(relation, t, anchor):
          continue
        for anchor_attrs in ATTRIBUTE_SETS:
          if referents(objects, attrs, t, relation=relation, anchor_attributes=anchor_attrs,
                       anchor=anchor) == [target]:
            out.append(("relation",
                        f"the {head} {relation} the {describe(anchor, anchor_attrs)}"))
  return {k: list(dict.fromkeys(t for kind, t in out if kind == k)) for k in KINDS
          if any(kind == k for kind, _ in out)}


def distractor_boxes(rng: np.random.Generator, object_boxes_xyxy: np.ndarray, count: int,
                     image_size: int, max_tries: int = 200) -> np.ndarray:
  """`count` random boxes (x0, y0, x1, y1), sides between 0.6x the smallest and 1.4x the
  largest object side, IoU < 0.5 with every object box (and each other)."""
  boxes = np.asarray(object_boxes_xyxy, np.int64).reshape(-1, 4)
  sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
  lo, hi = max(2, int(0.6 * sides.min())), min(image_size, int(np.ceil(1.4 * sides.max())))
  taken = [tuple(b) for b in boxes]
  out = []
  for _ in range(max_tries):
    if len(out) == count:
      break
    w, h = (int(s) for s in rng.integers(lo, hi + 1, size=2))
    x0, y0 = int(rng.integers(0, image_size - w + 1)), int(rng.integers(0, image_size - h + 1))
    box = (x0, y0, x0 + w, y0 + h)
    xywh = gradcam.xyxy_to_xywh([box])[0]
    if all(gradcam.iou_xywh(xywh, gradcam.xyxy_to_xywh([t])[0]) < 0.5 for t in taken):
      taken.append(box)
      out.append(box)
  return np.array(out, np.int64).reshape(-1, 4)


class GroundingShapes:
  """One record per object of the first `num_images` images of a shapes split."""

  def __init__(self, data_cfg: Any, split: str, num_images: int | None = None):
    self.source = shapes.ShapesSource(data_cfg, split)
    g = data_cfg.grounding
    self.num_distractors = int(g.num_distractors)
    n = len(self.source) if not num_images else int(num_images)
    if not 0 < n <= len(self.source):
      raise ValueError(f"grounding shapes: num_images {n} must be in [1, {len(self.source)}] "
                       f"(shapes {split}_size)")
    self.split, self.seed = split, int(data_cfg.shapes.seed)
    # (image, object) of every record: object counts come from the scene (cheap: no render
    # needed, but the scene draw is the image's, so the image is generated once here).
    self.records = [(i, k) for i in range(n)
                    for k in range(len(self.source[i]["objects"]))]

  def __len__(self) -> int:
    return len(self.records)

  def example(self, image_index: int, target: int) -> dict[str, Any]:
    ex = self.source[image_index]
    rng = np.random.default_rng([self.seed, shapes.SPLITS[self.split], image_index, target,
                                 STREAM])
    # A kind first, then an expression of it: relations would otherwise dominate.
    options = expressions(ex["objects"], target)
    kind = sorted(options)[int(rng.integers(len(options)))]
    text = options[kind][int(rng.integers(len(options[kind])))]
    distractors = distractor_boxes(rng, ex["boxes"], self.num_distractors,
                                   self.source.image_size)
    boxes = np.concatenate([ex["boxes"].astype(np.int64), distractors])
    order = rng.permutation(len(boxes))
    return {"image": ex["image"], "text": text, "kind": kind,
            "proposals": gradcam.xyxy_to_xywh(boxes[order]),
            "truth": gradcam.xyxy_to_xywh(ex["boxes"][target:target + 1])[0],
            "target": int(np.argmax(order == target)), "image_index": image_index,
            "split": self.split}

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"grounding shapes {self.split}: index {index} out of range "
                       f"[0, {len(self)})")
    return dict(self.example(*self.records[index]), index=index)


class GroundingShapesPairs:
  """Fine-tuning records: (train image, one expression per object), image id = image."""

  def __init__(self, data_cfg: Any, num_images: int, split: str = "train"):
    self.grounding = GroundingShapes(data_cfg, split, num_images)

  def __len__(self) -> int:
    return len(self.grounding)

  def __getitem__(self, index: int) -> dict[str, Any]:
    image_index, target = self.grounding.records[int(index)]
    ex = self.grounding.example(image_index, target)
    return {"image": ex["image"], "captions": [ex["text"]], "index": int(index),
            "image_id": image_index}

