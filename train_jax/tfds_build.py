"""Datasets built once as TFDS array_record files from local inputs, read by index.

What both families' builders share (`simla_jax/data/tfds_builders.py`,
`face_jax/data/tfds_builders.py`). No TensorFlow is needed: a `LocalBuilder` is a TFDS
`GeneratorBasedBuilder` that writes array_record, keeps the generation order
(`disable_shuffling`), stores encoded images as raw bytes (`Tensor(shape=(), object)`,
not the `Image` feature, which needs TensorFlow) and is read back with
`as_data_source` / `builder_from_directory`.

A build reads local files only (no downloads). Inputs it cannot find fail the build
with an error naming them. A record whose image is missing or does not decode is
skipped: logged with its file / record, counted per split, listed in the dataset's
`metadata.json` (`skipped`), and the build fails when a split skips more than
`max_bad_fraction` of its records.

  builder = SomeBuilder(config=SomeConfig(name="coco_karpathy", splits=...), data_dir=out)
  summary = build(builder)               # progress bars from TFDS, then the summary dict
  src = open_split(out, "some_builder/coco_karpathy", "train")   # len(src), src[i]
"""

import dataclasses
import io
import json
import logging
import os
import shutil
import sys
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

FILE_FORMAT = "array_record"
# Bumped when a builder's features or their meaning change; readers pick the newest.
VERSION = "1.0.0"


class BuildError(ValueError):
  """A build that cannot go on: missing inputs, malformed records, too many bad images."""


class BadImage(ValueError):
  """One image that is missing or does not decode; the message names it."""


def encoded_feature() -> tfds.features.Tensor:
  """Encoded bytes stored as they are (JPEG / PNG ...), no TensorFlow needed."""
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def read_file(path: str, where: str) -> bytes:
  """The bytes of an image file; `BadImage` names it and the record it comes from."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise BadImage(f"image file {path} does not exist ({where})") from None
  except OSError as e:
    raise BadImage(f"cannot read image file {path} ({where}): {e}") from None


def check_image(data: bytes, where: str) -> tuple[int, int]:
  """Fully decodes `data` with Pillow (a truncated JPEG passes `verify()`, not `load()`);
  returns (height, width). `BadImage` names `where`."""
  if not data:
    raise BadImage(f"{where}: no image bytes")
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      return img.height, img.width
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise BadImage(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def load_json(path: str, what: str) -> Any:
  """Parses a JSON file; errors name the file (and line / column of a syntax error)."""
  if not os.path.isfile(path):
    raise BuildError(f"{what}: input file {path} does not exist")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise BuildError(f"{what}: {path} is not valid JSON: {e.msg} at line {e.lineno} "
                     f"column {e.colno}") from None


def load_json_list(path: str, what: str) -> list[Any]:
  records = load_json(path, what)
  if not isinstance(records, list):
    raise BuildError(f"{what}: {path} must hold a JSON list of records, found "
                     f"{type(records).__name__}")
  return records


@dataclasses.dataclass
class LocalConfig(tfds.core.BuilderConfig):
  """A dataset built from local files.

  splits: ((split name, (input path, ...)), ...): what each split reads; the meaning
    of the paths is the builder's (JSON lists, a .rec prefix, a folder ...).
  image_root: joined before relative image paths (builders that have them).
  max_bad_fraction: a split fails when skipped records > this * its records.
  options: ((key, value), ...) builder-specific settings (JSON-able values).
  """
  splits: tuple = ()
  image_root: str = ""
  max_bad_fraction: float = 0.0
  options: tuple = ()

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders: subclasses give `_features()` and `_records(split, inputs)`,
  a generator of example dicts, or of a `BadImage` (yielded, not raised, so the
  generator goes on) for a record to skip.

  `_records` may put derived facts for the readers (class counts, identity ranges ...)
  into `self.derived[split]`; they are written to `metadata.json` with the skipped list.
  """

  VERSION = tfds.core.Version(VERSION)
  DESCRIPTION = ""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("file_format", FILE_FORMAT)
    super().__init__(*args, **kwargs)
    self.skipped: dict[str, list[str]] = {}
    self.derived: dict[str, dict[str, Any]] = {}

  # -- what subclasses give --------------------------------------------------------
  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _records(self, split: str, inputs: tuple) -> Iterator[Any]:
    raise NotImplementedError

  def _check_inputs(self, split: str, inputs: tuple) -> None:
    """Raises `BuildError` naming an input that is missing (default: every path)."""
    for path in inputs:
      if not os.path.exists(path):
        raise BuildError(f"{self.name}/{self.builder_config.name} split {split!r}: input "
                         f"{path} does not exist")

  # -- TFDS hooks ------------------------------------------------------------------
  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=self._features(),
        disable_shuffling=True,  # keep the inputs' order: index i is record i
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    cfg = self.builder_config
    if not cfg.splits:
      raise BuildError(f"{self.name}/{cfg.name}: the config names no splits")
    for split, inputs in cfg.splits:
      self._check_inputs(split, tuple(inputs))
    return {split: self._generate_examples(split, tuple(inputs)) for split, inputs in cfg.splits}

  def _generate_examples(self, split: str, inputs: tuple):
    cfg = self.builder_config
    skipped = self.skipped.setdefault(split, [])
    count = 0
    for example in self._records(split, inputs):
      if isinstance(example, BadImage):
        skipped.append(str(example))
        log.warning("%s: skipping a bad record (%d skipped so far): %s", split, len(skipped),
                    example)
        continue
      yield count, example
      count += 1
    total = count + len(skipped)
    if len(skipped) > cfg.max_bad_fraction * total:
      shown = "\n  ".join(skipped[:5])
      raise BuildError(
          f"{self.name}/{cfg.name} split {split!r}: {len(skipped)} of {total} records are bad, "
          f"more than max_bad_fraction={cfg.max_bad_fraction}; first ones:\n  {shown}")
    if not count:
      raise BuildError(f"{self.name}/{cfg.name} split {split!r}: no examples")
    # metadata.json is written after every split is generated.
    self.info.metadata["skipped"] = self.skipped
    self.info.metadata["derived"] = self.derived


def build(builder: LocalBuilder, overwrite: bool = False) -> dict[str, Any]:
  """Runs the build (TFDS shows per-split progress bars) and returns the summary:
  {"dir", "splits": {name: {"examples", "bytes", "skipped"}}, "skipped": [messages]}.

  An existing build of the same name and version is an error (TFDS would silently
  keep it, whatever the inputs now are) unless `overwrite`, which deletes it first.
  """
  if os.path.exists(builder.data_dir):
    if not overwrite:
      raise BuildError(f"{builder.data_dir} already holds a build; remove it, pick another "
                       "name, or overwrite it (--overwrite)")
    shutil.rmtree(builder.data_dir)
  builder.download_and_prepare(download_dir=os.path.join(builder.data_dir_root, "downloads"))
  return summary(builder.data_dir)


def summary(dataset_dir: str) -> dict[str, Any]:
  """Examples, bytes and skipped records per split of a built dataset directory."""
  builder = tfds.builder_from_directory(dataset_dir)
  skipped = dict(builder.info.metadata.get("skipped", {})) if builder.info.metadata else {}
  splits = {}
  for name, info in builder.info.splits.items():
    splits[name] = {"examples": int(info.num_examples), "bytes": int(info.num_bytes),
                    "skipped": len(skipped.get(name, []))}
  return {"dir": os.fspath(dataset_dir), "splits": splits,
          "skipped": [m for name in splits for m in skipped.get(name, [])]}


def format_summary(s: Mapping[str, Any]) -> str:
  lines = [f"built {s['dir']}", f"{'split':<12}{'examples':>12}{'MB':>12}{'skipped':>10}"]
  for name, row in s["splits"].items():
    lines.append(f"{name:<12}{row['examples']:>12}{row['bytes'] / 1e6:>12.2f}{row['skipped']:>10}")
  for message in s["skipped"][:20]:
    lines.append(f"skipped: {message}")
  if len(s["skipped"]) > 20:
    lines.append(f"... and {len(s['skipped']) - 20} more (metadata.json lists all)")
  return "\n".join(lines)


def dataset_dir(tfds_dir: str, tfds_name: str) -> str:
  """`<tfds_dir>/<builder>/<config>/<version>` of "builder/config[:version]"; without a
  version the newest complete one. Errors name what is missing."""
  if not tfds_dir or not tfds_name:
    raise ValueError("data.tfds_dir and data.tfds_name must both be set for data.source='tfds'")
  name, _, version = tfds_name.partition(":")
  base = os.path.join(tfds_dir, *name.split("/"))
  if not os.path.isdir(base):
    raise FileNotFoundError(
        f"TFDS dataset {tfds_name!r}: {base} does not exist; build it first "
        f"(python -m simla_jax.data.build / face_jax.data.build --out={tfds_dir})")
  if not version:
    done = [v for v in os.listdir(base)
            if os.path.isfile(os.path.join(base, v, "dataset_info.json"))]
    if not done:
      raise FileNotFoundError(f"TFDS dataset {tfds_name!r}: {base} holds no finished build")
    version = max(done, key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
  path = os.path.join(base, version)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise FileNotFoundError(f"TFDS dataset {tfds_name!r}: {path} holds no finished build")
  return path


@dataclasses.dataclass
class Split:
  """One split of a built dataset: the random-access source and the build's facts."""
  source: Any                       # tfds array_record data source: len(), [i] -> dict
  features: tfds.features.FeaturesDict
  metadata: dict[str, Any]          # this split's `derived` facts
  dir: str
  name: str


def open_split(tfds_dir: str, tfds_name: str, split: str) -> Split:
  """Opens one split for reading by index (no TensorFlow)."""
  path = dataset_dir(tfds_dir, tfds_name)
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f"TFDS dataset {path} has no split {split!r}; it has "
                     f"{sorted(builder.info.splits.keys())}")
  meta = dict(builder.info.metadata or {})
  derived = dict(meta.get("derived", {}).get(split, {}))
  return Split(builder.as_data_source(split), builder.info.features, derived, path, split)


def text(value: Any) -> str:
  """A Text feature as read back (bytes) -> str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def texts(values: Any) -> list[str]:
  return [text(v) for v in values]


def as_config(options: Optional[Mapping[str, Any]]) -> tuple:
  """A dict of options -> the sorted ((key, value), ...) a `LocalConfig` holds."""
  return tuple(sorted((options or {}).items()))


# --- command-line helpers (simla_jax.data.build, face_jax.data.build) -----------------

def parse_splits(items) -> dict[str, list[str]]:
  """["train=a.json,b.json", "test=c.json"] -> {"train": ["a.json", "b.json"], ...}."""
  out = {}
  for item in items or ():
    name, sep, paths = item.partition("=")
    if not sep or not name:
      raise ValueError(f"--split {item!r}: expected name=path[,path...]")
    out[name] = [p for p in paths.split(",") if p]
  return out


def parse_options(items) -> dict[str, Any]:
  """["answer_list=/x.json", "shapes.train_size=1000"] -> {...}; values are JSON when
  they parse as JSON (numbers, lists, true / false), else strings."""
  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--option {item!r}: expected key=value")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def cli_main(parser, resolve: Callable, build: Callable, read_hint: Callable[[str, Any, str], str],
             argv: Optional[Sequence[str]] = None) -> int:
  """The body of a family's build command: parse, resolve, build, print the summary.

  `resolve(args) -> (builder name, config)`, `build(builder, config, out, overwrite) -> summary`,
  `read_hint(builder, config, out)` -> how a run reads the result. Returns the exit status: 1 when
  the inputs are missing or bad (the message names them), 0 otherwise.
  """
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  args = parser.parse_args(argv)
  try:
    builder, config = resolve(args)
    built = build(builder, config, args.out, args.overwrite)
  except (ValueError, FileNotFoundError) as e:
    print(f"build failed: {e}", file=sys.stderr)
    return 1
  print(format_summary(built))
  print(f"read it with: {read_hint(builder, config, args.out)}")
  return 0
