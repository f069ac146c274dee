"""grain pipelines over face sources (`RecordIO`, `ImageFolder`) for training.

    index -> shard (this process) -> shuffle (per epoch) -> repeat -> read + decode
          -> random horizontal flip -> chunks of batch_size: (x/255 - 0.5)/0.5 into
             one float32 array, bad records set aside    [read threads / processes]
          -> skip and count bad records, re-cut exact batches   [main process]

Everything per record runs in grain's read threads (or worker processes) on whole
chunks, so the per-element cost of grain's prefetching is paid once per batch.

Sources raise `BadRecordError` for a record they cannot read or decode; the pipeline
turns it into a `BadRecord` marker, and `FaceBatchIterator` (in the main process, so
its counts cover the whole pipeline) logs and counts it, filling the batch from the
next chunk. When the bad records exceed `max_bad_fraction` of max(records read,
records per epoch), the run stops with `TooManyBadRecordsError` naming the last bad
record. The counts are part of the iterator state, so a resumed run continues them.

Config keys (`config.data`, see `data_config()`): rec_prefix or image_root, val_bins,
image_size, flip, max_bad_fraction, read_threads, prefetch_batches, worker_count.
From a family's `make_task`:

    it = pipeline.train_iterator(config)          # this process's shard of the batches
    Task(..., train_data=it, host_metrics=it.host_metrics)
    packs = pipeline.load_val_bins(config.data)   # {"lfw": (images, issame), ...}
"""

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional, Protocol, Sequence, Union

from absl import flags as absl_flags
import grain
import ml_collections
import numpy as np

from face_jax.data.folders import ImageFolder
from face_jax.data.recordio import BadRecordError, RecordIO
from face_jax.data.verification import load_bin

log = logging.getLogger(__name__)


class FaceSource(Protocol):
  """What the pipeline reads: `RecordIO`, `ImageFolder` or anything alike. `[i]` raises
  `BadRecordError` for a bad record; an optional `where(i)` names record i in messages."""

  def __len__(self) -> int: ...
  def __getitem__(self, i: int) -> Mapping[str, Any]: ...   # {"image", "label"}


class TooManyBadRecordsError(RuntimeError):
  """More bad records than `max_bad_fraction` allows."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """Stands in for a record that could not be read: which one, and why."""
  index: int
  message: str


def data_config() -> ml_collections.ConfigDict:
  """Defaults of `config.data` for real face data (a family config updates it)."""
  return ml_collections.ConfigDict(dict(
      rec_prefix="",            # ".../faces_emore/train" -> train.rec, train.idx, property
      image_root="",            # or a root/<identity>/<image> folder (when rec_prefix is "")
      val_bins=(),              # verification packs, e.g. (".../lfw.bin", ".../cfp_fp.bin")
      image_size=(112, 112),    # (H, W) every training image must have; others are bad
      flip=True,                # random horizontal flip, p = 1/2
      max_bad_fraction=1e-4,    # stop when bad > this * max(read, records per epoch)
      read_threads=8,           # grain read threads, each decodes whole batches
      prefetch_batches=16,      # batches decoded ahead (memory: this * batch * H*W*3*4 B)
      worker_count=0,           # >0: decode in that many processes (grain mp_prefetch)
      # "tfds": read a build (python -m face_jax.data.build) instead of the files above.
      source="direct",          # direct | tfds
      tfds_dir="",              # the build's --out
      tfds_name="",             # e.g. "face_recordio/ms1mv2" (a face_recordio / face_folder build)
      tfds_split="train",       # the training split of that build
      tfds_meta_split="",       # its split of held-out meta images (mvcom, l2rw), if any
      tfds_val_name="",         # a face_verification build: every split is a val pack
  ))


def hflip(image: np.ndarray) -> np.ndarray:
  """(H, W, C) mirrored left-right, as a contiguous copy.

  Each pixel is viewed as one C-byte item, so the reversed copy is one tight loop;
  `image[:, ::-1].copy()` copies C-element runs and is 2-3x slower.
  """
  h, w, c = image.shape
  image = np.ascontiguousarray(image)
  pixels = image.view(np.dtype((np.void, c * image.itemsize))).reshape(h, w)
  return np.ascontiguousarray(pixels[:, ::-1]).view(image.dtype).reshape(h, w, c)


def normalize(image: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
  """uint8 -> float32 (x/255 - 0.5)/0.5 in [-1, 1] (arcface_torch), into `out` if given."""
  out = np.multiply(image, np.float32(2 / 255), out=out, dtype=np.float32)
  out -= np.float32(1)
  return out


class _ReadOrMark(grain.transforms.Map):
  """index -> source[index], or a `BadRecord` when that record is bad."""

  def __init__(self, source: FaceSource, image_size: Sequence[int]):
    self._source = source
    self._shape = (*image_size, 3)

  def map(self, index: int) -> Union[dict[str, Any], BadRecord]:
    try:
      example = self._source[int(index)]
    except BadRecordError as e:
      return BadRecord(int(index), str(e))
    if example["image"].shape != self._shape:
      where = self._source.where(int(index)) if hasattr(self._source, "where") else \
          f"image {index}"
      return BadRecord(int(index), f"{where}: image has shape {example['image'].shape}, "
                       f"expected {self._shape} (aligned crops)")
    return example


class _Flip(grain.transforms.RandomMap):
  """Mirrors an example's image with probability 1/2 (grain seeds it per element)."""

  def random_map(self, example, rng: np.random.Generator):
    if isinstance(example, BadRecord) or rng.random() >= 0.5:
      return example
    return {**example, "image": hflip(example["image"])}


class _Collate:
  """A chunk of examples -> {"image": float32 (n, H, W, 3) normalised, "label": int32
  (n,), "bad": [(position in chunk, BadRecord)], "size": chunk length}."""

  def __init__(self, image_size: Sequence[int]):
    self._shape = (*image_size, 3)

  def __call__(self, chunk: Sequence[Any]) -> dict[str, Any]:
    good = [e for e in chunk if not isinstance(e, BadRecord)]
    images = np.empty((len(good), *self._shape), np.float32)
    for i, example in enumerate(good):
      normalize(example["image"], out=images[i])
    return {"image": images, "label": np.array([e["label"] for e in good], np.int32),
            "bad": [(k, e) for k, e in enumerate(chunk) if isinstance(e, BadRecord)],
            "size": len(chunk)}


class FaceBatchIterator(grain.DatasetIterator):
  """Batches of {"image": float32 (B, H, W, 3), "label": int32 (B,)}; skips bad records.

  Attributes:
    bad_records, seen_records: counts since the start of training (checkpointed).
    last_bad: message of the last bad record ("" if none).
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, drop_remainder: bool,
               max_bad_fraction: float, epoch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._max_bad_fraction = max_bad_fraction
    self._epoch_size = epoch_size
    self.bad_records = 0
    self.seen_records = 0
    self.last_bad = ""
    self._chunk = None          # the chunk being cut into batches
    self._chunk_state = None    # parent state just before that chunk
    self._pos = 0               # examples of it already handed out

  def _note_bad(self, seen_before: int, position: int, bad: BadRecord) -> None:
    self.bad_records += 1
    self.last_bad = bad.message
    seen = seen_before + position + 1
    log.warning("skipped bad record %d (%d bad of %d read): %s", bad.index, self.bad_records,
                seen, bad.message)
    if self.bad_records > self._max_bad_fraction * max(seen, self._epoch_size):
      raise TooManyBadRecordsError(
          f"{self.bad_records} bad records out of {seen} read exceed "
          f"max_bad_fraction={self._max_bad_fraction} of max(read, {self._epoch_size} "
          f"records per epoch); last bad record: {bad.message}")

  def _next_chunk(self, count: bool = True) -> None:
    self._chunk_state = self._parent.get_state()
    self._chunk, self._pos = next(self._parent), 0
    if count:
      seen_before = self.seen_records
      self.seen_records += self._chunk["size"]
      for position, bad in self._chunk["bad"]:
        self._note_bad(seen_before, position, bad)

  def __next__(self) -> dict[str, np.ndarray]:
    parts, n = [], 0
    while n < self._batch_size:
      if self._chunk is None or self._pos == len(self._chunk["label"]):
        try:
          self._next_chunk()
        except StopIteration:
          self._chunk = None
          if parts and not self._drop_remainder:
            break
          raise
        continue
      take = min(self._batch_size - n, len(self._chunk["label"]) - self._pos)
      parts.append({k: self._chunk[k][self._pos:self._pos + take] for k in ("image", "label")})
      self._pos += take
      n += take
    if len(parts) == 1:  # the usual case: one whole chunk, no copy
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("image", "label")}

  def host_metrics(self) -> dict[str, float]:
    """For `Task.host_metrics`: written as train/data_bad_records etc."""
    return {"data_bad_records": float(self.bad_records),
            "data_seen_records": float(self.seen_records)}

  def get_state(self) -> dict[str, Any]:
    holding = self._chunk is not None and self._pos < len(self._chunk["label"])
    return {"parent": self._chunk_state if holding else self._parent.get_state(),
            "chunk_pos": self._pos if holding else -1, "bad_records": self.bad_records,
            "seen_records": self.seen_records, "last_bad": self.last_bad}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._chunk = None
    if state["chunk_pos"] >= 0:  # re-read the chunk in progress (already counted)
      self._next_chunk(count=False)
      self._pos = int(state["chunk_pos"])
    self.bad_records = int(state["bad_records"])
    self.seen_records = int(state["seen_records"])
    self.last_bad = str(state["last_bad"])

  def close(self) -> None:
    self._parent.close()


class _SkipBadAndBatch(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, **kwargs):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self) -> FaceBatchIterator:
    return FaceBatchIterator(self._parent.__iter__(), **self._kwargs)


def train_dataset(source: FaceSource, *, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1, shuffle: bool = True, flip: bool = True,
                  num_epochs: Optional[int] = None, drop_remainder: bool = True,
                  image_size: Sequence[int] = (112, 112), max_bad_fraction: float = 1e-4,
                  read_threads: int = 8, prefetch_batches: int = 16,
                  worker_count: int = 0) -> grain.IterDataset:
  """The training pipeline; `iter()` of it is a `FaceBatchIterator`.

  Args:
    source: random-access face source.
    batch_size: per-process batch.
    seed: shuffle and flip seed (same on every process; the shards differ).
    shard_index, shard_count: this process's share, records shard_index::shard_count.
    shuffle: reshuffle every epoch.
    flip: random horizontal flip.
    num_epochs: None repeats forever.
    drop_remainder: drop a last partial batch (finite epochs only).
    image_size: (H, W) records must have; others count as bad.
    max_bad_fraction: see the module docstring.
    read_threads: grain read threads, each preparing whole chunks of batch_size.
    prefetch_batches: chunks prepared ahead.
    worker_count: >0 prepares chunks in that many processes.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  ds = grain.MapDataset.range(len(source))[shard_index::shard_count]
  epoch_size = len(ds)
  if not epoch_size:
    raise ValueError(f"shard {shard_index}/{shard_count} of a {len(source)}-record source "
                     "is empty")
  ds = ds.seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  ds = ds.map(_ReadOrMark(source, image_size))
  if flip:
    ds = ds.random_map(_Flip())
  ds = ds.batch(batch_size, batch_fn=_Collate(image_size))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=prefetch_batches))
  if worker_count > 0:
    if not absl_flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside absl.app (notebooks, tests) use defaults.
      absl_flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return _SkipBadAndBatch(it, batch_size=batch_size, drop_remainder=drop_remainder,
                          max_bad_fraction=max_bad_fraction, epoch_size=epoch_size)


def _data_key(data: ml_collections.ConfigDict, key: str) -> Any:
  """config.data[key], or its `data_config()` default when a family config omits it."""
  return data.get(key, data_config()[key])


def _size(image_size: Union[int, Sequence[int]]) -> tuple[int, int]:
  """112 or (112, 112) -> (112, 112)."""
  if isinstance(image_size, int):
    return image_size, image_size
  height, width = image_size
  return int(height), int(width)


def make_source(data: ml_collections.ConfigDict) -> FaceSource:
  """`config.data` -> RecordIO(rec_prefix) or ImageFolder(image_root), or with
  `source="tfds"` the `tfds_split` of the build `tfds_name` under `tfds_dir`."""
  if _data_key(data, "source") == "tfds":
    from face_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
    return tfds_builders.TfdsFaceSource(data.tfds_dir, data.tfds_name,
                                        _data_key(data, "tfds_split"))
  if _data_key(data, "source") != "direct":
    raise ValueError(f"config.data.source: unknown source {data.source!r} (direct | tfds)")
  if data.get("rec_prefix"):
    return RecordIO(data.rec_prefix)
  if data.get("image_root"):
    return ImageFolder(data.image_root)
  raise ValueError("config.data needs rec_prefix (insightface .rec/.idx) or image_root "
                   "(root/<identity>/<image>)")


def train_iterator(config: ml_collections.ConfigDict,
                   source: Optional[FaceSource] = None) -> FaceBatchIterator:
  """This process's batches for `config` (global `config.batch_size`, `config.seed`,
  `config.data.*`; keys missing from config.data take `data_config()` defaults),
  sharded over JAX processes. Use it as `Task.train_data` and its `host_metrics` as
  `Task.host_metrics`."""
  import jax  # only here: the readers and the benchmark do not need JAX
  count, index = jax.process_count(), jax.process_index()
  if config.batch_size % count:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {count} processes")
  data = config.data
  get = lambda key: _data_key(data, key)  # pylint: disable=unnecessary-lambda-assignment
  ds = train_dataset(
      source if source is not None else make_source(data),
      batch_size=config.batch_size // count, seed=config.seed, shard_index=index,
      shard_count=count, flip=get("flip"), image_size=_size(get("image_size")),
      max_bad_fraction=get("max_bad_fraction"), read_threads=get("read_threads"),
      prefetch_batches=get("prefetch_batches"), worker_count=get("worker_count"))
  return iter(ds)


def load_val_bins(data: ml_collections.ConfigDict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`config.data.val_bins` -> {name: (uint8 (2N, H, W, 3), bool (N,))}, name = file stem
  ("lfw", "cfp_fp", ...); with `source="tfds"` and `tfds_val_name`, every split of
  that face_verification build instead."""
  if _data_key(data, "source") == "tfds" and _data_key(data, "tfds_val_name"):
    from face_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
    return tfds_builders.load_val_packs(data.tfds_dir, data.tfds_val_name,
                                        _size(_data_key(data, "image_size")))
  out = {}
  for path in data.get("val_bins", ()):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in out:
      raise ValueError(f"config.data.val_bins: two packs named {name!r}")
    out[name] = load_bin(path, image_size=_size(_data_key(data, "image_size")))
  return out
