"""Which examples make up global batch j: a pure function of (seed, j).

Random access by step keeps the pipeline deterministic and resumable (grain checkpoints
only the step counter), and every process computes the same global index list and keeps
its own rows.

  EpochSampler          each epoch a fresh permutation of all examples (the usual shuffle)
  GroupBalancedSampler  each batch draws groups uniformly, then an example of that group
                        uniformly: the group-balanced sampling baseline
  StratifiedIdentitySampler  each batch the same number of identities from every group,
                        with all their images (a group-stratified meta batch that a
                        prototype loss can use)
"""

import functools

import numpy as np


class EpochSampler:
  """Global batch j = positions [j*b, (j+1)*b) of the concatenated epoch permutations."""

  def __init__(self, num_examples: int, batch_size: int, seed: int, salt: int = 0):
    if num_examples <= 0:
      raise ValueError("EpochSampler: no examples")
    self.n, self.b, self.seed, self.salt = int(num_examples), int(batch_size), int(seed), int(salt)

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.n)

  def __call__(self, j: int) -> np.ndarray:
    pos = np.arange(j * self.b, (j + 1) * self.b, dtype=np.int64)
    out = np.empty(self.b, np.int64)
    for epoch in np.unique(pos // self.n):
      sel = pos // self.n == epoch
      out[sel] = self._permutation(int(epoch))[pos[sel] % self.n]
    return out


class GroupBalancedSampler:
  """Each example of batch j: a group uniformly at random, then a member uniformly."""

  def __init__(self, groups: np.ndarray, batch_size: int, seed: int, salt: int = 0):
    groups = np.asarray(groups)
    self.members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    self.b, self.seed, self.salt = int(batch_size), int(seed), int(salt)

  def __call__(self, j: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.salt, j])
    which = rng.integers(0, len(self.members), self.b)
    pick = rng.random(self.b)
    return np.array([self.members[g][int(p * len(self.members[g]))] for g, p in zip(which, pick)],
                    np.int64)


class StratifiedIdentitySampler:
  """Batch j: `batch_size // (groups * images_per_id)` identities of each group, drawn
  without replacement, each with all its `images_per_id` consecutive examples.

  Identity k owns examples [k * images_per_id, (k + 1) * images_per_id).
  """

  def __init__(self, identity_groups: np.ndarray, images_per_id: int, batch_size: int,
               seed: int, salt: int = 0):
    identity_groups = np.asarray(identity_groups)
    self.members = [np.flatnonzero(identity_groups == g) for g in np.unique(identity_groups)]
    self.k, self.b = int(images_per_id), int(batch_size)
    per_group, rest = divmod(self.b, len(self.members) * self.k)
    if rest or per_group < 1:
      raise ValueError(f"stratified meta batch: batch size {self.b} is not a positive multiple of "
                       f"{len(self.members)} groups x {self.k} images per identity")
    small = min(len(m) for m in self.members)
    if per_group > small:
      raise ValueError(f"stratified meta batch: {per_group} identities per group needed, the "
                       f"smallest group has {small}")
    self.per_group, self.seed, self.salt = per_group, int(seed), int(salt)

  def __call__(self, j: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.salt, j])
    ids = np.concatenate([rng.choice(m, self.per_group, replace=False) for m in self.members])
    return (ids[:, None] * self.k + np.arange(self.k)[None, :]).reshape(-1).astype(np.int64)


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that one process loads."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)
