"""Shapes-world VQA: questions with a closed answer list, answered from the scene graph.

Example i of a split is a pure function of (shapes.seed, split, i): shapes image
i // 5 of that split (`simla_jax.data.shapes`) with a question of kind i % 5, so every
image is asked one question of each kind:

  kind      question                                   answers
  colour    what colour is the large circle            a colour
  shape     what shape is the red object               a shape
  count     how many shapes are there /                zero .. max_objects (number words)
            how many blue shapes are there
  exists    is there a small green star                yes / no (one half each)
  relation  is the red circle left of the blue star    yes / no (one half each)

Objects are named without the attribute asked (colour: by shape, with the size when the
shape repeats; shape: by colour, likewise), and only when that name fits exactly one
object; a "no" existence question names a (colour, shape) the image does not hold,
drawn from the pairs training shows; a "no" relation question reverses a true relation
between two objects named by their unique referring phrases and is kept only when no
pair of objects makes it true. A kind an image cannot support (one object: no
relation; no unique name) falls back to a count question. `ANSWERS` lists every answer
(the closed answer list, `answer_list(max_objects)`).

The truth is exact, so each question carries ten identical "human" answers and the
VQA accuracy (min(#humans / 3, 1)) of an answer is 1 when it is right, else 0.

  src = ShapesVqa(data_cfg, "train", num_images=2000)
  ex = src[i]   # {"image", "question", "answers", "weights", "gt_answers",
                #  "question_id": i, "kind", "index": i}
"""

from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax.data import entailment
from simla_jax.data import shapes

KINDS = ("colour", "shape", "count", "exists", "relation")
VQA_STREAM = 3            # seed word: questions never perturb the image's own draws
HUMAN_ANSWERS = 10        # answers per question in the official VQA annotations
_RELATIONS = ("left of", "right of", "above", "below")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def answer_list(max_objects: int) -> list[str]:
  """The closed answer list: colours, shapes, counts 0..max_objects, yes, no."""
  return (list(shapes.COLOURS) + list(shapes.SHAPES)
          + list(shapes.NUMBER_WORDS[:max_objects + 1]) + ["yes", "no"])


def vocabulary() -> list[str]:
  """Words questions and answers use beyond the shapes world's captions (sorted)."""
  words = {"what", "colour", "shape", "is", "the", "object", "how", "many", "shapes", "are",
           "there", "a", "an", "yes", "no"}
  words |= {w for r in _RELATIONS for w in r.split()}
  return sorted(words - set(shapes.vocabulary(None)))


# --------------------------------------------------------------------------- questions
def _unique_name(objects, obj, attribute: str) -> str | None:
  """`obj` named by `attribute` (with its size when needed), if that fits it alone."""
  same = [o for o in objects if o[attribute] == obj[attribute]]
  if len(same) == 1:
    return obj[attribute]
  if sum(o["size"] == obj["size"] for o in same) == 1:
    return f"{obj['size']} {obj[attribute]}"
  return None


def _colour(objects, rng):
  for k in rng.permutation(len(objects)):
    obj = objects[int(k)]
    name = _unique_name(objects, obj, "shape")
    if name is not None:
      return f"what colour is the {name}", obj["colour"]
  return None


def _shape(objects, rng):
  for k in rng.permutation(len(objects)):
    obj = objects[int(k)]
    name = _unique_name(objects, obj, "colour")
    if name is not None:
      return f"what shape is the {name} object", obj["shape"]
  return None


def _count(objects, rng):
  if rng.random() < 0.5:
    n = len(objects)
    return "how many shapes are there", shapes.NUMBER_WORDS[n]
  # A present colour one half of the time, else any colour (often absent: zero).
  if rng.random() < 0.5:
    colour = objects[int(rng.integers(len(objects)))]["colour"]
  else:
    colour = list(shapes.COLOURS)[int(rng.integers(len(shapes.COLOURS)))]
  n = sum(o["colour"] == colour for o in objects)
  return f"how many {colour} shapes are there", shapes.NUMBER_WORDS[n]


def _exists(objects, rng, seen_pairs):
  if rng.random() < 0.5:
    obj = objects[int(rng.integers(len(objects)))]
    return f"is there a {obj['colour']} {obj['shape']}", "yes"
  present = {(o["colour"], o["shape"]) for o in objects}
  absent = [p for p in sorted(seen_pairs) if p not in present]
  colour, shape = absent[int(rng.integers(len(absent)))]
  return f"is there a {colour} {shape}", "no"


def _relation(objects, rng):
  pairs = [(i, j, r) for i in range(len(objects)) for j in range(len(objects)) if i != j
           for r in _RELATIONS if entailment.holds(r, objects[i], objects[j])]
  truth = bool(rng.random() < 0.5)
  for k in rng.permutation(len(pairs)):
    i, j, relation = pairs[int(k)]
    a, b = objects[i], objects[j]
    if not truth:
      relation = _OPPOSITE[relation]
      if entailment.holds(relation, a, b):
        continue
    # Referring phrases are unique per image, so the question is about exactly this pair.
    return f"is {a['phrase']} {relation} {b['phrase']}", "yes" if truth else "no"
  return None


def question(example: Mapping[str, Any], kind: str, rng: np.random.Generator, *,
             seen_pairs) -> tuple[str, str, str]:
  """(question, answer, kind) of `kind` for one shapes example, or a count question
  when the scene cannot support `kind`."""
  objects = example["objects"]
  qa = None
  if kind == "colour":
    qa = _colour(objects, rng)
  elif kind == "shape":
    qa = _shape(objects, rng)
  elif kind == "exists":
    qa = _exists(objects, rng, seen_pairs)
  elif kind == "relation":
    qa = _relation(objects, rng)
  if qa is None:
    kind = "count"
    qa = _count(objects, rng)
  return qa[0], qa[1], kind


class ShapesVqa:
  """Random-access source of shapes-world VQA examples (see module doc)."""

  def __init__(self, data_cfg: Any, split: str, num_images: int | None = None):
    self.source = shapes.ShapesSource(data_cfg, split)
    n = len(self.source) if num_images is None else int(num_images)
    if not 0 < n <= len(self.source):
      raise ValueError(f"shapes vqa: {n} images requested, the {split!r} split has "
                       f"{len(self.source)} (shapes.{split}_size)")
    self.num_images = n
    self.split = split
    self.seen_pairs = set(self.source.seen_pairs)
    self.answer_list = answer_list(self.source.max_objects)

  def __len__(self) -> int:
    return len(KINDS) * self.num_images

  def __repr__(self) -> str:
    return f"ShapesVqa(split={self.split!r}, len={len(self)})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"shapes vqa {self.split}: index {index} out of range [0, {len(self)})")
    image_index, k = divmod(index, len(KINDS))
    ex = self.source[image_index]
    rng = np.random.default_rng([self.source.seed, shapes.SPLITS[self.split], image_index,
                                 VQA_STREAM, k])
    text, answer, kind = question(ex, KINDS[k], rng, seen_pairs=self.seen_pairs)
    return {"image": ex["image"], "question": text, "answers": [answer], "weights": [1.0],
            "gt_answers": [answer] * HUMAN_ANSWERS, "question_id": index, "kind": kind,
            "index": index}


def check_answers(examples: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> None:
  """Raises naming the first example whose answer is not in `answers`."""
  allowed = set(answers)
  for ex in examples:
    for a in ex["answers"]:
      if a not in allowed:
        raise ValueError(f"shapes vqa: question {ex['question_id']} ({ex['question']!r}) "
                         f"has answer {a!r} outside the answer list")
