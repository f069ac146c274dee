"""Official VQA / VG-QA files: answer weights, errors naming file and line, skipping
with counts, answers outside the list; the official VQA accuracy."""

import json

import numpy as np
import pytest
from PIL import Image

from simla_jax.data import captions as captions_lib
from simla_jax.data import vqa

ANSWERS = ["yes", "no", "2", "red"]


@pytest.fixture
def root(tmp_path):
  for name in ("train2014/a.jpg", "train2014/b.jpg", "vg/c.jpg"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path)
  return tmp_path


def _write(path, text):
  path.write_text(text)
  return str(path)


def _records():
  return [
      {"question_id": 1, "image": "train2014/a.jpg", "question": "Is it red?",
       "answer": ["yes"] * 6 + ["no"] * 3 + ["red"], "dataset": "vqa"},
      {"image": "c.jpg", "question": "How many dogs?", "answer": "2", "dataset": "vg"},
  ]


def _source(path, root, **kw):
  kw.setdefault("train", True)
  return vqa.VqaJsonSource(path, ANSWERS, vqa_root=str(root), vg_root=str(root / "vg"), **kw)


def test_training_answers_carry_the_official_weights(root):
  path = _write(root / "train.json", json.dumps(_records(), indent=1))
  src = _source(path, root)
  ex = src[0]
  assert ex["question"] == "is it red"
  assert ex["answers"] == ["yes", "no", "red"]
  np.testing.assert_allclose(ex["weights"], [0.6, 0.3, 0.1])
  assert ex["gt_answers"] == _records()[0]["answer"]
  assert ex["image"].shape == (8, 8, 3)
  vg = src[1]
  assert vg["answers"] == ["2"] and vg["weights"] == [0.5]
  assert vg["question_id"] < 0                       # VG-QA records have no id


def test_malformed_json_names_file_and_line(root):
  records = [json.dumps(r) for r in _records()]
  bad = _write(root / "bad.json", "[\n" + records[0] + ",\n{\"image\": oops}\n]")
  with pytest.raises(ValueError, match=r"bad\.json line 3 column \d+: malformed JSON"):
    _source(bad, root)
  lines = _write(root / "lines.jsonl", records[0] + "\n{not json\n" + records[1] + "\n")
  with pytest.raises(ValueError, match=r"lines\.jsonl line 2 column 2: malformed JSON"):
    _source(lines, root)
  src = _source(lines, root, on_error="skip")
  assert len(src) == 2 and src.skipped["bad_json"] == 1


def test_bad_records_and_missing_images_name_file_and_line(root):
  records = _records() + [{"question_id": 3, "image": "train2014/missing.jpg",
                           "question": "what", "answer": ["no"], "dataset": "vqa"},
                          {"question_id": 4, "image": "train2014/b.jpg", "question": "",
                           "answer": ["no"]}]
  path = _write(root / "t.json", "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]")
  with pytest.raises(captions_lib.BadImageError,
                     match=r"missing\.jpg does not exist \(.*t\.json line 4\)"):
    _source(path, root)
  with pytest.raises(ValueError, match=r"t\.json line 5: needs a non-empty string 'question'"):
    _source(path, root, check_images=False)
  src = _source(path, root, on_error="skip")
  assert len(src) == 2
  assert dict(src.skipped) == {"bad_json": 0, "missing_image": 1, "bad_record": 1}


def test_answers_outside_the_list_error_skip_or_keep(root):
  records = _records() + [{"question_id": 5, "image": "train2014/b.jpg", "question": "q",
                           "answer": ["blue"] * 10}]
  path = _write(root / "o.json", "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]")
  allowed = ["yes", "no", "2"]                                       # "red", "blue" are not
  make = lambda mode: vqa.VqaJsonSource(path, allowed, vqa_root=str(root),
                                        vg_root=str(root / "vg"), train=True, outside_list=mode)
  with pytest.raises(ValueError, match=r"o\.json line 2: answer 'red' is not in the answer list"):
    make("error")
  skip = make("skip")
  assert len(skip) == 2 and skip[0]["answers"] == ["yes", "no"]
  np.testing.assert_allclose(skip[0]["weights"], [0.6, 0.3])          # the kept answers' shares
  assert skip.skipped["answer_outside_list"] == 2
  assert skip.skipped["record_without_listed_answer"] == 1
  keep = make("keep")
  assert len(keep) == 3 and keep[2]["answers"] == ["blue"]


def test_test_files_need_no_answers_and_yield_no_ground_truth(root):
  path = _write(root / "test.json", json.dumps(
      [{"question_id": 9, "image": "train2014/a.jpg", "question": "What colour?"}]))
  ex = _source(path, root, train=False)[0]
  assert ex["question_id"] == 9 and ex["gt_answers"] == [] and ex["answers"] == []
  with pytest.raises(ValueError, match=r"test\.json line 1: a training record needs"):
    _source(path, root)


def test_answer_list_is_checked(tmp_path):
  good = _write(tmp_path / "a.json", json.dumps(ANSWERS))
  assert vqa.read_answer_list(good) == ANSWERS
  dup = _write(tmp_path / "d.json", '[\n"yes",\n"no",\n"yes"\n]')
  with pytest.raises(ValueError, match=r"d\.json line 4: answer 'yes' repeats line 2"):
    vqa.read_answer_list(dup)


def test_pre_question_is_the_official_cleaning():
  assert vqa.pre_question("What's the  man's T-shirt colour?", 30) == "whats the mans t shirt colour"
  assert vqa.pre_question("a b c d e", 3) == "a b c"


def test_vqa_accuracy_on_hand_made_answer_sets():
  # 3 humans say "two" (-> "2"), 7 say "3": leaving out a "two" leaves 2 matches (2/3),
  # leaving out another leaves 3 (1): (3 * 2/3 + 7 * 1) / 10.
  humans = ["two"] * 3 + ["3"] * 7
  assert vqa.vqa_accuracy("2", humans) == pytest.approx(0.9)
  assert vqa.vqa_accuracy("3", humans) == pytest.approx(1.0)
  # One human of ten said "dog": leaving them out leaves 0 matches, any other 1 (1/3).
  assert vqa.vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.9 * (1 / 3))
  assert vqa.vqa_accuracy("bird", humans) == 0.0
  # Normalisation: case, articles, punctuation.
  assert vqa.vqa_accuracy("The Dog.", ["dog"] * 10) == 1.0
  assert vqa.normalize_answer("1.5 feet!") == "1.5 feet"
