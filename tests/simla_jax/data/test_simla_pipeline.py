"""grain pipelines: batch contract, resumable iterator state, epochs, sharding, eval data."""

import numpy as np
import pytest

from simla_jax.data import default_data_config, pipeline


def _cfg(train_size=64):
  cfg = default_data_config()
  cfg.shapes.update(train_size=train_size, test_size=12)
  return cfg


def _iter(cfg, batch_size=8, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return pipeline.make_train_iterator(cfg, batch_size=batch_size, **kw)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contract():
  cfg = _cfg()
  batch = next(_iter(cfg))
  assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["text_ids"].shape == (8, 30) and batch["text_ids"].dtype == np.int32
  assert batch["text_mask"].shape == (8, 30) and batch["text_mask"].dtype == np.int32
  assert batch["patch_mask"].shape == (8, 16) and batch["patch_mask"].dtype == bool
  assert batch["index"].shape == (8,) and batch["index"].dtype == np.int32
  assert "dvae_image" not in batch
  assert (batch["text_ids"][:, 0] == 2).all()  # [CLS]
  np.testing.assert_array_equal(batch["text_mask"], batch["text_ids"] != 0)
  assert (batch["patch_mask"].sum(1) <= cfg.mim.num_masking_patches).all()
  cfg.mim.update(target="dvae")
  batch = next(_iter(cfg))
  assert batch["dvae_image"].shape == (8, 32, 32, 3) and batch["dvae_image"].dtype == np.float32
  assert 0.1 - 1e-6 <= batch["dvae_image"].min() and batch["dvae_image"].max() <= 0.9 + 1e-6
  cfg.mim.dvae_image_size = 48
  with pytest.raises(ValueError, match="dvae_image_size"):
    _iter(cfg)


def test_state_round_trip_reproduces_following_batches():
  cfg = _cfg()
  it = _iter(cfg)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(7)]  # crosses the epoch boundary (8 batches/epoch)
  resumed = _iter(cfg)
  resumed.set_state(state)
  for want in expected:
    _assert_batches_equal(next(resumed), want)
  # A fresh iterator is deterministic too.
  fresh = _iter(cfg)
  for _ in range(3):
    next(fresh)
  _assert_batches_equal(next(fresh), expected[0])


def test_epochs_reshuffle_and_cover_the_split():
  cfg = _cfg()
  it = _iter(cfg)
  epochs = [np.concatenate([next(it)["index"] for _ in range(8)]) for _ in range(2)]
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), np.arange(64))
  assert not np.array_equal(epochs[0], epochs[1])
  other_seed = _iter(cfg, seed=1)
  assert not np.array_equal(np.concatenate([next(other_seed)["index"] for _ in range(8)]),
                            epochs[0])


def test_process_shards_are_disjoint_and_cover():
  cfg = _cfg()
  seen = []
  for p in range(3):
    it = _iter(cfg, batch_size=7, process_index=p, process_count=3)
    idx = np.concatenate([next(it)["index"] for _ in range(3)])
    assert (idx % 3 == p).all()
    seen.append(idx)
  assert len(np.unique(np.concatenate(seen))) == 63


def test_eval_data_index_maps():
  cfg = _cfg()
  ev = pipeline.make_eval_data(cfg, "test")
  c = cfg.shapes.captions_per_image
  assert ev.num_images == 12 and ev.num_texts == 12 * c
  assert ev.text_ids.shape == (12 * c, 30) and ev.text_ids.dtype == np.int32
  for i, t in enumerate(ev.img2txt):
    np.testing.assert_array_equal(ev.txt2img[t], i)
  np.testing.assert_array_equal(np.concatenate(ev.img2txt), np.arange(12 * c))
  images = list(ev.image_batches(5))
  assert [b["image"].shape for b in images] == [(5, 64, 64, 3)] * 3
  assert images[-1]["valid"].tolist() == [True, True, False, False, False]
  np.testing.assert_array_equal(images[1]["image"][2], ev.image(7))
  texts = list(ev.text_batches(25))
  assert sum(int(b["valid"].sum()) for b in texts) == 12 * c
  np.testing.assert_array_equal(texts[1]["text_ids"][0], ev.text_ids[25])
  # Eval images are the un-augmented images, deterministic.
  again = pipeline.make_eval_data(cfg, "test")
  np.testing.assert_array_equal(again.image(3), ev.image(3))


class _ImageText(pipeline.TaskTransform):
  def map_with_index(self, k, ex):
    return self.image_and_text(k, ex["index"], ex["image"], ex["text"])


def test_task_transform_swaps_left_and_right_exactly_when_it_flips():
  cfg = default_data_config()
  cfg.image_size = 8
  cfg.aug.update(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaug_n=0)
  ex = {"image": np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8),
        "text": "a circle left of a square"}
  train = _ImageText(cfg, None, seed=0, epoch_length=1, train=True)
  flips = []
  for index in range(16):
    image, text = train.map_with_index(0, dict(ex, index=index))
    again, flipped = train.image(0, index, ex["image"])   # the same draw
    np.testing.assert_array_equal(image, again)
    assert text == ("a circle right of a square" if flipped else ex["text"])
    flips.append(flipped)
  assert 0 < sum(flips) < 16
  evaluation = _ImageText(cfg, None, seed=0, epoch_length=1, train=False)
  assert all(evaluation.map_with_index(0, dict(ex, index=i))[1] == ex["text"] for i in range(16))
