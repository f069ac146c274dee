"""Image transforms: crop geometry, RandAugment ops, normalisation, flip caption swap."""

import numpy as np
import pytest
from PIL import Image

from simla_jax import data as simla_data
from simla_jax.data import augment, default_data_config, pipeline, shapes
from simla_jax.data.tokenizer import pre_caption


def test_random_resized_crop_box_in_bounds_and_area():
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = augment.random_resized_crop_box(48, 64, rng, (0.2, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
    assert 0.2 * 48 * 64 * 0.8 <= h * w <= 48 * 64
  # Impossible aspect range -> centred fallback crop with clamped aspect.
  assert augment.random_resized_crop_box(10, 100, rng, (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)


@pytest.mark.parametrize("op", simla_data.RANDAUG_OPS)
def test_each_randaugment_op(op):
  img = Image.fromarray(shapes.ShapesSource(default_data_config(), "train")[3]["image"])
  out = augment.apply_op(img, op, 7, np.random.default_rng(0), translate_const=10, fill=(128,) * 3)
  assert out.size == img.size and out.mode == "RGB"
  changed = not np.array_equal(np.asarray(out), np.asarray(img))
  assert changed == (op != "Identity"), op
  if op == "Rotate":  # the uncovered corners take the fill colour
    assert tuple(np.asarray(out)[0, 0]) == (128, 128, 128)


def test_transform_is_deterministic_in_rng_and_normalised():
  cfg = default_data_config()
  image = shapes.ShapesSource(cfg, "train")[0]["image"]
  tf = augment.ImageTransform(cfg.aug, image_size=48, train=True)
  a, fa = tf(image, np.random.default_rng(5))
  b, fb = tf(image, np.random.default_rng(5))
  np.testing.assert_array_equal(a, b)
  assert fa == fb and a.shape == (48, 48, 3) and a.dtype == np.float32
  ev, flipped = augment.ImageTransform(cfg.aug, image_size=64, train=False)(image, None)
  assert not flipped
  expected = (image / 255.0 - np.array(cfg.aug.mean)) / np.array(cfg.aug.std)
  np.testing.assert_allclose(ev, expected, atol=1e-6)
  d = augment.DvaeTransform(cfg.aug, image_size=32, eps=0.1, train=True)(image,
                                                                      np.random.default_rng(0))
  assert d.shape == (32, 32, 3) and d.min() >= 0.1 - 1e-6 and d.max() <= 0.9 + 1e-6


def test_swap_words():
  assert augment.swap_words("a red circle left of a star at the top right",
                            [("left", "right")]) == "a red circle right of a star at the top left"


def test_flip_swaps_left_and_right_in_the_caption():
  cfg = default_data_config()
  cfg.aug.update(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), randaug_n=0)
  src = shapes.ShapesSource(cfg, "train")
  tok = pipeline.make_tokenizer(cfg)
  tf = pipeline.ExampleTransform(cfg, tok, seed=0, epoch_length=len(src))
  plain = augment.ImageTransform(cfg.aug, image_size=64, train=False)
  n_flipped = n_swapped = 0
  for i in range(40):
    ex = src[i]
    out = tf.map_with_index(i, ex)
    caption = tok.decode(out["text_ids"])
    unflipped = plain(ex["image"], None)[0]
    flipped = np.array_equal(out["image"], unflipped[:, ::-1])
    assert flipped or np.array_equal(out["image"], unflipped)
    originals = [pre_caption(c) for c in ex["captions"]]
    if flipped:
      n_flipped += 1
      assert caption in [augment.swap_words(c, [("left", "right")]) for c in originals]
      n_swapped += caption not in originals
    else:
      assert caption in originals
  assert 5 < n_flipped < 35 and n_swapped > 0
  # Flip off: never flipped.
  cfg.aug.flip = False
  tf = pipeline.ExampleTransform(cfg, tok, seed=0, epoch_length=len(src))
  for i in range(10):
    np.testing.assert_array_equal(tf.map_with_index(i, src[i])["image"], plain(src[i]["image"],
                                                                                None)[0])
