"""Which examples make up global batch j: a pure function of (seed, j).

Random access by step keeps the pipeline deterministic and resumable (grain checkpoints
only the step counter), and every process computes the same global index list and keeps
its own rows.

  EpochSampler          each epoch a fresh permutation of all examples (the usual shuffle)
  GroupBalancedSampler  each batch draws groups uniformly, then an example of that group
                        uniformly: the group-balanced sampling baseline
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


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that one process loads."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)
