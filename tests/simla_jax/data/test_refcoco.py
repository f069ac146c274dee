"""RefCOCO+ in the official Grounding.py formats: parsing, and errors naming file and line."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from simla_jax.data import captions as captions_lib
from simla_jax.data import refcoco


def _write(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)
  return str(path)


@pytest.fixture()
def files(tmp_path):
  """A two-image RefCOCO+ release as Grounding.py reads it."""
  root = tmp_path / "coco"
  (root / "train2014").mkdir(parents=True)
  for name, (w, h) in (("COCO_train2014_1.jpg", (40, 30)), ("COCO_train2014_2.jpg", (50, 20))):
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(root / "train2014" / name)
  refer = tmp_path / "refcoco+"
  refer.mkdir()
  refs = [dict(ref_id=10, ann_id=100, image_id=1, split="val", sentences=[]),
          dict(ref_id=11, ann_id=101, image_id=2, split="testA", sentences=[]),
          dict(ref_id=12, ann_id=102, image_id=2, split="testB", sentences=[])]
  with open(refer / "refs(unc).p", "wb") as f:
    pickle.dump(refs, f, protocol=2)
  _write(refer / "instances.json", dict(
      images=[dict(id=1, height=30, width=40), dict(id=2, height=20, width=50)],
      annotations=[dict(id=100, image_id=1, bbox=[1.5, 2, 10, 8]),
                   dict(id=101, image_id=2, bbox=[0, 0, 20, 20]),
                   dict(id=102, image_id=2, bbox=[30, 5, 20, 15])]))
  dets = _write(tmp_path / "dets.json", {"1": [[1, 2, 10, 8, 0.9], [20, 10, 15, 15, 0.5]],
                                         "2": [[0, 0, 20, 20], [30, 5, 20, 15]]})
  cocos = _write(tmp_path / "cocos.json", {"1": [[1.5, 2, 10, 8]], "2": [[0, 0, 20, 20]]})
  train = _write(tmp_path / "refcoco+_train.json", [
      {"image": "train2014/COCO_train2014_1.jpg", "text": "left dog"},
      {"image": "train2014/COCO_train2014_2.jpg", "text": "man in red"},
      {"image": "train2014/COCO_train2014_1.jpg", "text": "the other dog"}])
  test = _write(tmp_path / "refcoco+_test.json", [
      {"image": "train2014/COCO_train2014_2.jpg", "text": "man in red", "ref_id": 11},
      {"image": "train2014/COCO_train2014_2.jpg", "text": "right guy", "ref_id": 12}])
  return dict(root=str(root), refer=str(refer), dets=dets, cocos=cocos, train=train, test=test,
              tmp=tmp_path)


def test_train_records_use_the_image_file_name_as_id(files):
  src = refcoco.RefcocoTrain(files["train"], files["root"])
  assert len(src) == 3 and src.num_images == 2
  assert [src[i]["image_id"] for i in range(3)] == [0, 1, 0]
  ex = src[1]
  assert ex["captions"] == ["man in red"] and ex["image"].shape == (20, 50, 3)


def test_eval_records_join_refs_boxes_and_proposals(files):
  refer = refcoco.read_refer(files["refer"])
  assert refer[10] == refcoco.Ref(10, 1, "val", (1.5, 2.0, 10.0, 8.0), 30, 40)
  src = refcoco.RefcocoEval(files["test"], files["root"], refer, files["dets"], files["cocos"])
  ex = src[1]
  assert ex["split"] == "testB" and ex["ref_id"] == 12
  np.testing.assert_array_equal(ex["truth"], [30, 5, 20, 15])
  np.testing.assert_array_equal(ex["proposals"], [[0, 0, 20, 20], [30, 5, 20, 15]])
  np.testing.assert_array_equal(ex["coco_proposals"], [[0, 0, 20, 20]])
  assert (ex["height"], ex["width"]) == (20, 50)


def test_malformed_json_line_is_named(files):
  path = files["tmp"] / "bad.json"
  path.write_text('[\n {"image": "a.jpg", "text": "x"},\n {"image": "b.jpg" "text": "y"}\n]\n')
  with pytest.raises(ValueError, match=r"refcoco: .*bad.json line 3"):
    refcoco.read_expressions(str(path), with_ref_id=False)
  lines = files["tmp"] / "bad.jsonl"
  lines.write_text('{"image": "a.jpg", "text": "x", "ref_id": 1}\n{"image": "b.jpg", "text": ""}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl line 2: needs a non-empty string 'text'"):
    refcoco.read_expressions(str(lines), with_ref_id=True)


def test_missing_image_is_named(files):
  _write(files["train"], [{"image": "train2014/none.jpg", "text": "a cat"}])
  with pytest.raises(captions_lib.BadImageError,
                     match=r"none.jpg does not exist \(.*refcoco\+_train.json line 2\)"):
    refcoco.RefcocoTrain(files["train"], files["root"])


def test_out_of_range_box_is_named(files):
  _write(files["dets"], {"1": [[1, 2, 10, 8]], "2": [[0, 0, 20, 20], [45, 5, 20, 15]]})
  refer = refcoco.read_refer(files["refer"])
  with pytest.raises(ValueError, match=r"dets.json image 2 box 1: box \[45, 5, 20, 15\] lies "
                                       r"outside the 50 x 20 image"):
    refcoco.RefcocoEval(files["test"], files["root"], refer, files["dets"])


def test_unknown_ref_id_is_named(files):
  _write(files["test"], [{"image": "train2014/COCO_train2014_2.jpg", "text": "x", "ref_id": 99}])
  with pytest.raises(ValueError, match=r"refcoco\+_test.json line 2: ref_id 99"):
    refcoco.RefcocoEval(files["test"], files["root"], refcoco.read_refer(files["refer"]),
                        files["dets"])


class _Evil:
  def __reduce__(self):
    return (os.getcwd, ())


def test_refs_pickle_with_a_class_reference_is_refused(files):
  with open(os.path.join(files["refer"], "refs(unc).p"), "wb") as f:
    pickle.dump([{"ref_id": 1, "x": _Evil()}], f)
  with pytest.raises(refcoco.UnsafePickleError, match="only plain containers"):
    refcoco.read_refer(files["refer"])
