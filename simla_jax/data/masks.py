"""Masks for SIMLA's cross-modal masked modelling.

MLM (`mlm_mask`, JAX, jit-friendly; the official code masks inside the model):
each token is selected with probability p (0.15), never [PAD] or [CLS]; a selected
token becomes [MASK] with probability `mask_frac` (0.8), otherwise a uniform random
id in [0, vocab_size) with probability `random_frac` (0.5, i.e. 10 % overall), else it
is kept. Labels hold the original id at selected positions and -100 elsewhere.

  masked_ids, labels = mlm_mask(ids, key, vocab_size=V, mask_id=4, pad_id=0, cls_id=2)

MIM (`BlockMaskGenerator`, numpy, in the data pipeline): BEiT's block-wise masking on
an (h, w) patch grid. Rectangles of area ~ U(min_num_patches, remaining budget) and
aspect ~ exp U(log min_aspect, log max_aspect) are added (each try must add between 1
and the remaining budget of new patches; blocks are strictly smaller than the grid)
until `num_masking_patches` are masked or a round of 10 tries adds nothing; so the
count is exact or below the target.

  gen = BlockMaskGenerator((4, 4), num_masking_patches=5, min_num_patches=2)
  mask = gen(np_rng)      # (4, 4) bool; flatten row-major to the (N,) patch order
"""

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100


def mlm_mask(ids: jax.Array, key: jax.Array, *, vocab_size: int, mask_id: int, pad_id: int,
             cls_id: int, probability: float = 0.15, mask_frac: float = 0.8,
             random_frac: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """BERT masking of token ids.

  ids: (..., L) int token ids. key: a jax PRNG key.
  Returns (masked_ids, labels), both shaped like ids; labels are -100 where the
  token was not selected.
  """
  k_select, k_mask, k_random, k_ids = jax.random.split(key, 4)
  selected = jax.random.bernoulli(k_select, probability, ids.shape)
  selected &= (ids != pad_id) & (ids != cls_id)
  labels = jnp.where(selected, ids, IGNORE_INDEX).astype(ids.dtype)
  to_mask = jax.random.bernoulli(k_mask, mask_frac, ids.shape) & selected
  to_random = jax.random.bernoulli(k_random, random_frac, ids.shape) & selected & ~to_mask
  random_ids = jax.random.randint(k_ids, ids.shape, 0, vocab_size, dtype=ids.dtype)
  masked = jnp.where(to_mask, jnp.asarray(mask_id, ids.dtype), ids)
  masked = jnp.where(to_random, random_ids, masked)
  return masked, labels


class BlockMaskGenerator:
  """BEiT block-wise patch masks (see module docstring).

  grid: (h, w) patches. max_num_patches: largest single block (None or <= 0 =
  num_masking_patches). max_aspect: None or <= 0 = 1 / min_aspect.
  """

  def __init__(self, grid: tuple[int, int], num_masking_patches: int, min_num_patches: int = 4,
               max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
               max_aspect: Optional[float] = None):
    self.height, self.width = (int(g) for g in grid)
    if not 0 <= num_masking_patches <= self.height * self.width:
      raise ValueError(f"masks: num_masking_patches {num_masking_patches} not in "
                       f"[0, {self.height * self.width}]")
    if min_aspect <= 0:
      raise ValueError(f"masks: min_aspect must be positive, got {min_aspect}")
    self.num_masking_patches = int(num_masking_patches)
    self.min_num_patches = int(min_num_patches)
    self.max_num_patches = (self.num_masking_patches if not max_num_patches or max_num_patches <= 0
                            else int(max_num_patches))
    max_aspect = 1.0 / min_aspect if not max_aspect or max_aspect <= 0 else max_aspect
    self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

  @property
  def num_patches(self) -> int:
    return self.height * self.width

  def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
    """Tries up to 10 rectangles; masks the first that adds 1..budget patches."""
    for _ in range(10):
      # random.uniform semantics: also valid when budget < min_num_patches.
      target_area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
      aspect = math.exp(rng.uniform(*self.log_aspect))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < self.width and h < self.height:
        top = int(rng.integers(0, self.height - h + 1))
        left = int(rng.integers(0, self.width - w + 1))
        block = mask[top:top + h, left:left + w]
        new = h * w - int(block.sum())
        if 0 < new <= budget:
          block[...] = True
          return new
    return 0

  def __call__(self, rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool mask with at most `num_masking_patches` True entries."""
    mask = np.zeros((self.height, self.width), bool)
    count = 0
    while count < self.num_masking_patches:
      budget = min(self.num_masking_patches - count, self.max_num_patches)
      added = self._add_block(mask, budget, rng)
      if added == 0:
        break
      count += added
    return mask
