"""Retrieval training pairs: one record per caption, image ids, bad records named."""

import json

import numpy as np
import pytest
from PIL import Image

from simla_jax.data import default_data_config, retrieval_pairs, shapes


def test_shapes_pairs_give_every_caption_of_an_image_its_id():
  cfg = default_data_config()
  pairs = retrieval_pairs.ShapesPairs(cfg, num_images=3)
  source = shapes.ShapesSource(cfg, "train")
  per = cfg.shapes.captions_per_image
  assert len(pairs) == 3 * per
  for r in (0, per - 1, per, 3 * per - 1):
    ex, image = pairs[r], source[r // per]
    assert ex["image_id"] == r // per and ex["index"] == r
    assert ex["captions"] == [image["captions"][r % per]]
    np.testing.assert_array_equal(ex["image"], image["image"])
  with pytest.raises(IndexError):
    pairs[3 * per]
  with pytest.raises(ValueError, match="num_images"):
    retrieval_pairs.ShapesPairs(cfg, num_images=0)


def test_caption_pairs_map_image_ids_in_order_and_name_bad_records(tmp_path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
  records = [{"image": "a.png", "caption": "one", "image_id": "coco_9"},
             {"image": "a.png", "caption": "two", "image_id": 4},
             {"image": "a.png", "caption": "three", "image_id": "coco_9"}]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(records))
  pairs = retrieval_pairs.CaptionPairs([str(path)], str(tmp_path))
  assert [pairs[i]["image_id"] for i in range(3)] == [0, 1, 0]
  assert pairs.num_images == 2 and pairs[1]["captions"] == ["two"]
  del records[1]["image_id"]
  path.write_text(json.dumps(records))
  with pytest.raises(ValueError, match=r"train.json record 1 has no 'image_id'"):
    retrieval_pairs.CaptionPairs([str(path)], str(tmp_path))
