"""grain pipelines over face sources (`RecordIO`, `ImageFolder`) for training.

    index -> shard (this process) -> shuffle (per epoch) -> repeat -> read + decode
          -> random horizontal flip -> (x/255 - 0.5)/0.5 -> [worker processes]
          -> skip and count bad records -> batch

Sources raise `BadRecordError` for a record they cannot read or decode; the pipeline
turns it into a `BadRecord` marker and the batching stage (in the main process, so
the counts are the whole pipeline's) drops it, logs it and counts it. When the bad
records exceed `max_bad_fraction` of max(records seen, records per epoch), the run
stops with `TooManyBadRecordsError` naming the last bad record. The counts are part
of the iterator state, so a resumed run continues them.

Config keys (`config.data`, see `data_config()`): rec_prefix or image_root, val_bins,
image_size, flip, max_bad_fraction, read_threads, prefetch_buffer_size, worker_count.
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
      image_size=(112, 112),    # (H, W) every training image must have
      flip=True,                # random horizontal flip, p = 1/2
      max_bad_fraction=1e-4,    # stop when bad > this * max(seen, records per epoch)
      read_threads=8,           # grain read threads (decoding releases the GIL)
      prefetch_buffer_size=256, # elements decoded ahead
      worker_count=0,           # >0: decode in that many processes (grain mp_prefetch)
  ))


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (x/255 - 0.5)/0.5 in [-1, 1] (arcface_torch)."""
  return image.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


class _ReadOrMark(grain.transforms.Map):
  """index -> source[index], or a `BadRecord` when that record is bad."""

  def __init__(self, source: FaceSource, image_size: Optional[Sequence[int]]):
    self._source = source
    self._shape = None if image_size is None else (*image_size, 3)

  def map(self, index: int) -> Union[dict[str, Any], BadRecord]:
    try:
      example = self._source[int(index)]
    except BadRecordError as e:
      return BadRecord(int(index), str(e))
    if self._shape is not None and example["image"].shape != self._shape:
      where = self._source.where(int(index)) if hasattr(self._source, "where") else \
          f"image {index}"
      return BadRecord(int(index), f"{where}: image has shape {example['image'].shape}, "
                       f"expected {self._shape} (aligned crops)")
    return example


class _FlipAndNormalize(grain.transforms.RandomMap):
  def __init__(self, flip: bool):
    self._flip = flip

  def random_map(self, example, rng: np.random.Generator):
    if isinstance(example, BadRecord):
      return example
    image = example["image"]
    if self._flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {**example, "image": normalize(image), "label": np.int32(example["label"])}


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

  def _note_bad(self, bad: BadRecord) -> None:
    self.bad_records += 1
    self.last_bad = bad.message
    log.warning("skipped bad record %d (%d bad of %d read): %s", bad.index, self.bad_records,
                self.seen_records, bad.message)
    allowed = self._max_bad_fraction * max(self.seen_records, self._epoch_size)
    if self.bad_records > allowed:
      raise TooManyBadRecordsError(
          f"{self.bad_records} bad records out of {self.seen_records} read exceed "
          f"max_bad_fraction={self._max_bad_fraction} of max(read, {self._epoch_size} "
          f"records per epoch); last bad record: {bad.message}")

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self._batch_size:
      try:
        example = next(self._parent)
      except StopIteration:
        if examples and not self._drop_remainder:
          break
        raise
      self.seen_records += 1
      if isinstance(example, BadRecord):
        self._note_bad(example)
      else:
        examples.append(example)
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}

  def host_metrics(self) -> dict[str, float]:
    """For `Task.host_metrics`: written as train/data_bad_records etc."""
    return {"data_bad_records": float(self.bad_records),
            "data_seen_records": float(self.seen_records)}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "bad_records": self.bad_records,
            "seen_records": self.seen_records, "last_bad": self.last_bad}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
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
                  image_size: Optional[Sequence[int]] = (112, 112),
                  max_bad_fraction: float = 1e-4, read_threads: int = 8,
                  prefetch_buffer_size: int = 256, worker_count: int = 0) -> grain.IterDataset:
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
    image_size: (H, W) records must have; others count as bad. None: no check.
    max_bad_fraction: see the module docstring.
    read_threads, prefetch_buffer_size: grain `ReadOptions`.
    worker_count: >0 decodes in that many processes.
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
  ds = ds.random_map(_FlipAndNormalize(flip))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    if not absl_flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside absl.app (notebooks, tests) use defaults.
      absl_flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return _SkipBadAndBatch(it, batch_size=batch_size, drop_remainder=drop_remainder,
                          max_bad_fraction=max_bad_fraction, epoch_size=epoch_size)


def make_source(data: ml_collections.ConfigDict) -> Union[RecordIO, ImageFolder]:
  """`config.data` -> RecordIO(rec_prefix) or ImageFolder(image_root)."""
  if data.get("rec_prefix"):
    return RecordIO(data.rec_prefix)
  if data.get("image_root"):
    return ImageFolder(data.image_root)
  raise ValueError("config.data needs rec_prefix (insightface .rec/.idx) or image_root "
                   "(root/<identity>/<image>)")


def train_iterator(config: ml_collections.ConfigDict,
                   source: Optional[FaceSource] = None) -> FaceBatchIterator:
  """This process's batches for `config` (global `config.batch_size`, `config.seed`,
  `config.data.*`), sharded over JAX processes. Use it as `Task.train_data` and its
  `host_metrics` as `Task.host_metrics`."""
  import jax  # only here: the readers and the benchmark do not need JAX
  count, index = jax.process_count(), jax.process_index()
  if config.batch_size % count:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by {count} processes")
  data = config.data
  ds = train_dataset(
      source if source is not None else make_source(data),
      batch_size=config.batch_size // count, seed=config.seed, shard_index=index,
      shard_count=count, flip=data.flip, image_size=tuple(data.image_size),
      max_bad_fraction=data.max_bad_fraction, read_threads=data.read_threads,
      prefetch_buffer_size=data.prefetch_buffer_size, worker_count=data.worker_count)
  return iter(ds)


def load_val_bins(data: ml_collections.ConfigDict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """`config.data.val_bins` -> {name: (uint8 (2N, H, W, 3), bool (N,))}, name = file stem
  ("lfw", "cfp_fp", ...)."""
  out = {}
  for path in data.get("val_bins", ()):
    name = os.path.splitext(os.path.basename(path))[0]
    if name in out:
      raise ValueError(f"config.data.val_bins: two packs named {name!r}")
    out[name] = load_bin(path, image_size=tuple(data.image_size))
  return out
