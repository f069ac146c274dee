"""SIMLA datasets as TFDS array_record builds (no TensorFlow), and their reader.

Builders (`train_jax.tfds_build.LocalBuilder`; a config names the local inputs of each
split, nothing is downloaded; encoded images are stored as the files hold them):

  simla_captions  ALBEF caption JSON lists: pretraining (COCO, VG, CC3M, SBU) and
                  retrieval train ({"image", "caption": str, "image_id"}) / eval
                  ({"image", "caption": [str, ...]}). One example per record, in file
                  order; several files of a split are concatenated.
  simla_shapes    the built-in shapes world (PNG, so pixels are exact); options: the
                  `data.image_size` / `data.shapes.*` keys it was rendered with.
  simla_vqa       VQA / VG-QA: {"image", "question", "question_id", "answer": [...],
                  "dataset": "vqa" | "vg"}; the answer list goes into the metadata.
  simla_nlvr2     {"images": [a, b], "sentence", "label": "True" | "False"}.
  simla_snli_ve   {"image": Flickr30K id (".jpg" appended), "sentence", "label"}.
  simla_refcoco   RefCOCO+ grounding {"image", "text", "ref_id"}, with the detector
                  proposals of the record's image from a dets JSON when given.

Reading: `data.source = "tfds"` with `data.tfds_dir` and `data.tfds_name`
("simla_captions/coco_karpathy") makes `pipeline.make_source` return a
`TfdsCaptionSource` for the split: the same example dict as the direct readers
(`captions.CaptionJsonSource`, `shapes.ShapesSource`), decoded with Pillow, so the
pipeline's augmentation, batching and resume are unchanged.
"""

import io
import json
import os
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from simla_jax.data import captions as captions_lib
from train_jax import tfds_build
from train_jax.tfds_build import BadImage, BuildError, LocalBuilder, LocalConfig

Text = tfds.features.Text
Seq = tfds.features.Sequence
Scalar = tfds.features.Scalar


def _join(root: str, path: str) -> str:
  return os.path.join(root, path) if root else path


def _image(root: str, path: str, where: str) -> bytes:
  """Checked encoded bytes of `root/path`; raises `BadImage` naming it and `where`."""
  full = _join(root, path)
  data = tfds_build.read_file(full, where)
  tfds_build.check_image(data, f"{full} ({where})")
  return data


def _field(record: Any, key: str, kinds, where: str):
  if not isinstance(record, dict) or key not in record or not isinstance(record[key], kinds):
    names = kinds.__name__ if isinstance(kinds, type) else "/".join(k.__name__ for k in kinds)
    raise BuildError(f"{where}: needs {key!r} ({names})")
  return record[key]


# --- caption lists ------------------------------------------------------------------

class SimlaCaptions(LocalBuilder):
  """ALBEF caption / retrieval JSON lists + images under `image_root`."""

  DESCRIPTION = "ALBEF-format caption JSON lists (pretraining and retrieval)."

  def _features(self):
    return tfds.features.FeaturesDict({
        "image": tfds_build.encoded_feature(),
        "image_path": Text(),          # as the JSON gives it (relative to image_root)
        "captions": Seq(Text()),       # a string caption is a list of one
        "image_id": Text(),            # retrieval train JSON's image_id as a string, else ""
        "file": Text(),                # the JSON file and record the example comes from
        "record": Scalar(np.int64),
    })

  def _records(self, split, inputs):
    root = self.builder_config.image_root
    for path in inputs:
      # The direct reader's parser, so both see the same records and reject the same.
      parsed = captions_lib.read_caption_file(path)
      raw = tfds_build.load_json_list(path, "captions")
      for r, record in zip(parsed, raw):
        where = f"{path} record {r['record']}"
        try:
          data = _image(root, r["image"], where)
        except BadImage as e:
          yield e
          continue
        image_id = record.get("image_id", "")
        yield {"image": data, "image_path": r["image"], "captions": r["captions"],
               "image_id": "" if image_id is None else str(image_id), "file": path,
               "record": r["record"]}


# --- shapes world -------------------------------------------------------------------

def shapes_data_config(options: dict[str, Any]):
  """`config.data` for the shapes world with `options` ({"image_size": 64,
  "shapes.train_size": 1000, ...}) applied."""
  from simla_jax.data import default_data_config  # pylint: disable=import-outside-toplevel
  cfg = default_data_config()
  for key, value in options.items():
    *parents, last = key.split(".")
    target = cfg
    for name in parents:
      if name not in target:
        raise BuildError(f"simla_shapes: unknown option {key!r}")
      target = target[name]
    if last not in target:
      raise BuildError(f"simla_shapes: unknown option {key!r}")
    target[last] = tuple(value) if isinstance(value, list) else value
  return cfg


# Keys of `data.shapes` that only set how many examples a split has.
_SPLIT_SIZES = ("train_size", "val_size", "test_size", "comp_size")


def shapes_world(data_cfg) -> dict[str, Any]:
  """What fixes the pixels and words of a shapes world (JSON-able): image_size and every
  `shapes` key but the split sizes. A run reading a build must use the same."""
  world = {k: v for k, v in data_cfg.shapes.to_dict().items() if k not in _SPLIT_SIZES}
  world["image_size"] = int(data_cfg.image_size)
  return json.loads(json.dumps(world))  # tuples -> lists, as the metadata holds them


def check_shapes_world(built: dict[str, Any], data_cfg, where: str) -> None:
  """Raises a ValueError naming the first key where `data_cfg` differs from the build."""
  want = shapes_world(data_cfg)
  for key in sorted(set(built) | set(want)):
    if built.get(key) != want.get(key):
      name = key if key == "image_size" else f"shapes.{key}"
      raise ValueError(f"{where} was rendered with data.{name}={built.get(key)!r} but the "
                       f"config has {want.get(key)!r}; build it again or match the config")


def encode_png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
  return out.getvalue()


class SimlaShapes(LocalBuilder):
  """The procedural shapes world (simla_jax/data/shapes.py), rendered once."""

  DESCRIPTION = "Procedural shapes world: images, captions, boxes, referring phrases."

  def _features(self):
    return tfds.features.FeaturesDict({
        "image": tfds_build.encoded_feature(),   # PNG: decodes to the rendered pixels
        "captions": Seq(Text()),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
        "phrases": Seq(Text()),
        "keywords": Seq(Text()),
        "background": Text(),
        "index": Scalar(np.int64),
    })

  def _check_inputs(self, split, inputs):
    from simla_jax.data import shapes  # pylint: disable=import-outside-toplevel
    if split not in shapes.SPLITS:
      raise BuildError(f"simla_shapes: unknown split {split!r}; known {sorted(shapes.SPLITS)}")

  def _records(self, split, inputs):
    from simla_jax.data import shapes  # pylint: disable=import-outside-toplevel
    data_cfg = shapes_data_config(dict(self.builder_config.options))
    source = shapes.ShapesSource(data_cfg, split)
    self.derived[split] = {"world": shapes_world(data_cfg)}
    for i in range(len(source)):
      ex = source[i]
      yield {"image": encode_png(ex["image"]), "captions": ex["captions"],
             "boxes": ex["boxes"].astype(np.int32), "phrases": ex["phrases"],
             "keywords": ex["keywords"], "background": ex["background"], "index": i}


# --- VQA ----------------------------------------------------------------------------

class SimlaVqa(LocalBuilder):
  """VQA v2 + VG-QA in ALBEF's JSON. Images of "dataset": "vg" records are under the
  `vg_root` option, the others under `image_root`. Option `answer_list`: the JSON list
  of candidate answers, stored in the metadata of every split."""

  DESCRIPTION = "VQA / VG-QA questions with answers (ALBEF JSON)."

  def _features(self):
    return tfds.features.FeaturesDict({
        "image": tfds_build.encoded_feature(),
        "image_path": Text(),
        "question": Text(),
        "question_id": Text(),          # as the JSON gives it (int or string), as text
        "answers": Seq(Text()),         # empty for test questions
        "dataset": Text(),              # "vqa" | "vg"
    })

  def _check_inputs(self, split, inputs):
    super()._check_inputs(split, inputs)
    answer_list = self.builder_config.option("answer_list")
    if answer_list and not os.path.isfile(answer_list):
      raise BuildError(f"simla_vqa: answer list {answer_list} does not exist")

  def _records(self, split, inputs):
    cfg = self.builder_config
    answer_list = cfg.option("answer_list")
    if answer_list:
      answers = tfds_build.load_json_list(answer_list, "vqa answer list")
      if not all(isinstance(a, str) for a in answers):
        raise BuildError(f"simla_vqa: {answer_list} must be a JSON list of strings")
      self.derived[split] = {"answer_list": answers}
    for path in inputs:
      for k, record in enumerate(tfds_build.load_json_list(path, "vqa")):
        where = f"{path} record {k}"
        image = _field(record, "image", str, where)
        question = _field(record, "question", str, where)
        qid = str(_field(record, "question_id", (int, str), where))
        dataset = record.get("dataset", "vqa")
        if dataset not in ("vqa", "vg"):
          raise BuildError(f"{where}: 'dataset' is {dataset!r}, expected 'vqa' or 'vg'")
        answers = record.get("answer", [])
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
          raise BuildError(f"{where}: 'answer' must be a string or a list of strings")
        root = cfg.option("vg_root", "") if dataset == "vg" else cfg.image_root
        try:
          data = _image(root, image, where)
        except BadImage as e:
          yield e
          continue
        yield {"image": data, "image_path": image, "question": question, "question_id": qid,
               "answers": answers, "dataset": dataset}


# --- NLVR2 --------------------------------------------------------------------------

class SimlaNlvr2(LocalBuilder):
  """NLVR2 in ALBEF's JSON: two images, a sentence, label True / False."""

  DESCRIPTION = "NLVR2 image pairs with a sentence and a true/false label (ALBEF JSON)."

  def _features(self):
    return tfds.features.FeaturesDict({
        "image0": tfds_build.encoded_feature(),
        "image1": tfds_build.encoded_feature(),
        "image_paths": Seq(Text()),
        "sentence": Text(),
        "label": Scalar(np.int64),       # 1 = "True"
    })

  def _records(self, split, inputs):
    root = self.builder_config.image_root
    for path in inputs:
      for k, record in enumerate(tfds_build.load_json_list(path, "nlvr2")):
        where = f"{path} record {k}"
        images = _field(record, "images", list, where)
        if len(images) != 2 or not all(isinstance(p, str) for p in images):
          raise BuildError(f"{where}: 'images' must be a list of two paths")
        sentence = _field(record, "sentence", str, where)
        label = _field(record, "label", (str, bool), where)
        if str(label) not in ("True", "False"):
          raise BuildError(f"{where}: 'label' is {label!r}, expected 'True' or 'False'")
        try:
          data = [_image(root, p, where) for p in images]
        except BadImage as e:
          yield e
          continue
        yield {"image0": data[0], "image1": data[1], "image_paths": images,
               "sentence": sentence, "label": int(str(label) == "True")}


# --- SNLI-VE ------------------------------------------------------------------------

class SimlaSnliVe(LocalBuilder):
  """SNLI-VE in ALBEF's JSON: a Flickr30K image id (".jpg" appended), a sentence and a
  label string kept as given (the task maps it to a class)."""

  DESCRIPTION = "SNLI-VE image / hypothesis pairs (ALBEF JSON)."

  def _features(self):
    return tfds.features.FeaturesDict({
        "image": tfds_build.encoded_feature(),
        "image_path": Text(),
        "sentence": Text(),
        "label": Text(),
    })

  def _records(self, split, inputs):
    root = self.builder_config.image_root
    for path in inputs:
      for k, record in enumerate(tfds_build.load_json_list(path, "snli_ve")):
        where = f"{path} record {k}"
        image = str(_field(record, "image", (str, int), where)) + ".jpg"
        sentence = _field(record, "sentence", str, where)
        label = _field(record, "label", str, where)
        try:
          data = _image(root, image, where)
        except BadImage as e:
          yield e
          continue
        yield {"image": data, "image_path": image, "sentence": sentence, "label": label}


# --- RefCOCO+ -----------------------------------------------------------------------

def _coco_image_id(path: str) -> Optional[str]:
  """COCO_train2014_000000581857.jpg -> "581857" (the key of a dets JSON)."""
  stem = os.path.splitext(os.path.basename(path))[0]
  digits = stem.rsplit("_", 1)[-1]
  return str(int(digits)) if digits.isdigit() else None


class SimlaRefcoco(LocalBuilder):
  """RefCOCO+ weakly-supervised grounding in ALBEF's JSON ({"image", "text", "ref_id"}).
  Option `dets`: a JSON {COCO image id: [[x, y, w, h], ...]} of detector proposals;
  each example then carries its image's proposals (none when the image has no entry)."""

  DESCRIPTION = "RefCOCO+ referring expressions with detector proposals (ALBEF JSON)."

  def _features(self):
    return tfds.features.FeaturesDict({
        "image": tfds_build.encoded_feature(),
        "image_path": Text(),
        "text": Text(),
        "ref_id": Scalar(np.int64),
        "proposals": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),  # x, y, w, h
    })

  def _check_inputs(self, split, inputs):
    super()._check_inputs(split, inputs)
    dets = self.builder_config.option("dets")
    if dets and not os.path.isfile(dets):
      raise BuildError(f"simla_refcoco: detections file {dets} does not exist")

  def _records(self, split, inputs):
    cfg = self.builder_config
    dets = {}
    if cfg.option("dets"):
      dets = tfds_build.load_json(cfg.option("dets"), "refcoco dets")
      if not isinstance(dets, dict):
        raise BuildError(f"simla_refcoco: {cfg.option('dets')} must map image ids to boxes")
    for path in inputs:
      for k, record in enumerate(tfds_build.load_json_list(path, "refcoco")):
        where = f"{path} record {k}"
        image = _field(record, "image", str, where)
        text = _field(record, "text", str, where)
        ref_id = _field(record, "ref_id", (int, str), where)
        if not str(ref_id).isdigit():
          raise BuildError(f"{where}: ref_id {ref_id!r} is not a non-negative integer")
        boxes = dets.get(_coco_image_id(image) or "", [])
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) if len(boxes) else \
            np.zeros((0, 4), np.float32)
        try:
          data = _image(cfg.image_root, image, where)
        except BadImage as e:
          yield e
          continue
        yield {"image": data, "image_path": image, "text": text, "ref_id": int(ref_id),
               "proposals": boxes}


BUILDERS = {cls.name: cls for cls in (SimlaCaptions, SimlaShapes, SimlaVqa, SimlaNlvr2,
                                      SimlaSnliVe, SimlaRefcoco)}


# --- reading ------------------------------------------------------------------------

def decode_image(data: bytes, where: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB of encoded bytes, as `captions.decode_image` decodes files."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise captions_lib.BadImageError(f"{where}: cannot decode image: "
                                     f"{type(e).__name__}: {e}") from e


class TfdsCaptionSource:
  """A split of a `simla_captions` / `simla_shapes` build as the pipeline's source.

  `[i]` -> {"image": uint8 (H, W, 3), "captions": [str], "index": i, "path": str} plus
  the build's other columns (image_id, boxes, phrases ...), as the direct readers give.
  With `data_cfg`, a shapes build must have been rendered with its world settings.
  """

  def __init__(self, tfds_dir: str, tfds_name: str, split: str, data_cfg: Any = None):
    self.split = tfds_build.open_split(tfds_dir, tfds_name, split)
    self.source = self.split.source
    keys = set(self.split.features.keys())
    if not {"image", "captions"} <= keys:
      raise ValueError(f"{self.split.dir}: not an image-caption dataset (features "
                       f"{sorted(keys)}); build it with simla_captions or simla_shapes")
    if data_cfg is not None and "world" in self.split.metadata:
      # The shapes vocabulary and captions follow the config: they must be the build's.
      check_shapes_world(self.split.metadata["world"], data_cfg,
                         f"{self.split.dir} split {split!r}")

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f"TfdsCaptionSource({self.split.dir!r}, split={self.split.name!r}, len={len(self)})"

  def where(self, index: int) -> str:
    return f"{self.split.dir} split {self.split.name} example {index}"

  def captions_of(self, index: int) -> list[str]:
    return tfds_build.texts(self.source[int(index)]["captions"])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.where(index)}: out of range [0, {len(self)})")
    r = self.source[index]
    path = tfds_build.text(r["image_path"]) if "image_path" in r else ""
    out = {"image": decode_image(r["image"], f"{self.where(index)} ({path})"),
           "captions": tfds_build.texts(r["captions"]), "index": index, "path": path}
    for key in ("image_id", "background"):
      value = tfds_build.text(r[key]) if key in r else ""
      if value:   # "" stores "absent" (a pretraining caption list has no image_id)
        out[key] = value
    for key in ("phrases", "keywords"):
      if key in r:
        out[key] = tfds_build.texts(r[key])
    if "boxes" in r:
      out["boxes"] = np.asarray(r["boxes"], np.int32).reshape(-1, 4)
    return out


def make_config(builder: str, name: str, splits: dict[str, list[str]], *, image_root: str = "",
                max_bad_fraction: float = 0.0,
                options: Optional[dict[str, Any]] = None) -> LocalConfig:
  if builder not in BUILDERS:
    raise ValueError(f"unknown SIMLA builder {builder!r}; known {sorted(BUILDERS)}")
  return LocalConfig(name=name, splits=tuple((s, tuple(f)) for s, f in splits.items()),
                     image_root=image_root, max_bad_fraction=float(max_bad_fraction),
                     options=tfds_build.as_config(options))


def build(builder: str, config: LocalConfig, out: str, overwrite: bool = False
          ) -> dict[str, Any]:
  """Builds `config` with builder `builder` under `out`; returns the summary."""
  return tfds_build.build(BUILDERS[builder](config=config, data_dir=out), overwrite)
