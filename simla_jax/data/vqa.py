"""Official VQA data (ALBEF / SIMLA `dataset/vqa_dataset.py` formats) and VQA accuracy.

Files (JSON lists; JSON lines with the same records are read too):
  vqa_train.json / vqa_val.json  {"question_id", "image": "train2014/COCO_...jpg",
                                  "question", "answer": [10 human answers], "dataset": "vqa"}
  vg_qa.json                     {"image", "question", "answer": str, "dataset": "vg"}
  vqa_test.json (test-dev / std) {"question_id", "image", "question"}
  answer_list.json               ["net", "pitcher", ...] (the ranked answers, ~3k)
An image is `<vqa_root>/<image>` for "vqa" records, `<vg_root>/<image>` for "vg" ones.

Training targets, as the official dataset: a "vqa" record trains on each distinct
human answer with weight (#humans who gave it) / (#humans); a "vg" record on its one
answer with weight 0.5. Questions are lower-cased, stripped of punctuation and cut to
`max_words` words (`pre_question`).

Bad input stops the run with the file and line that hold it: malformed JSON, a
record without its keys, a missing image (`check_images`), a training answer outside
the answer list. With `on_error="skip"` a bad JSON line (JSON-lines files), a bad
record or a missing image drops the record instead, counted in `skipped`;
`outside_list` = "error" | "skip" (drop the answer, and the record when none is
left; counted) | "keep" (train on it, as the official code does).

VQA accuracy (`vqa_accuracy`) is the official one: an answer scores min(#matching
humans / 3, 1) averaged over the 10 leave-one-human-out subsets, after the answers'
normalisation (`normalize_answer`: lower case, punctuation, number words to digits,
articles; a compact form of the official processPunctuation / processDigitArticle).
"""

import collections
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax.data import captions as captions_lib
from simla_jax.data import json_records

VG_WEIGHT = 0.5           # official weight of a Visual Genome answer
ON_ERROR = ("error", "skip")
OUTSIDE_LIST = ("error", "skip", "keep")


def pre_question(question: str, max_words: int) -> str:
  """The official question cleaning: lower case, punctuation dropped, - and / to spaces,
  at most `max_words` words."""
  q = re.sub(r"([,.'!?\"()*#:;~])", "", question.lower()).replace("-", " ").replace("/", " ")
  return " ".join(q.split()[:max_words])


# --------------------------------------------------------------------------- reading
class BadRecord(ValueError):
  """A record the run cannot use; the message names the file and the line."""


def read_json_records(path: str, on_error: str = "error") -> tuple[list[tuple[int, Any]], int]:
  """((line, value) of every record, #skipped lines): a JSON list, or JSON lines.

  A malformed JSON list cannot be resynchronised and always raises; a malformed JSON
  line raises, or with `on_error="skip"` is counted and skipped.
  """
  text = json_records.read_text(path, "vqa")
  skipped = [] if on_error == "skip" else None
  records = json_records.raw_records(path, text, "vqa", error=BadRecord, skipped=skipped)
  return records, len(skipped or ())


def read_answer_list(path: str) -> list[str]:
  """The official answer_list.json: a JSON list of distinct non-empty strings."""
  records, _ = read_json_records(path)
  if len(records) == 1 and isinstance(records[0][1], list):   # a JSON-lines file of one list
    records = [(records[0][0], a) for a in records[0][1]]
  answers, seen = [], {}
  for line, a in records:
    if not isinstance(a, str) or not a.strip():
      raise BadRecord(f"vqa: {path} line {line}: an answer must be a non-empty string, "
                      f"found {a!r}")
    if a in seen:
      raise BadRecord(f"vqa: {path} line {line}: answer {a!r} repeats line {seen[a]}")
    seen[a] = line
    answers.append(a)
  if not answers:
    raise BadRecord(f"vqa: {path} holds no answers")
  return answers


def answer_weights(record: Mapping[str, Any]) -> tuple[list[str], list[float]]:
  """Distinct training answers and their official weights (see module doc)."""
  if record["dataset"] == "vg":
    return [record["answer"]], [VG_WEIGHT]
  counts = collections.Counter(record["answer"])
  n = len(record["answer"])
  answers = list(dict.fromkeys(record["answer"]))   # first-seen order, as the official dict
  return answers, [counts[a] / n for a in answers]


def parse_record(r: Any, where: str, *, train: bool) -> dict[str, Any]:
  """One validated record {question_id, image, question, dataset, answer}."""
  if not isinstance(r, dict):
    raise BadRecord(f"{where}: a record must be a JSON object, found {type(r).__name__}")
  dataset = r.get("dataset", "vqa")
  if dataset not in ("vqa", "vg"):
    raise BadRecord(f"{where}: dataset {dataset!r} is neither 'vqa' nor 'vg'")
  image = r.get("image")
  if not isinstance(image, str) or not image:
    raise BadRecord(f"{where}: needs a non-empty string 'image'")
  if not isinstance(r.get("question"), str) or not r["question"].strip():
    raise BadRecord(f"{where}: needs a non-empty string 'question'")
  qid = r.get("question_id")
  if qid is None and not (train and dataset == "vg"):
    raise BadRecord(f"{where}: needs a 'question_id'")
  if qid is not None and not isinstance(qid, int):
    if isinstance(qid, str) and qid.isdigit():
      qid = int(qid)
    else:
      raise BadRecord(f"{where}: question_id {qid!r} is not an integer")
  answer = r.get("answer")
  if dataset == "vg":
    if not isinstance(answer, str) or not answer.strip():
      raise BadRecord(f"{where}: a 'vg' record needs a non-empty string 'answer'")
  elif answer is not None:
    if (not isinstance(answer, list) or not answer
        or not all(isinstance(a, str) and a.strip() for a in answer)):
      raise BadRecord(f"{where}: 'answer' must be a non-empty list of non-empty strings")
  elif train:
    raise BadRecord(f"{where}: a training record needs its 'answer' list")
  return {"question_id": qid, "image": image, "question": r["question"], "dataset": dataset,
          "answer": answer}


class VqaJsonSource:
  """Random-access source over official VQA / VG-QA files (see module doc).

  train: records must carry answers; they yield the weighted training answers.
  Otherwise answers are optional: `gt_answers` are the human answers when given (VQA
  accuracy), else empty (test-dev / test-std: only the result JSON is written).
  """

  def __init__(self, files: Sequence[str] | str, answer_list: Sequence[str], *,
               vqa_root: str = "", vg_root: str = "", train: bool, max_words: int = 30,
               check_images: bool = True, on_error: str = "error",
               outside_list: str = "error"):
    if on_error not in ON_ERROR:
      raise ValueError(f"vqa: on_error {on_error!r} not in {ON_ERROR}")
    if outside_list not in OUTSIDE_LIST:
      raise ValueError(f"vqa: outside_list {outside_list!r} not in {OUTSIDE_LIST}")
    files = [files] if isinstance(files, str) else list(files)
    if not files:
      raise ValueError("vqa: no JSON files given")
    self.files, self.train, self.max_words = files, train, int(max_words)
    self.roots = {"vqa": vqa_root, "vg": vg_root}
    self.answer_list = list(answer_list)
    allowed = set(self.answer_list)
    self.skipped = collections.Counter()
    self.records = []
    checked: dict[str, bool] = {}
    for path in files:
      raw, bad_lines = read_json_records(path, on_error)
      self.skipped["bad_json"] += bad_lines
      for line, value in raw:
        where = f"vqa: {path} line {line}"
        try:
          r = parse_record(value, where, train=train)
          if check_images:
            image = self.image_path(r)
            if image not in checked:
              checked[image] = os.path.isfile(image)
            if not checked[image]:
              raise captions_lib.BadImageError(f"vqa: image file {image} does not exist "
                                               f"({path} line {line})")
        except (BadRecord, captions_lib.BadImageError) as e:
          if on_error == "skip":
            self.skipped["missing_image" if isinstance(e, captions_lib.BadImageError)
                         else "bad_record"] += 1
            continue
          raise
        r.update(file=path, line=line)
        if train:
          answers, weights = answer_weights(r)
          keep = [a in allowed for a in answers]
          if not all(keep) and outside_list != "keep":
            if outside_list == "error":
              a = answers[keep.index(False)]
              raise BadRecord(f"{where}: answer {a!r} is not in the answer list")
            self.skipped["answer_outside_list"] += keep.count(False)
            answers = [a for a, k in zip(answers, keep) if k]
            weights = [w for w, k in zip(weights, keep) if k]
            if not answers:
              self.skipped["record_without_listed_answer"] += 1
              continue
          r.update(answers=answers, weights=weights)
        self.records.append(r)
    if not self.records:
      raise ValueError(f"vqa: {', '.join(files)} hold no usable records "
                       f"(skipped: {dict(self.skipped)})")

  def image_path(self, record: Mapping[str, Any]) -> str:
    return os.path.join(self.roots[record["dataset"]], record["image"])

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return f"VqaJsonSource(files={self.files!r}, len={len(self)})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self.records):
      raise IndexError(f"vqa: index {index} out of range [0, {len(self.records)})")
    r = self.records[index]
    image = captions_lib.decode_image(self.image_path(r), origin=f"{r['file']} line {r['line']}")
    gt = r["answer"] if r["dataset"] == "vqa" and r["answer"] else (
        [r["answer"]] if r["dataset"] == "vg" else [])
    qid = r["question_id"] if r["question_id"] is not None else -1 - index
    return {"image": image, "question": pre_question(r["question"], self.max_words),
            "answers": r.get("answers", []), "weights": r.get("weights", []),
            "gt_answers": list(gt), "question_id": qid, "kind": "", "index": index}


# --------------------------------------------------------------------------- accuracy
_NUMBERS = {w: str(i) for i, w in enumerate(("none", "one", "two", "three", "four", "five",
                                             "six", "seven", "eight", "nine", "ten"))}
_NUMBERS["zero"] = "0"
_ARTICLES = ("a", "an", "the")
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:']")


def normalize_answer(answer: str) -> str:
  """Lower case; punctuation dropped (a period only when not inside a number); number
  words to digits; articles dropped; whitespace collapsed."""
  a = answer.lower().replace("\n", " ").replace("\t", " ").strip()
  a = _PUNCT.sub("", a)
  a = re.sub(r"(?<!\d)\.|\.(?!\d)", "", a)
  words = [_NUMBERS.get(w, w) for w in a.split() if w not in _ARTICLES]
  return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
  """Official VQA accuracy in [0, 1]: the mean over each human left out of
  min(#other humans who gave `prediction` / 3, 1)."""
  if not human_answers:
    raise ValueError("vqa_accuracy: no human answers")
  pred = normalize_answer(prediction)
  gts = [normalize_answer(a) for a in human_answers]
  scores = []
  for i in range(len(gts)):
    matches = sum(g == pred for j, g in enumerate(gts) if j != i)
    scores.append(min(1.0, matches / 3.0))
  return float(np.mean(scores))
