"""MLM masking statistics (JAX) and BEiT block masks (numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simla_jax.data.masks import IGNORE_INDEX, BlockMaskGenerator, mlm_mask

PAD, CLS, MASK, VOCAB = 0, 2, 4, 1000


def _batch(rng, b=2048, length=30):
  ids = rng.integers(5, VOCAB, size=(b, length)).astype(np.int32)
  ids[:, 0] = CLS
  lengths = rng.integers(3, length + 1, size=b)
  ids[np.arange(length)[None, :] >= lengths[:, None]] = PAD
  return ids


def test_mlm_statistics_and_invariants():
  ids = _batch(np.random.default_rng(0))
  fn = jax.jit(lambda x, k: mlm_mask(x, k, vocab_size=VOCAB, mask_id=MASK, pad_id=PAD,
                                     cls_id=CLS))
  masked, labels = (np.asarray(a) for a in fn(jnp.asarray(ids), jax.random.key(0)))
  eligible = (ids != PAD) & (ids != CLS)
  selected = labels != IGNORE_INDEX
  assert not (selected & ~eligible).any(), "PAD / CLS must never be selected"
  np.testing.assert_array_equal(masked[~selected], ids[~selected])
  np.testing.assert_array_equal(labels[selected], ids[selected])
  n_sel = selected.sum()
  rate = n_sel / eligible.sum()
  assert abs(rate - 0.15) < 0.006, rate            # ~36k eligible tokens: sd ~0.002
  to_mask = (masked == MASK) & selected
  changed = (masked != ids) & ~to_mask & selected   # random id that differs
  kept = (masked == ids) & selected
  assert abs(to_mask.sum() / n_sel - 0.8) < 0.02
  assert abs(changed.sum() / n_sel - 0.1 * (1 - 1 / VOCAB)) < 0.015
  assert abs(kept.sum() / n_sel - 0.1) < 0.015
  assert masked.dtype == np.int32 and (masked >= 0).all() and (masked < VOCAB).all()
  # Deterministic in the key, different across keys.
  again, _ = fn(jnp.asarray(ids), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(again), masked)
  other, _ = fn(jnp.asarray(ids), jax.random.key(1))
  assert not np.array_equal(np.asarray(other), masked)


@pytest.mark.parametrize("grid, target, min_patches", [((4, 4), 5, 2), ((16, 16), 75, 16),
                                                       ((14, 14), 60, 16)])
def test_block_mask_count_and_shape(grid, target, min_patches):
  gen = BlockMaskGenerator(grid, target, min_patches, None, 0.3, None)
  counts = []
  for seed in range(300):
    m = gen(np.random.default_rng(seed))
    assert m.shape == grid and m.dtype == bool
    counts.append(int(m.sum()))
    np.testing.assert_array_equal(m, gen(np.random.default_rng(seed)))
  counts = np.array(counts)
  assert counts.max() <= target  # never above the target (BEiT)
  assert (counts == target).mean() > 0.5 and counts.mean() > 0.9 * target


def test_block_mask_is_made_of_rectangles():
  # One step of the generator adds one axis-aligned rectangle of at most `budget`
  # patches, strictly smaller than the grid, with aspect h/w near the allowed range.
  gen = BlockMaskGenerator((16, 16), 40, 10, None, 0.5, 2.0)
  for seed in range(100):
    m = np.zeros((16, 16), bool)
    added = gen._add_block(m, 30, np.random.default_rng(seed))
    ys, xs = np.nonzero(m)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    assert added == h * w == m.sum() <= 30 and h < 16 and w < 16
    assert 0.25 <= h / w <= 4.0  # rounding of sqrt(area * aspect) widens [0.5, 2]
  with pytest.raises(ValueError):
    BlockMaskGenerator((4, 4), 17, 2)
