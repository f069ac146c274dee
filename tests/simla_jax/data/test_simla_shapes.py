"""Shapes world: determinism, disjoint splits, compositional holdout, boxes, captions,
minimal pairs."""

import hashlib
import re

import numpy as np
import pytest

from simla_jax.data import default_data_config, shapes
from simla_jax.data.tokenizer import pre_caption


def _cfg(**shape_overrides):
  c = default_data_config()
  c.shapes.update(shape_overrides)
  return c


def _digest(image):
  return hashlib.sha1(image.tobytes()).hexdigest()


def test_example_is_pure_function_of_seed_split_index():
  a = shapes.ShapesSource(_cfg(), "train")
  b = shapes.ShapesSource(_cfg(), "train")
  for i in (0, 5, 99_999):
    ea, eb = a[i], b[i]
    np.testing.assert_array_equal(ea["image"], eb["image"])
    assert ea["captions"] == eb["captions"]
    np.testing.assert_array_equal(ea["boxes"], eb["boxes"])
  other_seed = shapes.ShapesSource(_cfg(seed=1), "train")
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])
  assert a[0]["image"].dtype == np.uint8 and a[0]["image"].shape == (64, 64, 3)
  with pytest.raises(IndexError):
    a[len(a)]


def test_splits_share_no_image():
  cfg = _cfg(train_size=400, val_size=200, test_size=200, comp_size=200, strict_size=200)
  seen = {}
  for split in ("train", "val", "test", "comp", "strict"):
    src = shapes.ShapesSource(cfg, split)
    for i in range(len(src)):
      d = _digest(src[i]["image"])
      assert d not in seen, f"{split}[{i}] repeats {seen[d]}"
      seen[d] = (split, i)


def test_compositional_holdout():
  cfg = _cfg()
  held = {tuple(p.split()) for p in cfg.shapes.holdout_pairs}
  for split in ("train", "val", "test"):
    src = shapes.ShapesSource(cfg, split)
    for i in range(500 if split == "train" else 200):
      pairs = {(o["colour"], o["shape"]) for o in src[i]["objects"]}
      assert not pairs & held, f"{split}[{i}] contains held-out {pairs & held}"
  comp = shapes.ShapesSource(cfg, "comp")
  found = set()
  for i in range(200):
    pairs = {(o["colour"], o["shape"]) for o in comp[i]["objects"]}
    assert pairs & held, f"comp[{i}] has no held-out pair"
    found |= pairs & held
  assert found == held  # every held-out pair occurs
  with pytest.raises(ValueError, match="holdout_pairs"):
    shapes.ShapesSource(_cfg(holdout_pairs=("red blob",)), "train")


def test_strict_split_holds_only_heldout_pairs():
  cfg = _cfg()
  held = {tuple(p.split()) for p in cfg.shapes.holdout_pairs}
  strict = shapes.ShapesSource(cfg, "strict")
  found, counts = set(), set()
  for i in range(200):
    pairs = [(o["colour"], o["shape"]) for o in strict[i]["objects"]]
    assert set(pairs) <= held, f"strict[{i}] has seen pairs {set(pairs) - held}"
    found |= set(pairs)
    counts.add(len(pairs))
  assert found == held and counts == {1, 2, 3, 4}
  with pytest.raises(ValueError, match="holdout_pairs"):
    shapes.ShapesSource(_cfg(holdout_pairs=()), "strict")


def _obj(size, colour, shape):
  return dict(size=size, colour=colour, shape=shape)


def test_minimal_pair_swaps_one_attribute_into_an_absent_object():
  example = dict(split="test", index=3, objects=[
      _obj("small", "red", "circle"), _obj("large", "orange", "star"),
      _obj("small", "blue", "circle")])
  pair = shapes.minimal_pair(example)
  assert pair["caption"] == ("a small red circle, a large orange star and a small blue circle")
  assert pair == shapes.minimal_pair(example)          # deterministic
  split = lambda c: [p.split() for p in re.split(r", | and ", c)]   # phrases -> words
  truth, foil = split(pair["caption"]), split(pair["foil"])
  k = pair["object"]
  assert len(foil) == 3 and [i for i in range(3) if truth[i] != foil[i]] == [k]
  # "a <size> <colour> <shape>": only the swapped attribute's word differs.
  at = 2 if pair["attribute"] == "colour" else 3
  assert [j for j in range(4) if truth[k][j] != foil[k][j]] == [at]
  swapped = foil[k][at]
  present = {(o["size"], o["colour"], o["shape"]) for o in example["objects"]}
  new = dict(example["objects"][k], **{pair["attribute"]: swapped})
  assert (new["size"], new["colour"], new["shape"]) not in present
  # The one swap that would describe the image (small red circle -> small blue circle
  # is present) is never drawn: over many examples object 0's colour never becomes blue.
  for i in range(200):
    p = shapes.minimal_pair(dict(example, index=i))
    if p["object"] == 0 and p["attribute"] == "colour":
      assert not p["foil"].startswith("a small blue circle")


def test_boxes_are_tight_and_hold_all_object_pixels():
  # Without noise and texture the background is one colour, so object pixels are
  # exactly the pixels that differ from it.
  src = shapes.ShapesSource(_cfg(noise_std=0.0, texture_amplitude=0.0), "train")
  for i in range(60):
    ex = src[i]
    img = ex["image"].astype(int)
    background = np.any(img != img[0, 0], axis=-1)  # corner pixel is never an object
    boxes = ex["boxes"]
    assert boxes.shape == (len(ex["objects"]), 4)
    covered = np.zeros_like(background)
    for x0, y0, x1, y1 in boxes:
      assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
      inside = background[y0:y1, x0:x1]
      # Tight: the object touches all four sides of its box.
      assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
      assert not covered[y0:y1, x0:x1].any(), "boxes overlap"
      covered[y0:y1, x0:x1] = True
    assert not (background & ~covered).any(), f"example {i}: object pixels outside boxes"
    # Each box is filled with one colour: its object's.
    for o, (x0, y0, x1, y1) in zip(ex["objects"], boxes):
      patch = img[y0:y1, x0:x1][background[y0:y1, x0:x1]]
      assert len(np.unique(patch, axis=0)) == 1, o


def test_captions_phrases_and_keywords_describe_every_object():
  cfg = _cfg()
  vocab = set(shapes.vocabulary(cfg))
  src = shapes.ShapesSource(cfg, "test")
  all_captions = []
  for i in range(len(src)):
    ex = src[i]
    assert len(ex["captions"]) == cfg.shapes.captions_per_image
    assert len(set(ex["phrases"])) == len(ex["phrases"]), "referring phrases must be unique"
    for caption in ex["captions"]:
      words = pre_caption(caption).split()
      assert len(words) <= cfg.shapes.max_caption_words
      assert set(words) <= vocab, set(words) - vocab
      for o in ex["objects"]:
        assert o["colour"] in words and o["shape"] in words
    for o, phrase in zip(ex["objects"], ex["phrases"]):
      assert phrase.startswith("the ") and o["colour"] in phrase and o["shape"] in phrase
      assert set(o["keywords"]) == {o["size"], o["colour"], o["shape"]}
    assert set(ex["keywords"]) == {w for o in ex["objects"] for w in o["keywords"]}
    all_captions += [pre_caption(c) for c in ex["captions"]]
  # Discriminative: almost every caption is unique across the split.
  assert len(set(all_captions)) / len(all_captions) > 0.9


def test_spatial_relations_match_boxes():
  src = shapes.ShapesSource(_cfg(), "val")
  checked = 0
  for i in range(200):
    ex = src[i]
    for o1 in ex["objects"]:
      for o2 in ex["objects"]:
        if o1 is o2:
          continue
        rel = shapes.ShapesSource._relation(o1, o2)
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = o1["box"], o2["box"]
        if rel == "left of":
          assert ax1 <= bx0
        elif rel == "right of":
          assert bx1 <= ax0
        elif rel == "above":
          assert ay1 <= by0 and not (ax1 <= bx0 or bx1 <= ax0)
        elif rel == "below":
          assert by1 <= ay0
        checked += 1
        assert rel != "and", "objects in distinct cells are always separated"
  assert checked > 100
