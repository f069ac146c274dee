"""Official NLVR2 JSON: parsing, labels, bad records and missing images (error or skip)."""

import json

import numpy as np
import pytest
from PIL import Image

from simla_jax.data import captions as captions_lib
from simla_jax.data import nlvr


def _images(tmp_path, names=("a.png", "b.png", "c.png")):
  for k, n in enumerate(names):
    Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / n)


def _record(a="a.png", b="b.png", sentence="two dogs", label="True"):
  return {"images": [a, b], "sentence": sentence, "label": label}


def test_json_list_reads_images_sentence_and_official_labels(tmp_path):
  _images(tmp_path)
  path = tmp_path / "dev.json"
  path.write_text(json.dumps([_record(), _record("c.png", "a.png", "no cats", "False"),
                              _record(label=True)], indent=1))
  src = nlvr.NlvrJsonSource([str(path)], str(tmp_path))
  assert len(src) == 3 and src.skipped == 0
  np.testing.assert_array_equal(src.labels, [1, 0, 1])    # True -> 1, False -> 0
  ex = src[1]
  assert ex["sentence"] == "no cats" and ex["label"] == 0
  assert ex["image0"][0, 0, 0] == 80 and ex["image1"][0, 0, 0] == 0   # c.png left, a.png right
  assert src.records[1]["line"] == 10                      # the line its object starts on


def test_bad_json_line_is_an_error_naming_file_and_line_or_counted_with_skip_bad(tmp_path):
  _images(tmp_path)
  path = tmp_path / "train.jsonl"
  lines = [json.dumps(_record()), "{not json", json.dumps(_record(label="maybe")),
           json.dumps({"images": ["a.png"], "sentence": "x", "label": "True"}),
           json.dumps(_record("b.png", "c.png", "ok", "False"))]
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(nlvr.NlvrFormatError, match=rf"{path} line 2 column 2: malformed JSON"):
    nlvr.NlvrJsonSource(str(path), str(tmp_path))
  src = nlvr.NlvrJsonSource(str(path), str(tmp_path), skip_bad=True)
  assert len(src) == 2 and src.skipped == 3
  assert any("line 3" in r and "'maybe'" in r for r in src.skip_reasons)
  assert any("line 4" in r and "two image paths" in r for r in src.skip_reasons)
  np.testing.assert_array_equal(src.labels, [1, 0])


def test_invalid_record_in_a_json_list_names_its_line(tmp_path):
  path = tmp_path / "test.json"
  path.write_text("[\n" + json.dumps(_record()) + ",\n" + json.dumps({"images": ["a", "b"],
                                                                       "label": "True"}) + "\n]")
  with pytest.raises(nlvr.NlvrFormatError, match=rf"{path} line 3: needs a non-empty string"):
    nlvr.NlvrJsonSource(str(path), str(tmp_path), check_images=False)
  path.write_text("[\n" + json.dumps(_record()) + ",\n{\"images\": [\n]")
  with pytest.raises(nlvr.NlvrFormatError, match=rf"{path} line 4 column"):
    nlvr.NlvrJsonSource(str(path), str(tmp_path), skip_bad=True)   # a list cannot resync


def test_missing_image_is_an_error_naming_it_or_counted_with_skip_bad(tmp_path):
  _images(tmp_path, ("a.png", "b.png"))
  path = tmp_path / "dev.json"
  path.write_text(json.dumps([_record(), _record("a.png", "gone.png")], indent=1))
  with pytest.raises(captions_lib.BadImageError, match=r"gone.png does not exist .*line 10\)"):
    nlvr.NlvrJsonSource(str(path), str(tmp_path))
  src = nlvr.NlvrJsonSource(str(path), str(tmp_path), skip_bad=True)
  assert len(src) == 1 and src.skipped == 1 and "gone.png" in src.skip_reasons[0]
