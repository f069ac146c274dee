"""Shapes-world referring expressions: unique in the scene, proposals, fine-tuning records."""

import ml_collections
import numpy as np
import pytest

from simla_jax import gradcam
from simla_jax.data import default_data_config, grounding_shapes as gs, shapes


def _data(num_distractors=4):
  d = default_data_config()
  d.shapes.update(val_size=30, train_size=30)
  d.grounding = ml_collections.ConfigDict(dict(num_distractors=num_distractors))
  return d


def _obj(colour, shape, size, box, position=("in the", "center")):
  return dict(colour=colour, shape=shape, size=size, box=box, position=position)


def test_expressions_single_out_the_target_on_a_hand_scene():
  scene = [_obj("red", "circle", "small", (0, 0, 10, 10), ("at the", "top left")),
           _obj("red", "circle", "large", (30, 0, 50, 20), ("at the", "top right")),
           _obj("blue", "square", "small", (0, 40, 10, 50), ("at the", "bottom left"))]
  options = gs.expressions(scene, 0)
  flat = [t for ts in options.values() for t in ts]
  assert "the small red circle" in flat
  assert "the red circle" not in flat               # two red circles
  assert "the circle left of the large circle" in flat
  assert "the circle above the square" not in flat  # the large circle is above it too
  assert "the small shape" not in flat              # the small square too
  assert "the small circle at the top left" in flat
  assert gs.referents(scene, ("shape",), scene[0]) == [0, 1]
  assert gs.referents(scene, ("shape",), scene[0], relation="above",
                      anchor_attributes=("colour", "shape"), anchor=scene[2]) == [0, 1]
  assert gs.referents(scene, ("shape",), scene[0], relation="left of",
                      anchor_attributes=("size", "shape"), anchor=scene[1]) == [0]


def test_every_record_is_unique_in_its_scene_and_uses_known_words():
  d = _data()
  src = gs.GroundingShapes(d, "val")
  vocab = set(shapes.vocabulary(d))
  kinds = set()
  for r in range(len(src)):
    ex = src[r]
    image_index, target = src.records[r]
    objects = shapes.ShapesSource(d, "val")[image_index]["objects"]
    assert set(ex["text"].split()) <= vocab
    options = gs.expressions(objects, target)
    assert ex["text"] in options[ex["kind"]]
    kinds.add(ex["kind"])
    # Exactly one proposal, the target's box, overlaps the truth at IoU >= 0.5.
    hits = [gradcam.iou_xywh(p, ex["truth"]) >= 0.5 for p in ex["proposals"]]
    assert hits.count(True) == 1 and hits[ex["target"]]
    np.testing.assert_array_equal(ex["proposals"][ex["target"]], ex["truth"])
    assert len(ex["proposals"]) == len(objects) + 4
  assert kinds == set(gs.KINDS)


def test_records_are_deterministic():
  a, b = gs.GroundingShapes(_data(), "val", 5), gs.GroundingShapes(_data(), "val", 5)
  for r in range(len(a)):
    x, y = a[r], b[r]
    assert x["text"] == y["text"]
    np.testing.assert_array_equal(x["proposals"], y["proposals"])


def test_fine_tuning_pairs_carry_the_image_id():
  pairs = gs.GroundingShapesPairs(_data(), 6)
  ids = [pairs[r]["image_id"] for r in range(len(pairs))]
  assert ids == sorted(ids) and set(ids) == set(range(6))
  ex = pairs[0]
  assert len(ex["captions"]) == 1 and ex["image"].dtype == np.uint8
  with pytest.raises(ValueError, match="num_images 31"):
    gs.GroundingShapesPairs(_data(), 31)
