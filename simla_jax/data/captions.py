"""ALBEF-style caption JSON files as a grain random-access source.

Each file is a JSON list of records `{"image": path, "caption": str | [str, ...]}`
(other keys are ignored); several files are concatenated in order. `image` is joined
to `image_root` unless absolute. Images are decoded with Pillow to RGB.

  src = CaptionJsonSource(["coco.json", "vg.json"], image_root="/data/images")
  ex = src[i]   # {"image": (H, W, 3) uint8, "captions": [str, ...], "index": i,
                #  "path": str}

Bad input raises a `ValueError` naming the file: a malformed JSON file (with line,
column and character position), a record without a string `image` or with no caption
(file and record number), a missing image file or one Pillow cannot decode
(`BadImageError`, image path and the JSON file / record it comes from). The pipeline
option `captions.skip_bad` skips bad images and counts them instead.
"""

import json
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from simla_jax.data import json_records


class BadImageError(ValueError):
  """An image that is missing or cannot be decoded; the message names the file."""


def read_caption_file(path: str) -> list[dict[str, Any]]:
  """Parses and validates one JSON file; returns records {image, captions}."""
  text = json_records.read_text(path, "captions")
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"captions: {path} is not valid JSON: {e.msg} at line {e.lineno} "
                     f"column {e.colno} (char {e.pos})") from e
  if not isinstance(records, list):
    raise ValueError(f"captions: {path} must hold a JSON list of records, "
                     f"found {type(records).__name__}")
  out = []
  for k, r in enumerate(records):
    where = f"captions: {path} record {k}"
    if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not r["image"]:
      raise ValueError(f"{where}: needs a non-empty string 'image'")
    caps = r.get("caption")
    caps = [caps] if isinstance(caps, str) else caps
    if (not isinstance(caps, list) or not caps
        or not all(isinstance(c, str) for c in caps)):
      raise ValueError(f"{where}: 'caption' must be a string or a non-empty list of strings")
    out.append({"image": r["image"], "captions": list(caps), "file": path, "record": k})
  return out


def decode_image(path: str, origin: str = "") -> np.ndarray:
  """(H, W, 3) uint8 RGB of an image file; `BadImageError` names the file."""
  suffix = f" ({origin})" if origin else ""
  if not os.path.isfile(path):
    raise BadImageError(f"captions: image file {path} does not exist{suffix}")
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadImageError(f"captions: cannot decode image {path}{suffix}: "
                        f"{type(e).__name__}: {e}") from e


class CaptionJsonSource:
  """Random-access source over the records of several caption JSON files."""

  def __init__(self, files: Sequence[str] | str, image_root: str = ""):
    files = [files] if isinstance(files, str) else list(files)
    if not files:
      raise ValueError("captions: no JSON files given")
    self.files = files
    self.image_root = image_root
    self.records = [r for f in files for r in read_caption_file(f)]

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return f"CaptionJsonSource(files={self.files!r}, len={len(self)})"

  def image_path(self, index: int) -> str:
    return os.path.join(self.image_root, self.records[index]["image"])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self.records):
      raise IndexError(f"captions: index {index} out of range [0, {len(self.records)})")
    r = self.records[index]
    path = self.image_path(index)
    image = decode_image(path, origin=f"{r['file']} record {r['record']}")
    return {"image": image, "captions": list(r["captions"]), "index": index, "path": path}
