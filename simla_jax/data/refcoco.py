"""RefCOCO+ in the official Grounding.py formats (ALBEF / SIMLA `data/` release).

Files (config.data.refcoco):
  train_file   refcoco+_train.json  [{"image": "train2014/COCO_...jpg", "text": str}, ...];
               the image id of ITC / ITM is the image's file name (official `img_ids`)
  eval files   refcoco+_val.json, refcoco+_test.json  [{"image", "text", "ref_id"}, ...];
               the split of a record (val / testA / testB) is its ref's
  refer_dir    the REFER toolkit's `refs(unc).p` (a pickle: list of {ref_id, ann_id,
               image_id, split, ...}) and `instances.json` (COCO: images {id, height,
               width}, annotations {id, image_id, bbox})
  det_file     dets.json   {"<image id>": [[x, y, w, h, ...], ...]}  detector proposals
  coco_file    cocos.json  same layout, the COCO ground-truth boxes (optional)

Records are JSON lists or JSON lines; every error names the file and the line (or the
image id and entry of a box file). `refs(unc).p` is read by an unpickler that builds
only plain containers (dict, list, str, numbers): any class reference is refused.
Boxes are COCO (x, y, w, h) in pixels of the original image; one outside the image
(beyond a one-pixel tolerance) or with w, h <= 0 is an error.
"""

import dataclasses
import io
import json
import os
import pickle
from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax.data import captions as captions_lib
from simla_jax.data import json_records

WHAT = "refcoco"
SPLITS = ("val", "testA", "testB")
BOX_TOLERANCE = 1.0   # pixels a box may stick out of its image (rounding in the files)


def read_expressions(path: str, *, with_ref_id: bool) -> list[dict[str, Any]]:
  """Validated records {image, text, ref_id (eval) , file, line} of one expression file."""
  records = []
  for line, r in json_records.raw_records(path, json_records.read_text(path, WHAT), WHAT):
    where = f"{WHAT}: {path} line {line}"
    if not isinstance(r, dict):
      raise ValueError(f"{where}: a record must be a JSON object, found {type(r).__name__}")
    if not isinstance(r.get("image"), str) or not r["image"]:
      raise ValueError(f"{where}: needs a non-empty string 'image' (path under image_root)")
    if not isinstance(r.get("text"), str) or not r["text"].strip():
      raise ValueError(f"{where}: needs a non-empty string 'text'")
    out = {"image": r["image"], "text": r["text"], "file": path, "line": line}
    if with_ref_id:
      if not isinstance(r.get("ref_id"), int) or isinstance(r.get("ref_id"), bool):
        raise ValueError(f"{where}: needs an integer 'ref_id'")
      out["ref_id"] = r["ref_id"]
    records.append(out)
  if not records:
    raise ValueError(f"{WHAT}: {path} holds no records")
  return records


class UnsafePickleError(ValueError):
  pass


class _PlainUnpickler(pickle.Unpickler):
  """Builds dicts, lists, tuples, strings and numbers only: every global is refused."""

  def __init__(self, file, where: str):
    super().__init__(file, encoding="latin-1")
    self._where = where

  def find_class(self, module, name):
    raise UnsafePickleError(f"{WHAT}: {self._where} references {module}.{name}; only plain "
                            f"containers are accepted in refs(unc).p")

  def persistent_load(self, pid):
    raise UnsafePickleError(f"{WHAT}: {self._where}: persistent id {pid!r} is not allowed")


def read_refs_pickle(path: str) -> list[dict[str, Any]]:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FileNotFoundError(f"{WHAT}: cannot read {path}: {e}") from e
  try:
    refs = _PlainUnpickler(io.BytesIO(data), path).load()
  except UnsafePickleError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any corruption: name the file
    raise ValueError(f"{WHAT}: {path} is not a readable pickle: {type(e).__name__}: {e}") from e
  if not isinstance(refs, list):
    raise ValueError(f"{WHAT}: {path} must hold a list of refs, found {type(refs).__name__}")
  return refs


@dataclasses.dataclass(frozen=True)
class Ref:
  ref_id: int
  image_id: int
  split: str
  box: tuple[float, float, float, float]   # ground truth (x, y, w, h)
  height: int
  width: int


def check_box(box: Any, height: int, width: int, where: str) -> tuple[float, float, float, float]:
  """A COCO (x, y, w, h[, ...]) box inside a height x width image, else an error at `where`."""
  if not isinstance(box, (list, tuple)) or len(box) < 4 or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in box[:4]):
    raise ValueError(f"{where}: a box is [x, y, w, h, ...] numbers, got {box!r}")
  x, y, w, h = (float(v) for v in box[:4])
  if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
    raise ValueError(f"{where}: box {list(box[:4])} needs finite values and w, h > 0")
  t = BOX_TOLERANCE
  if x < -t or y < -t or x + w > width + t or y + h > height + t:
    raise ValueError(f"{where}: box {list(box[:4])} lies outside the {width} x {height} image")
  return x, y, w, h


def read_refer(refer_dir: str) -> dict[int, Ref]:
  """ref_id -> Ref from the REFER toolkit files of `refer_dir`."""
  refs_path = os.path.join(refer_dir, "refs(unc).p")
  inst_path = os.path.join(refer_dir, "instances.json")
  refs = read_refs_pickle(refs_path)
  try:
    instances = json.loads(json_records.read_text(inst_path, WHAT))
  except json.JSONDecodeError as e:
    raise ValueError(f"{WHAT}: {inst_path} line {e.lineno} column {e.colno}: malformed JSON "
                     f"({e.msg})") from e
  if not isinstance(instances, dict) or not {"images", "annotations"} <= set(instances):
    raise ValueError(f"{WHAT}: {inst_path} must be a COCO dict with 'images' and 'annotations'")
  images = {}
  for k, im in enumerate(instances["images"]):
    try:
      images[int(im["id"])] = (int(im["height"]), int(im["width"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{WHAT}: {inst_path} images[{k}] needs integer id, height, width") from e
  anns = {}
  for k, a in enumerate(instances["annotations"]):
    if not isinstance(a, dict) or not {"id", "image_id", "bbox"} <= set(a):
      raise ValueError(f"{WHAT}: {inst_path} annotations[{k}] needs id, image_id, bbox")
    anns[int(a["id"])] = a
  out = {}
  for k, r in enumerate(refs):
    where = f"{WHAT}: {refs_path} ref {k}"
    if not isinstance(r, dict) or not {"ref_id", "ann_id", "image_id", "split"} <= set(r):
      raise ValueError(f"{where}: needs ref_id, ann_id, image_id, split")
    ann = anns.get(int(r["ann_id"]))
    if ann is None:
      raise ValueError(f"{where}: ann_id {r['ann_id']} is not in {inst_path}")
    hw = images.get(int(r["image_id"]))
    if hw is None:
      raise ValueError(f"{where}: image_id {r['image_id']} is not in {inst_path}")
    box = check_box(ann["bbox"], *hw, where=f"{inst_path} annotation {ann['id']}")
    out[int(r["ref_id"])] = Ref(int(r["ref_id"]), int(r["image_id"]), str(r["split"]), box, *hw)
  return out


def read_boxes(path: str, sizes: Mapping[int, tuple[int, int]]) -> dict[int, np.ndarray]:
  """image id -> (n, 4) float boxes (x, y, w, h) of dets.json / cocos.json, checked
  against the image sizes (height, width) of the images they are read for."""
  try:
    raw = json.loads(json_records.read_text(path, WHAT))
  except json.JSONDecodeError as e:
    raise ValueError(f"{WHAT}: {path} line {e.lineno} column {e.colno}: malformed JSON "
                     f"({e.msg})") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{WHAT}: {path} must map image ids to box lists")
  out = {}
  for key, boxes in raw.items():
    try:
      image_id = int(key)
    except ValueError as e:
      raise ValueError(f"{WHAT}: {path}: key {key!r} is not an image id") from e
    if image_id not in sizes:
      continue   # images of other splits
    if not isinstance(boxes, list):
      raise ValueError(f"{WHAT}: {path} image {key}: expected a list of boxes")
    out[image_id] = np.array(
        [check_box(b, *sizes[image_id], where=f"{WHAT}: {path} image {key} box {k}")
         for k, b in enumerate(boxes)], np.float64).reshape(-1, 4)
  return out


def _check_images(records: Sequence[Mapping[str, Any]], image_root: str) -> None:
  seen = set()
  for r in records:
    path = os.path.join(image_root, r["image"])
    if path not in seen:
      seen.add(path)
      if not os.path.isfile(path):
        raise captions_lib.BadImageError(
            f"{WHAT}: image file {path} does not exist ({r['file']} line {r['line']})")


class RefcocoTrain:
  """Fine-tuning records {image, captions: [text], index, image_id}; image id = file name."""

  def __init__(self, files: Sequence[str] | str, image_root: str, *, check_images: bool = True):
    files = [files] if isinstance(files, str) else list(files)
    self.records = [r for f in files for r in read_expressions(f, with_ref_id=False)]
    self.image_root = image_root
    ids = {}
    self.image_ids = [ids.setdefault(os.path.basename(r["image"]), len(ids))
                      for r in self.records]
    self.num_images = len(ids)
    if check_images:
      _check_images(self.records, image_root)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    r = self.records[int(index)]
    image = captions_lib.decode_image(os.path.join(self.image_root, r["image"]),
                                      origin=f"{r['file']} line {r['line']}")
    return {"image": image, "captions": [r["text"]], "index": int(index),
            "image_id": self.image_ids[int(index)]}


class RefcocoEval:
  """Eval records of the official val / test files with their refs and proposals:
  {image, text, proposals (p, 4) xywh, truth (4,) xywh, split, ref_id, index}; `coco`
  adds the ground-truth COCO boxes as "coco_proposals"."""

  def __init__(self, files: Sequence[str] | str, image_root: str, refer: Mapping[int, Ref],
               det_file: str, coco_file: str = "", *, check_images: bool = True):
    files = [files] if isinstance(files, str) else list(files)
    self.records = [r for f in files for r in read_expressions(f, with_ref_id=True)]
    self.image_root = image_root
    for r in self.records:
      if r["ref_id"] not in refer:
        raise ValueError(f"{WHAT}: {r['file']} line {r['line']}: ref_id {r['ref_id']} is not "
                         f"in refs(unc).p")
    self.refs = [refer[r["ref_id"]] for r in self.records]
    sizes = {ref.image_id: (ref.height, ref.width) for ref in self.refs}
    self.dets = read_boxes(det_file, sizes)
    self.cocos = read_boxes(coco_file, sizes) if coco_file else None
    for r, ref in zip(self.records, self.refs):
      for name, table in (("det_file", self.dets), ("coco_file", self.cocos)):
        if table is not None and not len(table.get(ref.image_id, ())):
          raise ValueError(f"{WHAT}: {name} has no box for image {ref.image_id} "
                           f"({r['file']} line {r['line']})")
    if check_images:
      _check_images(self.records, image_root)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    r, ref = self.records[int(index)], self.refs[int(index)]
    image = captions_lib.decode_image(os.path.join(self.image_root, r["image"]),
                                      origin=f"{r['file']} line {r['line']}")
    out = {"image": image, "text": r["text"], "proposals": self.dets[ref.image_id],
           "truth": np.array(ref.box, np.float64), "split": ref.split, "ref_id": ref.ref_id,
           "height": ref.height, "width": ref.width, "index": int(index)}
    if self.cocos is not None:
      out["coco_proposals"] = self.cocos[ref.image_id]
    return out
