"""Shapes-world NLVR2: statements checked against both scene graphs by an independent reader."""

import re

import numpy as np
import pytest

from simla_jax.data import default_data_config, nlvr_shapes, shapes

NUMBERS = {w: k for k, w in enumerate(shapes.NUMBER_WORDS)}


def _obj(colour, shape, size="small"):
  return {"colour": colour, "shape": shape, "size": size}


LEFT = [_obj("red", "square"), _obj("blue", "circle", "large")]
RIGHT = [_obj("blue", "circle"), _obj("green", "star"), _obj("red", "ring")]


def read(sentence, left, right):
  """Truth of a statement, from its words alone (independent of nlvr_shapes.truth)."""
  sides = {"left": left, "right": right}
  has = lambda objs, c, s: any(o["colour"] == c and o["shape"] == s for o in objs)
  if m := re.fullmatch(r"the (left|right) image contains an? (\w+) (\w+)", sentence):
    return has(sides[m[1]], m[2], m[3])
  if m := re.fullmatch(r"both images contain an? (\w+) (\w+)", sentence):
    return has(left, m[1], m[2]) and has(right, m[1], m[2])
  if m := re.fullmatch(r"only the (left|right) image contains an? (\w+) (\w+)", sentence):
    other = right if m[1] == "left" else left
    return has(sides[m[1]], m[2], m[3]) and not has(other, m[2], m[3])
  if m := re.fullmatch(r"the (left|right) image has more shapes than the (left|right) image",
                       sentence):
    assert m[1] != m[2]
    return len(sides[m[1]]) > len(sides[m[2]])
  if sentence == "the two images have the same number of shapes":
    return len(left) == len(right)
  if m := re.fullmatch(r"there are (\w+) shapes in the two images", sentence):
    return len(left) + len(right) == NUMBERS[m[1]]
  raise AssertionError(f"unknown statement {sentence!r}")


@pytest.mark.parametrize("kind,args,text,true", [
    ("contains", dict(side="left", colour="red", shape="square"),
     "the left image contains a red square", True),
    ("contains", dict(side="right", colour="red", shape="square"),
     "the right image contains a red square", False),
    ("both", dict(colour="blue", shape="circle"), "both images contain a blue circle", True),
    ("both", dict(colour="green", shape="star"), "both images contain a green star", False),
    ("only", dict(side="right", colour="green", shape="star"),
     "only the right image contains a green star", True),
    ("only", dict(side="left", colour="blue", shape="circle"),
     "only the left image contains a blue circle", False),
    ("more", dict(side="right"), "the right image has more shapes than the left image", True),
    ("more", dict(side="left"), "the left image has more shapes than the right image", False),
    ("same", {}, "the two images have the same number of shapes", False),
    ("total", dict(number=5), "there are five shapes in the two images", True),
    ("total", dict(number=4), "there are four shapes in the two images", False),
])
def test_statements_on_a_hand_checked_pair(kind, args, text, true):
  assert nlvr_shapes.sentence(kind, args) == text
  assert nlvr_shapes.truth(kind, args, LEFT, RIGHT) is true
  assert read(text, LEFT, RIGHT) is true


def test_generated_statements_are_true_exactly_when_labelled_and_balanced():
  cfg = default_data_config()
  cfg.shapes.val_size = 120
  src = nlvr_shapes.ShapesNlvr(cfg, "val")
  assert len(src) == 120
  kinds = set()
  for i in range(len(src)):
    ex = src[i]
    left, right = src.scenes(i)
    assert ex["label"] == i % 2 == src.labels[i]
    assert read(ex["sentence"], left["objects"], right["objects"]) == bool(ex["label"]), i
    np.testing.assert_array_equal(ex["image0"], left["image"])
    kinds.add(ex["kind"])
  assert kinds == set(nlvr_shapes.KINDS)
  assert src[5]["sentence"] == nlvr_shapes.ShapesNlvr(cfg, "val")[5]["sentence"]  # deterministic
  assert np.mean(src.labels) == 0.5


def test_vocabulary_covers_every_statement_word():
  cfg = default_data_config()
  words = set(shapes.vocabulary(cfg)) | set(nlvr_shapes.vocabulary())
  src = nlvr_shapes.ShapesNlvr(cfg, "train", num_pairs=40)
  for i in range(len(src)):
    assert set(src[i]["sentence"].split()) <= words
  with pytest.raises(ValueError, match="image pairs requested"):
    nlvr_shapes.ShapesNlvr(cfg, "val", num_pairs=10_000)
