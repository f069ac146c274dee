"""grain input pipelines for SIMLA pretraining and retrieval evaluation.

Train: random-access source (shapes world or caption JSON) -> this process's shard
(`ds[process_index::process_count]`) -> `shuffle(seed)` (reshuffled every epoch) ->
`repeat` -> per-example `ExampleTransform` -> `to_iter_dataset` -> `batch` (->
`mp_prefetch` when `loader.worker_count > 0`). The transform draws everything (caption
choice, ViT-view augmentation, BEiT mask, dVAE view) from
`np.random.default_rng([seed, epoch, index])`, so a batch depends only on (config,
step) and the iterator's `get_state()` / `set_state()` resumes exactly.

  it = make_train_iterator(config.data, batch_size=per_process_batch)
  batch = next(it)   # dict of numpy arrays, see simla_jax.data.__init__
  state = it.get_state(); ...; it.set_state(state)

`per_process_batch` = global batch / jax.process_count(). With `loader.worker_count > 0`
grain starts worker processes (spawn): the entry point needs the
`if __name__ == "__main__"` guard and parsed absl flags (absl.app.run does both), and
the batch order differs from worker_count = 0 (each worker batches its own slice) while
staying deterministic and resumable. Bad caption-JSON images with
`captions.skip_bad=True` are skipped with a logged warning carrying the running count,
up to `captions.max_bad_fraction` of the examples read (`TooManyBadExamplesError`).

Eval (retrieval on a held-out split): every image once (eval transform) and every
caption, with index maps.

  ev = make_eval_data(config.data, "test")
  ev.text_ids (M, L) int32, ev.text_mask (M, L), ev.txt2img (M,), ev.img2txt [N arrays]
  for b in ev.image_batches(64): b["image"], b["index"], b["valid"]   # padded last batch
  for b in ev.text_batches(64): b["text_ids"], b["text_mask"], b["index"], b["valid"]
"""

import logging
import threading
from typing import Any, Iterator, Optional

import grain
import jax
import numpy as np

from simla_jax.data import augment, captions, masks, shapes
from simla_jax.data.tokenizer import Tokenizer, pre_caption


def patch_grid(data_cfg: Any) -> tuple[int, int]:
  """(h, w) of the ViT patch grid for `image_size` / `mim.patch_size`."""
  size, p = int(data_cfg.image_size), int(data_cfg.mim.patch_size)
  if size % p:
    raise ValueError(f"data.image_size {size} is not a multiple of mim.patch_size {p}")
  return size // p, size // p


def check_config(data_cfg: Any) -> None:
  """Raises a ValueError naming the key when `config.data` is inconsistent."""
  if data_cfg.name not in ("shapes", "captions"):
    raise ValueError(f"data.name: unknown dataset {data_cfg.name!r} (shapes | captions)")
  if data_cfg.get("source", "direct") not in ("direct", "tfds"):
    raise ValueError(f"data.source: unknown source {data_cfg.source!r} (direct | tfds)")
  grid = patch_grid(data_cfg)
  if data_cfg.mim.target == "dvae":
    d = int(data_cfg.mim.dvae_image_size)
    if d % 8 or (d // 8, d // 8) != grid:
      raise ValueError(f"data.mim.dvae_image_size {d} gives a {d // 8}x{d // 8} token grid; "
                       f"the ViT patch grid is {grid[0]}x{grid[1]}")
  if data_cfg.name == "captions" and not data_cfg.tokenizer.vocab_file:
    raise ValueError("data.tokenizer.vocab_file is required for caption JSON data")


def make_source(data_cfg: Any, split: str):
  """Random-access source of a split: shapes (train/val/test/comp) or caption JSON, or
  with `data.source = "tfds"` that split of a TFDS build of either (same examples)."""
  if data_cfg.get("source", "direct") == "tfds":
    from simla_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
    return tfds_builders.TfdsCaptionSource(data_cfg.tfds_dir, data_cfg.tfds_name, split,
                                           data_cfg)
  if data_cfg.name == "shapes":
    return shapes.ShapesSource(data_cfg, split)
  if data_cfg.name == "captions":
    files = data_cfg.captions.train_files if split == "train" else data_cfg.captions.eval_files
    if not files:
      raise ValueError(f"data.captions: no files for split {split!r}")
    return captions.CaptionJsonSource(list(files), data_cfg.captions.image_root)
  raise ValueError(f"data.name: unknown dataset {data_cfg.name!r} (shapes | captions)")


def make_tokenizer(data_cfg: Any) -> Tokenizer:
  """WordPiece from `tokenizer.vocab_file`, else the shapes world's vocabulary."""
  t = data_cfg.tokenizer
  kwargs = dict(max_len=int(data_cfg.max_len), add_sep=bool(t.add_sep),
                lowercase=bool(t.lowercase))
  if t.vocab_file:
    return Tokenizer.from_vocab_file(t.vocab_file, **kwargs)
  return Tokenizer.from_words(shapes.vocabulary(data_cfg), **kwargs)


def extended_tokenizer(data_cfg: Any, words) -> tuple[Tokenizer, int]:
  """(tokenizer, size of the pretraining vocabulary) for a downstream task.

  The shapes world's vocabulary gets the task's `words` that it lacks appended, so the
  pretraining ids are unchanged; a vocab_file is used as it is.
  """
  base = make_tokenizer(data_cfg)
  if data_cfg.tokenizer.vocab_file:
    return base, base.vocab_size
  known = set(base.vocab)
  t = data_cfg.tokenizer
  extra = [w for w in words if w not in known]
  return Tokenizer(base.vocab + extra, max_len=int(data_cfg.max_len), add_sep=bool(t.add_sep),
                   lowercase=bool(t.lowercase)), base.vocab_size


class TooManyBadExamplesError(RuntimeError):
  """More bad examples than `captions.max_bad_fraction` allows, or an epoch with none good."""


class _SkipBadSource:
  """Wraps a source: missing / undecodable images become None and are counted.

  Stops with `TooManyBadExamplesError` when the bad examples exceed `max_bad_fraction`
  of max(examples read, examples per epoch), or when `examples_per_epoch` reads in a
  row were all bad (a whole epoch yields nothing: a wrong image root, say), so a bad
  dataset fails instead of skipping forever. Counts are per process (per worker with
  `loader.worker_count > 0`).
  """

  def __init__(self, source, max_bad_fraction: float):
    self.source = source
    self.max_bad_fraction = float(max_bad_fraction)
    self.examples_per_epoch = len(source)  # this process's shard: set after sharding
    self.num_bad = 0
    self.num_read = 0
    self._bad_in_a_row = 0
    self._lock = threading.Lock()  # grain reads from several threads

  def __getstate__(self):  # pickled into grain worker processes: a lock does not travel
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    try:
      example = self.source[index]
    except captions.BadImageError as e:
      with self._lock:
        self.num_bad += 1
        self.num_read += 1
        self._bad_in_a_row += 1
        bad, read, in_a_row = self.num_bad, self.num_read, self._bad_in_a_row
      logging.warning("skipping bad example %d (%d so far): %s", index, bad, e)
      self._check(bad, read, in_a_row, e)
      return None
    with self._lock:
      self.num_read += 1
      self._bad_in_a_row = 0
    return example

  def _check(self, bad: int, read: int, in_a_row: int, last: Exception) -> None:
    if in_a_row >= self.examples_per_epoch:
      raise TooManyBadExamplesError(
          f"data.captions: a whole epoch ({self.examples_per_epoch} examples in this "
          f"process's shard) yielded no usable example ({bad} bad of {read} read); "
          f"check data.captions.image_root. Last: {last}")
    if bad > self.max_bad_fraction * max(read, self.examples_per_epoch):
      raise TooManyBadExamplesError(
          f"data.captions: {bad} bad examples of {read} read exceed "
          f"max_bad_fraction={self.max_bad_fraction:g} of max(read, "
          f"{self.examples_per_epoch} per epoch); raise data.captions.max_bad_fraction "
          f"to accept more. Last: {last}")


class ExampleTransform(grain.transforms.MapWithIndex):
  """(position k in the repeated stream, source example) -> model-ready example.

  epoch = k // epoch_length; all randomness from default_rng([seed, epoch, index]).
  Output: image (H, W, 3) float32, text_ids (L,) int32, text_mask (L,) int32,
  patch_mask (N,) bool, index () int32, and dvae_image when mim.target == "dvae".
  None in, None out (skipped bad example).
  """

  def __init__(self, data_cfg: Any, tokenizer: Tokenizer, *, seed: int, epoch_length: int,
               train: bool = True):
    self.seed = int(seed)
    self.epoch_length = int(epoch_length)
    self.tokenizer = tokenizer
    self.max_words = int(data_cfg.tokenizer.max_words)
    aug = data_cfg.aug
    train_aug = train and bool(aug.train)
    self.flip_swap = tuple(tuple(p) for p in aug.flip_swap)
    self.image_tf = augment.ImageTransform(aug, image_size=int(data_cfg.image_size),
                                                 train=train_aug)
    m = data_cfg.mim
    self.mask_gen = masks.BlockMaskGenerator(
        patch_grid(data_cfg), int(m.num_masking_patches), int(m.min_num_patches),
        int(m.max_num_patches), float(m.min_aspect), float(m.max_aspect))
    self.dvae_tf = None
    if m.target == "dvae":
      self.dvae_tf = augment.DvaeTransform(aug, image_size=int(m.dvae_image_size),
                                                 eps=float(m.map_pixels_eps), train=train_aug)

  def map_with_index(self, k: int, example: Optional[dict]) -> Optional[dict]:
    if example is None:
      return None
    index = int(example["index"])
    rng = np.random.default_rng([self.seed, k // self.epoch_length, index])
    caps = example["captions"]
    caption = pre_caption(caps[int(rng.integers(len(caps)))], self.max_words)
    image, flipped = self.image_tf(example["image"], rng)
    if flipped and self.flip_swap:
      caption = augment.swap_words(caption, self.flip_swap)
    ids, mask = self.tokenizer(caption)
    out = {
        "image": image,
        "text_ids": ids,
        "text_mask": mask,
        "patch_mask": self.mask_gen(rng).reshape(-1),
        "index": np.int32(index),
    }
    if "image_id" in example:   # retrieval pairs (simla_jax.data.retrieval_pairs)
      out["image_id"] = np.int32(example["image_id"])
    if self.dvae_tf is not None:
      out["dvae_image"] = self.dvae_tf(example["image"], rng)
    return out


def make_train_dataset(data_cfg: Any, *, batch_size: int, split: str = "train",
                       seed: Optional[int] = None, process_index: Optional[int] = None,
                       process_count: Optional[int] = None,
                       tokenizer: Optional[Tokenizer] = None,
                       source: Any = None) -> grain.IterDataset:
  """The training `IterDataset` of process-local batches of `batch_size` examples.

  `source`: a random-access source replacing `make_source(data_cfg, split)` (e.g. the
  retrieval pairs with image ids).
  """
  check_config(data_cfg)
  loader = data_cfg.loader
  seed = int(data_cfg.seed if seed is None else seed)
  source = make_source(data_cfg, split) if source is None else source
  skipping = None
  if data_cfg.name == "captions" and data_cfg.captions.skip_bad:
    source = skipping = _SkipBadSource(source, data_cfg.captions.max_bad_fraction)
  ds = grain.MapDataset.source(source)
  if loader.shard_by_process:
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    ds = ds[pi::pc]
  epoch_length = len(ds)
  if skipping is not None:
    skipping.examples_per_epoch = epoch_length
  if epoch_length < batch_size and loader.drop_remainder:
    raise ValueError(f"data: split {split!r} has {epoch_length} examples in this shard, "
                     f"fewer than one batch of {batch_size}")
  ds = ds.shuffle(seed=seed % 2 ** 32)
  ds = ds.repeat(None if loader.num_epochs < 0 else int(loader.num_epochs))
  ds = ds.map_with_index(ExampleTransform(data_cfg, tokenizer or make_tokenizer(data_cfg),
                                          seed=seed, epoch_length=epoch_length))
  return batched(ds, loader, batch_size, drop_remainder=bool(loader.drop_remainder))


def batched(ds: grain.MapDataset, loader: Any, batch_size: int,
            drop_remainder: bool = True) -> grain.IterDataset:
  """Read with `loader`'s threads and prefetch, batch, and (worker_count > 0) prefetch
  the batches in worker processes."""
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(loader.num_threads),
                                            prefetch_buffer_size=int(loader.prefetch_buffer_size)))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  if loader.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(loader.worker_count),
        per_worker_buffer_size=int(loader.worker_buffer_size)))
  return ds


def make_train_iterator(data_cfg: Any, **kwargs) -> grain.DatasetIterator:
  """`iter(make_train_dataset(...))`: has get_state() / set_state() for checkpoints."""
  return iter(make_train_dataset(data_cfg, **kwargs))


class TaskTransform(grain.transforms.MapWithIndex):
  """Base of the fine-tuning tasks' example transforms (`map_with_index` is theirs): the
  image augmentation, drawn in training from default_rng([seed, epoch, index, *more])
  with epoch = k // epoch_length, and the text with `aug.flip_swap` words swapped when
  its image was flipped, for `tokenizer`. Evaluation (`train=False`) does not augment."""

  def __init__(self, data_cfg: Any, tokenizer: Tokenizer, *, seed: int, epoch_length: int,
               train: bool):
    self.seed, self.epoch_length, self.train = int(seed), max(int(epoch_length), 1), train
    self.tokenizer = tokenizer
    self.max_words = int(data_cfg.tokenizer.max_words)
    self.flip_swap = tuple(tuple(p) for p in data_cfg.aug.flip_swap)
    self.image_tf = augment.ImageTransform(data_cfg.aug, image_size=int(data_cfg.image_size),
                                           train=train and bool(data_cfg.aug.train))

  def image(self, k: int, index: int, image: np.ndarray, *more: int):
    """(image, flipped) of example `index` at stream position `k`."""
    rng = (np.random.default_rng([self.seed, k // self.epoch_length, index, *more])
           if self.train else None)
    return self.image_tf(image, rng)

  def image_and_text(self, k: int, index: int, image: np.ndarray, text: str):
    """(image, text), the text's left / right words swapped if the image was flipped."""
    image, flipped = self.image(k, index, image)
    if flipped and self.flip_swap:
      text = augment.swap_words(text, self.flip_swap)
    return image, text


def task_train_iterator(data_cfg: Any, source, batch_size: int, make_transform,
                        what: str) -> grain.DatasetIterator:
  """A fine-tuning task's training batches: this process's shard of `source`, reshuffled
  every epoch (seed `data.seed`), repeated, `make_transform(epoch_length)` applied with the
  example index, batched by `batched`."""
  ds = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  if len(ds) < batch_size:
    raise ValueError(f"{what}: {len(ds)} training examples in this shard, fewer than one "
                     f"batch of {batch_size}")
  epoch_length = len(ds)
  ds = ds.shuffle(seed=int(data_cfg.seed)).repeat(None)
  ds = ds.map_with_index(make_transform(epoch_length))
  return iter(batched(ds, data_cfg.loader, batch_size))


def _captions_of(source, index: int) -> list[str]:
  if isinstance(source, captions.CaptionJsonSource):  # no image decode needed
    return list(source.records[index]["captions"])
  if hasattr(source, "captions_of"):  # a TFDS build: no image decode needed either
    return source.captions_of(index)
  return list(source[index]["captions"])


class EvalData:
  """A held-out split for retrieval: all images and all captions, with index maps.

  images: `image_batches` (eval transform, CLIP-normalised float32, padded to full
  batches with `valid` False). texts: every caption of every image, pre_caption'd
  and tokenised: text_ids / text_mask (M, L) int32; txt2img (M,) int32 image of each
  caption; img2txt list of N int32 arrays of caption indices; captions list[str].
  """

  def __init__(self, data_cfg: Any, split: str, tokenizer: Optional[Tokenizer] = None):
    self.source = make_source(data_cfg, split)
    self.image_size = int(data_cfg.image_size)
    self.image_tf = augment.ImageTransform(data_cfg.aug, image_size=self.image_size,
                                                 train=False)
    max_words = int(data_cfg.tokenizer.max_words)
    texts, txt2img, img2txt = [], [], []
    for i in range(len(self.source)):
      caps = [pre_caption(c, max_words) for c in _captions_of(self.source, i)]
      img2txt.append(np.arange(len(texts), len(texts) + len(caps), dtype=np.int32))
      texts += caps
      txt2img += [i] * len(caps)
    self.captions = texts
    self.txt2img = np.asarray(txt2img, np.int32)
    self.img2txt = img2txt
    self.tokenizer = tokenizer or make_tokenizer(data_cfg)
    self.text_ids, self.text_mask = self.tokenizer(texts)

  @property
  def num_images(self) -> int:
    return len(self.source)

  @property
  def num_texts(self) -> int:
    return len(self.captions)

  def image(self, index: int) -> np.ndarray:
    return self.image_tf(self.source[index]["image"], None)[0]

  def image_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    n = self.num_images
    for start in range(0, n, batch_size):
      idx = np.arange(start, start + batch_size)
      valid = idx < n
      images = [self.image(int(i)) for i in idx[valid]]
      pad = [np.zeros_like(images[0])] * int((~valid).sum())
      yield {"image": np.stack(images + pad), "index": np.where(valid, idx, 0).astype(np.int32),
             "valid": valid}

  def text_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    m = self.num_texts
    for start in range(0, m, batch_size):
      idx = np.arange(start, start + batch_size)
      valid = idx < m
      take = np.where(valid, idx, 0)
      yield {"text_ids": self.text_ids[take], "text_mask": self.text_mask[take],
             "index": take.astype(np.int32), "valid": valid}


def make_eval_data(data_cfg: Any, split: Optional[str] = None,
                   tokenizer: Optional[Tokenizer] = None) -> EvalData:
  return EvalData(data_cfg, split or data_cfg.eval_split, tokenizer)
