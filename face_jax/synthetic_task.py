"""The face task on the synthetic biased world (face_jax/data/synthetic.py)."""

from typing import Callable, Mapping

import grain
import jax
import numpy as np

from face_jax import evaluators
from face_jax import steps as steps_lib
from face_jax.data import sampling
from face_jax.data import synthetic
from train_jax.task import Task


class SyntheticBatches:
  """Random-access global batch j of the synthetic world, this process's rows.

  Keys: image, label, group, pose, occlusion, blur, class_prior (+ <variation>_degree with
  data.variation_degrees); with a meta set the same keys prefixed `meta_` from the meta
  split (data.meta_sampling: uniform epochs, or stratified by group with whole identities).
  """

  def __init__(self, config, faces: synthetic.SyntheticFaces, with_meta: bool):
    d, self.faces, self.with_meta = config.data, faces, with_meta
    self.flip = bool(d.flip)
    self.batch_size = int(config.batch_size)
    self.rows = sampling.process_rows(config.batch_size, jax.process_index(), jax.process_count())
    self.meta_rows = sampling.process_rows(d.meta_batch_size, jax.process_index(), jax.process_count())
    if d.sampling == "group_balanced":
      groups = faces.train_groups[faces.identities("train", np.arange(len(faces)))[0]]
      self.sampler = sampling.GroupBalancedSampler(groups, config.batch_size, config.seed, salt=1)
    else:
      self.sampler = sampling.EpochSampler(len(faces), config.batch_size, config.seed, salt=1)
    if d.meta_sampling == "stratified":
      self.meta_sampler = sampling.StratifiedIdentitySampler(
          faces.meta_groups, d.meta_images_per_id, d.meta_batch_size, config.seed, salt=2)
    elif d.meta_sampling == "uniform":
      self.meta_sampler = sampling.EpochSampler(faces.size("meta"), d.meta_batch_size, config.seed, salt=2)
    else:
      raise ValueError(f"config.data.meta_sampling={d.meta_sampling!r}; known: uniform, stratified")
    self.seed = config.seed

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    j = int(j)
    batch = self.faces.examples("train", self.sampler(j)[self.rows])
    if self.flip:
      # Drawn for the whole global batch, then this process's rows: the same flips for any
      # number of processes.
      flip = np.random.default_rng([self.seed, 3, j]).random(self.batch_size)[self.rows] < 0.5
      batch["image"][flip] = batch["image"][flip][:, :, ::-1]
    if self.with_meta:
      meta = self.faces.examples("meta", self.meta_sampler(j)[self.meta_rows])
      batch.update({f"meta_{k}": v for k, v in meta.items()})
    return batch


def batch_iterator(make_batch: Callable[[int], Mapping[str, np.ndarray]], prefetch: int):
  """A checkpointable grain iterator over make_batch(0), make_batch(1), ..."""
  ds = grain.MapDataset.range(0, 2 ** 62).map(make_batch)
  options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=max(prefetch, 1))
  return iter(ds.to_iter_dataset(options))



def make_task(config, tx, schedule) -> Task:
  """The face task over `config.data` (name "synthetic") with a given optimizer."""
  faces = synthetic.SyntheticFaces(config.data, config.seed)
  steps = steps_lib.Steps(config, steps_lib.build_model(config, faces.num_classes), tx, schedule)
  image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
  data = batch_iterator(SyntheticBatches(config, faces, steps_lib.uses_meta_batch(config)),
                        config.data.prefetch_batches)
  evaluator = evaluators.SyntheticEvaluator(config, faces, steps)
  return Task(init=lambda rng: steps.init(rng, image_shape), train_step=steps.train_step,
              train_data=data, evaluate=evaluator, finish=evaluator.finish,
              loss_keys=("loss",))
