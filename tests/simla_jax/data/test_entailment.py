"""Entailment data: shapes-world hypotheses against hand-made scenes, the official VE JSON."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from simla_jax.data import captions, default_data_config, shapes
from simla_jax.data import entailment as ent

E, N, C = ent.ENTAILMENT, ent.NEUTRAL, ent.CONTRADICTION


def _obj(colour, shape, size, box):
  return {"colour": colour, "shape": shape, "size": size, "box": box,
          "phrase": f"the {size} {colour} {shape}"}


# Row of three cells: two red circles flank a blue star, a small green square below.
TWO_RED = {"objects": [_obj("red", "circle", "small", (2, 2, 10, 10)),
                       _obj("blue", "star", "large", (22, 1, 40, 19)),
                       _obj("red", "circle", "large", (45, 2, 60, 17)),
                       _obj("green", "square", "small", (24, 45, 34, 55))],
           "background": "striped"}
ONE = {"objects": [_obj("white", "ring", "large", (20, 20, 44, 44))], "background": "plain"}

_NP = r"an? (?:(small|large) )?(\w+) (\w+)"
_NUMBERS = {w: k for k, w in enumerate(shapes.NUMBER_WORDS)}


def _truth(text, scene):
  """Independent reading of a hypothesis: True / False, or None when undetermined."""
  objects = scene["objects"]
  fits = lambda o, size, colour, shape: (o["colour"], o["shape"]) == (colour, shape) and \
      size in (None, o["size"])
  if m := re.fullmatch(f"there is {_NP}", text):
    return any(fits(o, *m.groups()) for o in objects)
  if m := re.fullmatch(r"there (?:is|are) (\w+) shapes?", text):
    return _NUMBERS[m.group(1)] == len(objects)
  if m := re.fullmatch(f"{_NP} is (left of|right of|above|below) {_NP}", text):
    a_desc, rel, b_desc = m.groups()[:3], m.group(4), m.groups()[4:]
    sep = {"left of": lambda a, b: a[2] <= b[0], "right of": lambda a, b: b[2] <= a[0],
           "above": lambda a, b: a[3] <= b[1], "below": lambda a, b: b[3] <= a[1]}[rel]
    return any(sep(a["box"], b["box"]) for a in objects for b in objects
               if a is not b and fits(a, *a_desc) and fits(b, *b_desc))
  if m := re.fullmatch(r"the background is (\w+)", text):
    return m.group(1) == scene["background"]
  neutral = r"(.+) (?:is made of|is|was drawn by) .+|the picture was made .+"
  if m := re.fullmatch(neutral, text):
    assert m.group(1) is None or m.group(1) in [o["phrase"] for o in objects], text
    return None
  raise AssertionError(f"unparsed hypothesis {text!r}")


@pytest.mark.parametrize("scene", [TWO_RED, ONE], ids=["two_red", "one"])
def test_hypotheses_on_hand_made_scenes_hold_as_labelled(scene):
  seen = {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES}
  kinds = set()
  for seed in range(150):
    for label, want in ((E, True), (C, False), (N, None)):
      text, kind = ent.hypothesis(scene, label, np.random.default_rng(seed), max_objects=4,
                                  seen_pairs=seen)
      assert _truth(text, scene) is want, (label, kind, text)
      kinds.add(kind)
  if scene is TWO_RED:
    assert kinds == set(ent.KINDS)


def test_a_reversed_relation_true_of_another_pair_is_never_a_contradiction():
  # A red circle is left of the star and another is right of it: neither relation
  # between "a red circle" and "a blue star" may be stated as false.
  for rel in ("left of", "right of"):
    assert ent.relation_is_true(TWO_RED["objects"], {"size": None, "colour": "red",
                                                     "shape": "circle"}, rel,
                                {"size": None, "colour": "blue", "shape": "star"})
  seen = {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES}
  texts = {ent.hypothesis(TWO_RED, C, np.random.default_rng(s), max_objects=4,
                          seen_pairs=seen)[0] for s in range(400)}
  assert "a red circle is right of a blue star" not in texts
  assert "a red circle is left of a blue star" not in texts
  assert "a small red circle is right of a blue star" in texts   # false for the small one


def test_shapes_source_is_deterministic_balanced_and_true_to_its_scenes():
  cfg = default_data_config()
  src = ent.ShapesEntailment(cfg, "val", 40)
  scenes = shapes.ShapesSource(cfg, "val")
  assert len(src) == 120
  np.testing.assert_array_equal(np.bincount(src.labels), [40, 40, 40])
  for i in range(len(src)):
    ex = src[i]
    assert ex["label"] == src.labels[i] == i % 3
    want = {E: True, C: False, N: None}[ex["label"]]
    assert _truth(ex["hypothesis"], scenes[i // 3]) is want, ex["hypothesis"]
  again = ent.ShapesEntailment(cfg, "val", 40)[7]
  assert again["hypothesis"] == src[7]["hypothesis"]
  np.testing.assert_array_equal(again["image"], scenes[2]["image"])


def test_hypothesis_words_extend_the_caption_vocabulary():
  words = ent.vocabulary()
  assert "wood" in words and not set(words) & set(shapes.vocabulary(None))


# --------------------------------------------------------------------------- SNLI-VE
def _write_images(root, names):
  for n in names:
    Image.fromarray(np.full((6, 5, 3), 80, np.uint8)).save(root / n)


def test_official_ve_json_list_parses_with_lines_and_images(tmp_path):
  _write_images(tmp_path, ["1000092795.jpg", "36979.jpg"])
  records = [{"image": "1000092795", "sentence": "Two young guys are outside.",
              "label": "entailment"},
             {"image": 36979, "sentence": "A group of friends sleep.", "label": "contradiction"},
             {"image": "36979.jpg", "sentence": "The men are brothers.", "label": "neutral"}]
  path = tmp_path / "ve_dev.json"
  path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
  src = ent.VeJsonSource(str(path), str(tmp_path))
  assert len(src) == 3 and [r["line"] for r in src.records] == [2, 3, 4]
  np.testing.assert_array_equal(src.labels, [2, 0, 1])
  ex = src[0]
  assert ex["image"].shape == (6, 5, 3) and ex["hypothesis"] == "Two young guys are outside."
  assert src.image_path(src.records[1]) == str(tmp_path / "36979.jpg")
  # The same records as JSON lines.
  jsonl = tmp_path / "ve_dev.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  np.testing.assert_array_equal(ent.VeJsonSource(str(jsonl), str(tmp_path)).labels, [2, 0, 1])


@pytest.mark.parametrize("body, message", [
    ('[\n{"image": "a", "sentence": "s", "label": "neutral"},\n{"image": "a", "sentence": }\n]',
     r"ve_bad.json line 3 column \d+: malformed JSON"),
    ('[\n{"image": "a", "sentence": "s", "label": "neutral"},\n'
     '{"image": "a", "sentence": "s", "label": "maybe"}\n]',
     r"ve_bad.json line 3: label 'maybe' is not one of"),
    ('[{"image": "a", "label": "neutral"}]', r"ve_bad.json line 1: needs a non-empty string 'sentence'"),
    ('{"image": "a", "sentence": "s", "label": "neutral"}\n\n{"image": "a", "sentence": "s",',
     r"ve_bad.json line 3 column \d+: malformed JSON"),
    ('[\n{"image": "a", "sentence": "s", "label": "neutral"}\n{"image": "a"}]',
     r"ve_bad.json line 3: expected ',' or ']'"),
])
def test_bad_ve_records_are_named_by_file_and_line(tmp_path, body, message):
  _write_images(tmp_path, ["a.jpg"])
  (tmp_path / "ve_bad.json").write_text(body)
  with pytest.raises(ValueError, match=message):
    ent.VeJsonSource(str(tmp_path / "ve_bad.json"), str(tmp_path))


def test_a_missing_image_is_named_with_its_file_and_line(tmp_path):
  _write_images(tmp_path, ["a.jpg"])
  path = tmp_path / "ve.json"
  path.write_text('[\n{"image": "a", "sentence": "s", "label": "neutral"},\n'
                  '{"image": "b", "sentence": "s", "label": "neutral"}\n]')
  with pytest.raises(captions.BadImageError, match=r"b\.jpg does not exist \(.*ve.json line 3\)"):
    ent.VeJsonSource(str(path), str(tmp_path))
  src = ent.VeJsonSource(str(path), str(tmp_path), check_images=False)
  with pytest.raises(captions.BadImageError, match=r"b\.jpg does not exist \(.*ve.json line 3\)"):
    src[1]
