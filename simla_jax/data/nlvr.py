"""Official NLVR2 files (ALBEF / SIMLA `nlvr_{train,dev,test}.json`).

A file is a JSON list, or one JSON object per line, of records
  {"images": [left path, right path], "sentence": str, "label": "True" | "False"}
(a JSON boolean label is accepted too); image paths are joined to `image_root`. Labels
follow the official dataset: True -> 1, False -> 0.

Errors name the file and the line of the record. With `skip_bad`, a record that fails
(malformed JSON line of a JSON-lines file, missing key, bad label, an image file that
does not exist) is dropped and counted instead (`NlvrJsonSource.skipped`, with the
reasons in `skip_reasons`); a malformed JSON list cannot be resynchronised and is always
an error.

  src = NlvrJsonSource(["nlvr_dev.json"], image_root="nlvr2/", check_images=True)
  src[i]  # {"image0", "image1": uint8 HWC, "sentence", "label": 0|1, "kind": "", "index"}
"""

import os
from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax.data import captions as captions_lib
from simla_jax.data import json_records

LABELS = {"False": 0, "True": 1, False: 0, True: 1}


class NlvrFormatError(ValueError):
  """A record that does not follow the official format; the message names file and line."""


def parse_record(record: Any, where: str) -> dict[str, Any]:
  """Validates one record -> {images: (str, str), sentence, label}; errors start `where`."""
  if not isinstance(record, Mapping):
    raise NlvrFormatError(f"{where}: a record must be a JSON object, found "
                          f"{type(record).__name__}")
  images = record.get("images")
  if (not isinstance(images, (list, tuple)) or len(images) != 2
      or not all(isinstance(p, str) and p for p in images)):
    raise NlvrFormatError(f"{where}: 'images' must be a list of two image paths, found "
                          f"{images!r}")
  sentence = record.get("sentence")
  if not isinstance(sentence, str) or not sentence.strip():
    raise NlvrFormatError(f"{where}: needs a non-empty string 'sentence'")
  label = record.get("label")
  if label not in LABELS or isinstance(label, (int, float)) and not isinstance(label, bool):
    raise NlvrFormatError(f"{where}: label {label!r} is not 'True' or 'False'")
  return {"images": (images[0], images[1]), "sentence": sentence, "label": LABELS[label]}


def read_nlvr_file(path: str, skip_bad: bool = False) -> tuple[list[dict], list[str]]:
  """(records {images, sentence, label, file, line}, messages of the skipped ones)."""
  text = json_records.read_text(path, "nlvr")
  skipped: list[str] = []
  records = []
  for line, value in json_records.raw_records(path, text, "nlvr", error=NlvrFormatError,
                                               skipped=skipped if skip_bad else None):
    try:
      r = parse_record(value, f"nlvr: {path} line {line}")
    except NlvrFormatError as e:
      if not skip_bad:
        raise
      skipped.append(str(e))
      continue
    records.append(dict(r, file=path, line=line))
  if not records:
    raise NlvrFormatError(f"nlvr: {path} holds no usable records "
                          f"({len(skipped)} skipped)")
  return records, skipped


class NlvrJsonSource:
  """Random-access source over official NLVR2 files (see module doc).

  check_images: look for every image file now, so a missing one stops the run (or, with
  skip_bad, drops its record) before training, naming the file and line.
  """

  def __init__(self, files: Sequence[str] | str, image_root: str = "", *,
               check_images: bool = True, skip_bad: bool = False):
    files = [files] if isinstance(files, str) else list(files)
    if not files:
      raise ValueError("nlvr: no JSON files given")
    self.files, self.image_root = files, image_root
    self.skip_reasons: list[str] = []
    records = []
    for f in files:
      rs, bad = read_nlvr_file(f, skip_bad)
      records += rs
      self.skip_reasons += bad
    if check_images:
      kept, exists = [], {}
      for r in records:
        missing = [p for p in self.image_paths(r)
                   if exists.setdefault(p, os.path.isfile(p)) is False]
        if missing:
          message = (f"nlvr: image file {missing[0]} does not exist ({r['file']} line "
                     f"{r['line']})")
          if not skip_bad:
            raise captions_lib.BadImageError(message)
          self.skip_reasons.append(message)
          continue
        kept.append(r)
      records = kept
    if not records:
      raise NlvrFormatError(f"nlvr: no usable records in {files}")
    self.records = records
    self.labels = np.array([r["label"] for r in records], np.int32)

  @property
  def skipped(self) -> int:
    return len(self.skip_reasons)

  def image_paths(self, record: Mapping[str, Any]) -> tuple[str, str]:
    return tuple(os.path.join(self.image_root, p) for p in record["images"])

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return f"NlvrJsonSource(files={self.files!r}, len={len(self)}, skipped={self.skipped})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self.records):
      raise IndexError(f"nlvr: index {index} out of range [0, {len(self.records)})")
    r = self.records[index]
    origin = f"{r['file']} line {r['line']}"
    image0, image1 = (captions_lib.decode_image(p, origin=origin) for p in self.image_paths(r))
    return {"image0": image0, "image1": image1, "sentence": r["sentence"], "label": r["label"],
            "kind": "", "index": index}
