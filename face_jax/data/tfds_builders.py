"""Face datasets as TFDS array_record builds (no TensorFlow), and their readers.

Builders (`train_jax.tfds_build.LocalBuilder`; local inputs only, encoded images kept
as they are, a record that does not read or decode is skipped, named and counted):

  face_recordio      an insightface `.rec/.idx` pack per split (inputs: the prefix, and
                     optionally a .npz of per-image columns, e.g. pose / occlusion /
                     blur / quality, one array of len(pack) values each). Option
                     `group_of_class`: a .npy (num_classes,) group id per identity,
                     stored as a per-image `group` column and in the metadata.
  face_folder        `root/<identity>/<image>` folders, one per split.
  face_verification  verification `.bin` packs, one split per pack (lfw, cfp_fp, ...):
                     pair k = (image_a, image_b, issame).
  face_synthetic     the synthetic biased faces (float32 images, exact) of a
                     `config.data` given as options, splits train / meta / test.

Every image split records in its metadata what the readers need without a pass over
the data: num_classes, identity_ranges (of the kept rows) and group_of_class.

Reading: `config.data.source = "tfds"` with `tfds_dir`, `tfds_name` (and `tfds_split`,
`tfds_meta_split`, `tfds_val_name`) makes `pipeline.make_source` return a
`TfdsFaceSource`, which gives what `RecordIO` / `ImageFolder` give.
"""

import os
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds

from face_jax.data import recordio, verification
from face_jax.data.folders import ImageFolder
from face_jax.data.recordio import BadRecordError, RecordIO
from train_jax import tfds_build
from train_jax.tfds_build import BadImage, BuildError, LocalBuilder, LocalConfig

Scalar = tfds.features.Scalar
_RESERVED = ("image", "label", "group", "source_index")


def identity_ranges(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
  """int64 (num_classes, 2) [start, end) rows of each identity; labels must come
  grouped by identity (insightface packs and image folders are). Empty: (0, 0)."""
  labels = np.asarray(labels, np.int64)
  ranges = np.zeros((num_classes, 2), np.int64)
  if not len(labels):
    return ranges
  change = np.flatnonzero(np.diff(labels)) + 1
  starts = np.concatenate([[0], change])
  ends = np.concatenate([change, [len(labels)]])
  run_labels = labels[starts]
  if len(np.unique(run_labels)) != len(run_labels):
    raise BuildError(f"{where}: images of one identity are not contiguous")
  if run_labels.max() >= num_classes:
    raise BuildError(f"{where}: label {run_labels.max()} >= num_classes {num_classes}")
  ranges[run_labels, 0], ranges[run_labels, 1] = starts, ends
  return ranges


def _load_group_of_class(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise BuildError(f"face_recordio: group_of_class file {path} does not exist")
  groups = np.load(path, allow_pickle=False)
  if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer):
    raise BuildError(f"{path}: expected (num_classes,) integer group ids, got "
                     f"{groups.dtype} {groups.shape}")
  return groups.astype(np.int64)


def _load_attributes(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise BuildError(f"face_recordio: attribute file {path} does not exist")
  with np.load(path, allow_pickle=False) as z:
    columns = {k: z[k] for k in z.files}
  for name, values in columns.items():
    if name in _RESERVED or not name.isidentifier():
      raise BuildError(f"{path}: column name {name!r} is reserved or not an identifier")
    if values.ndim != 1 or values.dtype.kind not in "biuf":
      raise BuildError(f"{path}: column {name!r} must be one number per image, got "
                       f"{values.dtype} {values.shape}")
  return columns


def _column_feature(values: np.ndarray) -> tfds.features.Scalar:
  return Scalar(np.float32 if values.dtype.kind == "f" else np.int64)


class _FaceImages(LocalBuilder, skip_registration=True):
  """Shared by the image builders: image bytes + label per row, derived metadata."""

  def _base_features(self) -> dict[str, Any]:
    return {"image": tfds_build.encoded_feature(), "label": Scalar(np.int64),
            "source_index": Scalar(np.int64)}   # the row in the input (RecordIO index ...)

  def _rows(self, split, read, where, n, num_classes, extra=None):
    """Yields checked rows 0..n-1 of a source: read(i) -> (label, bytes)."""
    labels = []
    for i in range(n):
      try:
        label, data = read(i)
        tfds_build.check_image(data, where(i))
      except (BadRecordError, BadImage) as e:
        yield BadImage(str(e))
        continue
      labels.append(label)
      yield {"image": data, "label": label, "source_index": i, **(extra(i, label) if extra else {})}
    name = f"{self.name}/{self.builder_config.name} split {split!r}"
    self.derived[split] = {"num_classes": int(num_classes),
                           "identity_ranges": identity_ranges(labels, num_classes, name).tolist(),
                           **self.derived.get(split, {})}


class FaceRecordio(_FaceImages):
  """insightface `.rec/.idx` packs (labels; group and attribute columns when given)."""

  DESCRIPTION = "Face images and identity labels from insightface RecordIO packs."

  def _columns(self) -> dict[str, np.ndarray]:
    """The attribute columns (name -> dtype sample) shared by every split's .npz."""
    names = {}
    for split, inputs in self.builder_config.splits:
      if len(inputs) > 1:
        cols = _load_attributes(inputs[1])
        names[split] = {k: v[:0] for k, v in cols.items()}
    if not names:
      return {}
    first = next(iter(names.values()))
    for split, cols in names.items():
      if sorted(cols) != sorted(first) or len(names) != len(self.builder_config.splits):
        raise BuildError(f"face_recordio: every split needs the same attribute columns; "
                         f"split {split!r} has {sorted(cols)}")
    return first

  def _features(self):
    features = self._base_features()
    if self.builder_config.option("group_of_class"):
      features["group"] = Scalar(np.int64)
    for name, sample in self._columns().items():
      features[name] = _column_feature(sample)
    return tfds.features.FeaturesDict(features)

  def _check_inputs(self, split, inputs):
    if not 1 <= len(inputs) <= 2:
      raise BuildError(f"face_recordio split {split!r}: inputs are (rec prefix[, attributes.npz])")
    for path in (inputs[0] + ".rec", inputs[0] + ".idx") + tuple(inputs[1:]):
      if not os.path.isfile(path):
        raise BuildError(f"face_recordio split {split!r}: input {path} does not exist")

  def _records(self, split, inputs):
    pack = RecordIO(inputs[0])
    columns = _load_attributes(inputs[1]) if len(inputs) > 1 else {}
    for name, values in columns.items():
      if len(values) != len(pack):
        raise BuildError(f"{inputs[1]}: column {name!r} has {len(values)} values for the "
                         f"{len(pack)} images of {pack.rec_path}")
    groups = None
    if self.builder_config.option("group_of_class"):
      groups = _load_group_of_class(self.builder_config.option("group_of_class"))
      if len(groups) != pack.num_classes:
        raise BuildError(f"{self.builder_config.option('group_of_class')}: {len(groups)} group "
                         f"ids for the {pack.num_classes} classes of {pack.rec_path}")
      self.derived[split] = {"group_of_class": groups.tolist()}

    def extra(i, label):
      out = {name: values[i] for name, values in columns.items()}
      if groups is not None:
        out["group"] = int(groups[label])
      return out

    yield from self._rows(split, pack.read, pack.where, len(pack), pack.num_classes, extra)


class FaceFolder(_FaceImages):
  """`root/<identity>/<image>` folders (labels = sorted identity folder positions)."""

  DESCRIPTION = "Face images and identity labels from root/<identity>/<image> folders."

  def _features(self):
    return tfds.features.FeaturesDict({**self._base_features(), "path": tfds.features.Text()})

  def _records(self, split, inputs):
    (root,) = inputs
    folder = ImageFolder(root)
    self.derived[split] = {"identity_names": folder.identity_names}
    extra = lambda i, label: {"path": folder._paths[i]}  # pylint: disable=protected-access
    yield from self._rows(split, folder.read, folder.where, len(folder), folder.num_classes,
                          extra)


class FaceVerification(LocalBuilder):
  """Verification `.bin` packs, one split per pack: (image_a, image_b, issame) per pair."""

  DESCRIPTION = "Face verification pairs from insightface .bin packs."

  def _features(self):
    return tfds.features.FeaturesDict({
        "image_a": tfds_build.encoded_feature(), "image_b": tfds_build.encoded_feature(),
        "issame": Scalar(np.bool_), "pair": Scalar(np.int64)})

  def _records(self, split, inputs):
    (path,) = inputs
    encoded, issame = verification.read_bin(path)
    for k, same in enumerate(issame):
      try:
        for j in (2 * k, 2 * k + 1):
          tfds_build.check_image(encoded[j], f"{path}: image {j} (pair {k})")
      except BadImage as e:
        yield e
        continue
      yield {"image_a": encoded[2 * k], "image_b": encoded[2 * k + 1], "issame": bool(same),
             "pair": k}


def synthetic_data_config(options: dict[str, Any]):
  """configs/mvcom.py's `config.data` with `options` applied; "seed" is the world seed."""
  from configs import mvcom  # pylint: disable=import-outside-toplevel
  data = mvcom.get_config().data
  for key, value in options.items():
    if key == "seed":
      continue
    if key not in data:
      raise BuildError(f"face_synthetic: unknown option {key!r}")
    data[key] = tuple(value) if isinstance(value, list) else value
  return data


class FaceSynthetic(LocalBuilder):
  """The synthetic biased faces (face_jax/data/synthetic.py) rendered once."""

  DESCRIPTION = "Procedural biased faces with group and variation attributes."
  _CHUNK = 256

  def _features(self):
    data = synthetic_data_config(dict(self.builder_config.options))
    shape = (data.image_size, data.image_size, data.channels)
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=shape, dtype=np.float32),
        "label": Scalar(np.int64), "group": Scalar(np.int64), "pose": Scalar(np.int64),
        "occlusion": Scalar(np.int64), "blur": Scalar(np.int64),
        "class_prior": Scalar(np.float32)})

  def _check_inputs(self, split, inputs):
    from face_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    if split not in synthetic.SPLITS:
      raise BuildError(f"face_synthetic: unknown split {split!r}; known {sorted(synthetic.SPLITS)}")

  def _records(self, split, inputs):
    from face_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    options = dict(self.builder_config.options)
    world = synthetic.SyntheticFaces(synthetic_data_config(options), int(options.get("seed", 0)))
    n = world.size(split)
    self.derived[split] = {"num_classes": world.num_classes, "options": options}
    for start in range(0, n, self._CHUNK):
      batch = world.examples(split, np.arange(start, min(n, start + self._CHUNK)))
      for b in range(len(batch["label"])):
        yield {k: v[b] for k, v in batch.items()}


BUILDERS = {cls.name: cls for cls in (FaceRecordio, FaceFolder, FaceVerification,
                                      FaceSynthetic)}


# --- reading ------------------------------------------------------------------------

class TfdsFaceSource:
  """A split of a `face_recordio` / `face_folder` build as the face pipeline's source.

  `[i]` -> {"image": uint8 (H, W, 3) RGB, "label": int}, decoded as `RecordIO` does;
  `read(i)` -> (label, encoded bytes); `where(i)` names the row. num_classes,
  identity_ranges and group_of_class (None when the build had none) come from the
  build's metadata.
  """

  def __init__(self, tfds_dir: str, tfds_name: str, split: str = "train"):
    self.split = tfds_build.open_split(tfds_dir, tfds_name, split)
    self.source = self.split.source
    meta = self.split.metadata
    if "identity_ranges" not in meta or "image" not in self.split.features.keys():
      raise ValueError(f"{self.split.dir}: split {split!r} is not a face image build "
                       "(face_recordio / face_folder)")
    self.num_classes = int(meta["num_classes"])
    self.identity_ranges = np.asarray(meta["identity_ranges"], np.int64).reshape(-1, 2)
    groups = meta.get("group_of_class")
    self.group_of_class = None if groups is None else np.asarray(groups, np.int64)

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f"TfdsFaceSource({self.split.dir!r}, split={self.split.name!r}, len={len(self)})"

  def where(self, i: int) -> str:
    return f"{self.split.dir} split {self.split.name} example {int(i)}"

  def read(self, i: int) -> tuple[int, bytes]:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"{self.where(i)}: out of range [0, {len(self)})")
    r = self.source[i]
    return int(r["label"]), r["image"]

  def __getitem__(self, i: int) -> dict[str, Any]:
    label, data = self.read(i)
    return {"image": recordio.decode_image(data, self.where(i)), "label": label}

  def labels(self) -> np.ndarray:
    starts, ends = self.identity_ranges[:, 0], self.identity_ranges[:, 1]
    return np.repeat(np.arange(self.num_classes), ends - starts)


def load_val_packs(tfds_dir: str, tfds_name: str, image_size=(112, 112)
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every split of a `face_verification` build -> {pack: (uint8 (2N, H, W, 3), issame (N,))},
  as `verification.load_bin` returns for the .bin it was built from."""
  path = tfds_build.dataset_dir(tfds_dir, tfds_name)
  builder = tfds.builder_from_directory(path)
  out = {}
  for name in builder.info.splits.keys():
    source = builder.as_data_source(name)
    pairs = [source[k] for k in range(len(source))]
    encoded = [p[key] for p in pairs for key in ("image_a", "image_b")]
    issame = np.array([bool(p["issame"]) for p in pairs], bool)
    out[name] = verification.decode_pairs(encoded, issame, f"{path} split {name}", image_size)
  return out


def make_config(builder: str, name: str, splits: dict[str, list[str]], *,
                max_bad_fraction: float = 0.0,
                options: Optional[dict[str, Any]] = None) -> LocalConfig:
  if builder not in BUILDERS:
    raise ValueError(f"unknown face builder {builder!r}; known {sorted(BUILDERS)}")
  return LocalConfig(name=name, splits=tuple((s, tuple(f)) for s, f in splits.items()),
                     max_bad_fraction=float(max_bad_fraction),
                     options=tfds_build.as_config(options))


def build(builder: str, config: LocalConfig, out: str, overwrite: bool = False
          ) -> dict[str, Any]:
  """Builds `config` with builder `builder` under `out`; returns the summary."""
  return tfds_build.build(BUILDERS[builder](config=config, data_dir=out), overwrite)
