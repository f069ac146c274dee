"""Visual entailment data: shapes-world hypotheses and the official SNLI-VE JSON.

Labels use the official VE ids (`dataset/ve_dataset.py`): contradiction 0, neutral 1,
entailment 2.

Shapes world (no files): example i of a split is a pure function of
(shapes.seed, split, i). It shows shapes image i // 3 of that split and carries a
hypothesis whose label is i % 3, so every image gets one hypothesis of each label
(labels are balanced and the image, not the text's prior, decides between
entailment and contradiction). Hypotheses are written from the scene graph:

  kind        entailment (true)                  contradiction (false)
  object      there is a small red circle        there is a small green circle
  count       there are three shapes             there are two shapes
  relation    a red circle is left of a star...  a red circle is right of a star...
  background  the background is striped          the background is checkered
  neutral     the red circle is made of wood     (label 1: the image cannot show it)

A false "object" hypothesis names a (colour, shape) the image holds in no size, drawn
from the pairs training shows, so neither a held-out pair nor the colour alone gives it
away; a false count is another count in the world's range; a false relation reverses a
true one and is checked against every pair of objects the descriptions match.
Neutral hypotheses talk about a present object (by its unique referring phrase) or the
picture, with words the image cannot decide (material, weight, history).

  src = ShapesEntailment(data_cfg, "train", num_images=2000)
  ex = src[i]  # {"image": uint8 HWC, "hypothesis": str, "label": int, "kind": str,
               #  "index": i}
  src.labels   # (len,) int32, without rendering images

SNLI-VE (`VeJsonSource`): the official files are a JSON list of
`{"image": flickr id, "sentence": str, "label": "entailment"|"neutral"|"contradiction"}`
(the image is `<image_root>/<id>.jpg`; a name with an image suffix is kept); JSON lines
with the same keys are read too. Every error names the file and the line of the record.
"""

import os
from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax.data import captions as captions_lib
from simla_jax.data import json_records
from simla_jax.data import shapes

LABELS = ("contradiction", "neutral", "entailment")   # official ids 0, 1, 2
CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2
KINDS = ("object", "count", "relation", "background", "neutral")
ENTAILMENT_STREAM = 2   # seed word: hypotheses never perturb the image's own draws
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Relation of a to b by strict box separation; `_OPPOSITE` reverses it.
_RELATIONS = ("left of", "right of", "above", "below")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Properties no picture of a flat coloured shape can show.
_NEUTRAL_OBJECT = (
    ("is made of", ("wood", "metal", "glass", "paper", "plastic", "stone")),
    ("is", ("heavy", "warm", "cold", "soft", "expensive", "fragile")),
    ("was drawn by", ("a child", "an artist", "a robot", "a teacher")),
)
_NEUTRAL_PICTURE = ("the picture was made", ("yesterday", "last year", "in winter",
                                             "at night", "by a child"))


def vocabulary() -> list[str]:
  """Words the hypotheses use beyond the shapes world's caption vocabulary (sorted)."""
  words = {"there", "is", "are", "a", "an", "the", "shape", "shapes", "background", "of",
           "picture", "was", "made"}
  words |= {w for r in _RELATIONS for w in r.split()}
  for verb, values in _NEUTRAL_OBJECT:
    words |= set(verb.split()) | {w for v in values for w in v.split()}
  words |= set(_NEUTRAL_PICTURE[0].split()) | {w for v in _NEUTRAL_PICTURE[1] for w in v.split()}
  return sorted(words - set(shapes.vocabulary(None)))


# --------------------------------------------------------------------------- scene logic
def _describe(obj: Mapping[str, Any], with_size: bool) -> dict[str, str | None]:
  return {"size": obj["size"] if with_size else None, "colour": obj["colour"],
          "shape": obj["shape"]}


def _phrase(desc: Mapping[str, str | None]) -> str:
  words = [w for w in (desc["size"], desc["colour"], desc["shape"]) if w]
  return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def matches(obj: Mapping[str, Any], desc: Mapping[str, str | None]) -> bool:
  """Whether an object fits a description (size None = any size)."""
  return (obj["colour"] == desc["colour"] and obj["shape"] == desc["shape"]
          and desc["size"] in (None, obj["size"]))


def holds(relation: str, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """`a <relation> b` by strict separation of the boxes (x0, y0, x1, y1), as captions use."""
  (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
  return {"left of": ax1 <= bx0, "right of": bx1 <= ax0,
          "above": ay1 <= by0, "below": by1 <= ay0}[relation]


def relation_is_true(objects: Sequence[Mapping[str, Any]], da, relation: str, db) -> bool:
  """Some object matching `da` stands in `relation` to another matching `db`."""
  return any(holds(relation, a, b) for i, a in enumerate(objects) if matches(a, da)
             for j, b in enumerate(objects) if j != i and matches(b, db))


def _object(objects, truth: bool, rng, seen_pairs) -> str | None:
  obj = objects[int(rng.integers(len(objects)))]
  with_size = bool(rng.random() < 0.5)
  if truth:
    return f"there is {_phrase(_describe(obj, with_size))}"
  present = {(o["colour"], o["shape"]) for o in objects}
  colours = [c for c in shapes.COLOURS if (c, obj["shape"]) in seen_pairs
             and (c, obj["shape"]) not in present]
  if not colours:
    return None
  desc = dict(_describe(obj, with_size), colour=colours[int(rng.integers(len(colours)))])
  return f"there is {_phrase(desc)}"


def _count(objects, truth: bool, rng, max_objects: int) -> str:
  n = len(objects)
  if not truth:
    others = [k for k in range(1, max_objects + 1) if k != n]
    n = others[int(rng.integers(len(others)))]
  return f"there {'is' if n == 1 else 'are'} {shapes.NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"


def _relation(objects, truth: bool, rng) -> str | None:
  pairs = [(i, j, r) for i in range(len(objects)) for j in range(len(objects)) if i != j
           for r in _RELATIONS if holds(r, objects[i], objects[j])]
  order = rng.permutation(len(pairs))
  for k in order:
    i, j, relation = pairs[int(k)]
    da = _describe(objects[i], bool(rng.random() < 0.5))
    db = _describe(objects[j], bool(rng.random() < 0.5))
    if not truth:
      relation = _OPPOSITE[relation]
      if relation_is_true(objects, da, relation, db):   # another matching pair makes it true
        continue
    return f"{_phrase(da)} is {relation} {_phrase(db)}"
  return None


def _background(texture: str, truth: bool, rng) -> str:
  if not truth:
    others = [t for t in shapes.TEXTURES if t != texture]
    texture = others[int(rng.integers(len(others)))]
  return f"the background is {texture}"


def _neutral(objects, rng) -> str:
  if rng.random() < 0.2:
    prefix, values = _NEUTRAL_PICTURE
    return f"{prefix} {values[int(rng.integers(len(values)))]}"
  obj = objects[int(rng.integers(len(objects)))]
  verb, values = _NEUTRAL_OBJECT[int(rng.integers(len(_NEUTRAL_OBJECT)))]
  return f"{obj['phrase']} {verb} {values[int(rng.integers(len(values)))]}"


def hypothesis(example: Mapping[str, Any], label: int, rng: np.random.Generator, *,
               max_objects: int, seen_pairs) -> tuple[str, str]:
  """(hypothesis, kind) of `label` for one shapes example (its scene graph)."""
  objects, texture = example["objects"], example["background"]
  if label == NEUTRAL:
    return _neutral(objects, rng), "neutral"
  truth = label == ENTAILMENT
  kinds = list(KINDS[:4])
  for k in rng.permutation(len(kinds)):   # a kind the scene cannot support is skipped
    kind = kinds[int(k)]
    if kind == "object":
      text = _object(objects, truth, rng, seen_pairs)
    elif kind == "count":
      text = _count(objects, truth, rng, max_objects)
    elif kind == "relation":
      text = _relation(objects, truth, rng)
    else:
      text = _background(texture, truth, rng)
    if text is not None:
      return text, kind
  raise AssertionError("the count and background kinds always apply")


class ShapesEntailment:
  """Random-access source of shapes-world entailment examples (see module doc)."""

  def __init__(self, data_cfg: Any, split: str, num_images: int | None = None):
    self.source = shapes.ShapesSource(data_cfg, split)
    n = len(self.source) if num_images is None else int(num_images)
    if not 0 < n <= len(self.source):
      raise ValueError(f"shapes entailment: {n} images requested, the {split!r} split has "
                       f"{len(self.source)} (shapes.{split}_size)")
    self.num_images = n
    self.seed = self.source.seed
    self.split = split
    self.seen_pairs = set(self.source.seen_pairs)
    self.labels = np.arange(3 * n, dtype=np.int32) % 3

  def __len__(self) -> int:
    return 3 * self.num_images

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"shapes entailment {self.split}: index {index} out of range "
                       f"[0, {len(self)})")
    image_index, label = divmod(index, 3)
    ex = self.source[image_index]
    rng = np.random.default_rng([self.seed, shapes.SPLITS[self.split], image_index,
                                 ENTAILMENT_STREAM, label])
    text, kind = hypothesis(ex, label, rng, max_objects=self.source.max_objects,
                            seen_pairs=self.seen_pairs)
    return {"image": ex["image"], "hypothesis": text, "label": label, "kind": kind,
            "index": index}


# --------------------------------------------------------------------------- SNLI-VE
def read_ve_file(path: str) -> list[dict[str, Any]]:
  """Parses and validates one VE file; records {image, sentence, label, file, line}."""
  text = json_records.read_text(path, "ve")
  records = []
  for line, r in json_records.raw_records(path, text, "ve"):
    where = f"ve: {path} line {line}"
    if not isinstance(r, dict):
      raise ValueError(f"{where}: a record must be a JSON object, found {type(r).__name__}")
    image = r.get("image")
    if isinstance(image, int):   # flickr ids are sometimes stored as numbers
      image = str(image)
    if not isinstance(image, str) or not image:
      raise ValueError(f"{where}: needs a non-empty 'image' (flickr id or file name)")
    if not isinstance(r.get("sentence"), str) or not r["sentence"].strip():
      raise ValueError(f"{where}: needs a non-empty string 'sentence'")
    if r.get("label") not in LABELS:
      raise ValueError(f"{where}: label {r.get('label')!r} is not one of {', '.join(LABELS)}")
    records.append({"image": image, "sentence": r["sentence"],
                    "label": LABELS.index(r["label"]), "file": path, "line": line})
  if not records:
    raise ValueError(f"ve: {path} holds no records")
  return records


class VeJsonSource:
  """Random-access source over official VE files (see module doc).

  check_images: look for every distinct image file now, so a missing one stops the
  run before training with the file and line that names it.
  """

  def __init__(self, files: Sequence[str] | str, image_root: str = "", *,
               check_images: bool = True):
    files = [files] if isinstance(files, str) else list(files)
    if not files:
      raise ValueError("ve: no JSON files given")
    self.files = files
    self.image_root = image_root
    self.records = [r for f in files for r in read_ve_file(f)]
    self.labels = np.array([r["label"] for r in self.records], np.int32)
    if check_images:
      seen = set()
      for r in self.records:
        path = self.image_path(r)
        if path not in seen:
          seen.add(path)
          if not os.path.isfile(path):
            raise captions_lib.BadImageError(
                f"ve: image file {path} does not exist ({r['file']} line {r['line']})")

  def image_path(self, record: Mapping[str, Any]) -> str:
    name = record["image"]
    if not name.lower().endswith(IMAGE_SUFFIXES):
      name += ".jpg"   # the official dataset appends '.jpg' to the flickr id
    return os.path.join(self.image_root, name)

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return f"VeJsonSource(files={self.files!r}, len={len(self)})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self.records):
      raise IndexError(f"ve: index {index} out of range [0, {len(self.records)})")
    r = self.records[index]
    image = captions_lib.decode_image(self.image_path(r), origin=f"{r['file']} line {r['line']}")
    return {"image": image, "hypothesis": r["sentence"], "label": r["label"], "kind": "",
            "index": index}
