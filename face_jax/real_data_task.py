"""The face task on real data: an insightface `.rec` (or image folder) and `.bin` packs.

Training batches come from `face_jax.data.pipeline` (decode, flip, normalise, bad-record
accounting). On top of them this module adds what MvCoM needs:

  variations   pose / occlusion / blur applied online at `data.train_variation_rate`
               (meta: `data.meta_variation_rate`) with the flags recorded, so those
               attributes are known exactly (specs/mvcom.md §1.5)
  group        from `data.group_of_class`, a .npy (num_classes,) of per-identity group
               ids (e.g. pseudo ethnicity labels); absent -> no group factor
  class_prior  n_y^(-1/4), centred, max |q| = 1 (face_jax/mvcom.py), from the identity sizes
  meta batch   from a second pack of held-out images of training identities,
               `data.meta_rec_prefix`, keys prefixed `meta_` (methods mvcom, l2rw)

Evaluation (face_jax/evaluators.py BinEvaluator): every `data.val_bins` pack with the LFW protocol; the packs named in
`data.group_bins` (e.g. RFW's African/Asian/Caucasian/Indian) also give the worst
group and the max-min gap.
"""

from typing import Any, Mapping, Optional

import grain
import numpy as np

from face_jax import evaluators
from face_jax import mvcom as mvcom_lib
from face_jax import steps as steps_lib
from face_jax.data import pipeline
from face_jax.data import variations
from train_jax.task import Task


def augment(batch: Mapping[str, np.ndarray], rate: float, rng: np.random.Generator,
            cfg) -> dict[str, np.ndarray]:
  """Applies each variation to each image with probability `rate`; records the flags."""
  images = np.array(batch["image"], copy=True)
  flags = {v: (rng.random(len(images)) < rate).astype(np.int32) for v in variations.VARIATIONS}
  for i in range(len(images)):
    f = {v: bool(flags[v][i]) for v in variations.VARIATIONS}
    sub = np.random.default_rng(rng.integers(2 ** 63))
    if any(f.values()):
      images[i] = variations.apply(images[i], f, sub, cfg)
  return {**batch, "image": images, **flags}


class AttributeIterator(grain.DatasetIterator):
  """Adds variations, group, class prior and (optionally) the meta batch to each batch.

  State: both parents' states and the batch counter (the variation draws are a
  function of (seed, counter)).
  """

  def __init__(self, train_it, meta_it, data_cfg, seed: int, class_prior: np.ndarray,
               group_of_class: Optional[np.ndarray]):
    super().__init__([train_it] + ([meta_it] if meta_it is not None else []))
    self._train, self._meta = train_it, meta_it
    self._cfg, self._seed = data_cfg, int(seed)
    self._prior, self._groups = class_prior, group_of_class
    self._count = 0

  def _attributes(self, batch, rate, salt):
    out = augment(batch, rate, np.random.default_rng([self._seed, salt, self._count]), self._cfg)
    labels = out["label"]
    out["class_prior"] = self._prior[labels].astype(np.float32)
    if self._groups is not None:
      out["group"] = self._groups[labels].astype(np.int32)
    return out

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._attributes(next(self._train), self._cfg.train_variation_rate, 1)
    if self._meta is not None:
      meta = self._attributes(next(self._meta), self._cfg.meta_variation_rate, 2)
      batch.update({f"meta_{k}": v for k, v in meta.items()})
    self._count += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"train": self._train.get_state(),
            "meta": self._meta.get_state() if self._meta is not None else {},
            "count": self._count}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._train.set_state(state["train"])
    if self._meta is not None:
      self._meta.set_state(state["meta"])
    self._count = int(state["count"])

  def host_metrics(self) -> dict[str, float]:
    out = dict(self._train.host_metrics())
    if self._meta is not None:
      out.update({f"meta_{k}": v for k, v in self._meta.host_metrics().items()})
    return out


def _meta_config(config):
  meta = config.copy_and_resolve_references()
  with meta.unlocked():
    meta.batch_size = config.data.meta_batch_size
    meta.data.rec_prefix = config.data.meta_rec_prefix
    meta.data.image_root = ""
    if config.data.get("source") == "tfds":
      meta.data.tfds_split = config.data.tfds_meta_split
    meta.seed = config.seed + 1
  return meta


def make_task(config, tx, schedule) -> Task:
  """The face task over `config.data.rec_prefix` / `image_root` and `val_bins`."""
  data = config.data
  source = pipeline.make_source(data)
  num_classes = source.num_classes
  counts = np.diff(source.identity_ranges, axis=1)[:, 0]
  # A TFDS build may carry the per-identity groups it was built with.
  group_of_class = getattr(source, "group_of_class", None)
  if data.group_of_class:
    group_of_class = np.load(data.group_of_class, allow_pickle=False).astype(np.int32)
    if group_of_class.shape != (num_classes,):
      raise ValueError(f"{data.group_of_class}: expected ({num_classes},) group ids, one per "
                       f"identity, got shape {group_of_class.shape}")
  names = [n for n, _ in config.mvcom.factors]
  if "group" in names and group_of_class is None and (
      config.method == "mvcom" and config.mvcom.attributes == "oracle"):
    raise ValueError("config.mvcom.factors has 'group' but config.data.group_of_class is empty: "
                     "give per-identity group labels or drop the factor")
  if data.sampling != "uniform":
    raise ValueError("config.data.sampling: group-balanced sampling is implemented for the "
                     "synthetic data only")
  meta_it = None
  if steps_lib.uses_meta_batch(config):
    if not data.meta_rec_prefix and not (data.get("source") == "tfds" and data.tfds_meta_split):
      raise ValueError(f"config.method={config.method!r} needs a meta set: set "
                       "config.data.meta_rec_prefix (held-out images of training identities) "
                       "or, with data.source='tfds', data.tfds_meta_split")
    meta_it = pipeline.train_iterator(_meta_config(config))
  it = AttributeIterator(pipeline.train_iterator(config, source), meta_it, data, config.seed,
                         mvcom_lib.class_prior(counts), group_of_class)
  steps = steps_lib.Steps(config, steps_lib.build_model(config, num_classes), tx, schedule)
  size = ((data.image_size,) * 2 if isinstance(data.image_size, int) else tuple(data.image_size))
  evaluator = evaluators.BinEvaluator(config, steps)
  return Task(init=lambda rng: steps.init(rng, (*size, 3)), train_step=steps.train_step,
              train_data=it, evaluate=evaluator, finish=evaluator.finish,
              host_metrics=it.host_metrics)
