"""Image transforms of SIMLA pretraining, with PIL and an explicit numpy Generator.

Train (ViT view): RandomResizedCrop(image_size, scale, ratio, bicubic) -> horizontal
flip (p 0.5) -> RandAugment subset -> float32 /255 -> CLIP normalisation. When the
image is flipped, `swap_words` exchanges left/right in its caption (shapes world).
Eval: bicubic resize to image_size -> normalisation.
dVAE view: an independent crop / flip / RandAugment at `dvae_image_size`, then
`map_pixels` (x in [0, 1] -> x (1 - 2 eps) + eps), as the official code feeds the
DALL-E tokenizer.

RandAugment (official `RandomAugment(N, M)`): draw N ops uniformly with replacement
from the list; apply each with probability `randaug_prob`. Magnitude M of 10:
Brightness/Sharpness factor 0.1 + 1.8 M/10; ShearX/Y 0.3 M/10; TranslateX/Y
translate_const M/10 pixels; Rotate 30 M/10 degrees; geometric ops get a random sign
and fill the uncovered area with `fill`.

Every random choice comes from the Generator passed in, so a transform is a pure
function of (image, rng); the pipeline seeds rng per (seed, epoch, index).

  tf = ImageTransform(data_cfg.aug, image_size=64, train=True)
  x, flipped = tf(uint8_hwc, rng)          # (64, 64, 3) float32, bool
  caption = swap_words(caption, data_cfg.aug.flip_swap) if flipped else caption
"""

import math
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR
_MAX_LEVEL = 10.0

def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float], ratio: Sequence[float]
                            ) -> tuple[int, int, int, int]:
  """Crop (top, left, h, w) as torchvision's RandomResizedCrop chooses it.

  Ten tries of area ~ U(scale) * H W and log-aspect ~ U(log ratio); if none fits,
  the largest centred crop with aspect clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def apply_op(img: Image.Image, name: str, magnitude: float, rng: np.random.Generator,
             *, translate_const: float, fill: tuple[int, ...]) -> Image.Image:
  """One RandAugment op at `magnitude` (0..10) on an RGB PIL image."""
  level = magnitude / _MAX_LEVEL
  if name == "Identity":
    return img
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Brightness":
    return ImageEnhance.Brightness(img).enhance(0.1 + 1.8 * level)
  if name == "Sharpness":
    return ImageEnhance.Sharpness(img).enhance(0.1 + 1.8 * level)
  if name in ("ShearX", "ShearY"):
    s = _signed(0.3 * level, rng)
    coeffs = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=_BILINEAR,
                         fillcolor=fill)
  if name in ("TranslateX", "TranslateY"):
    t = _signed(translate_const * level, rng)
    coeffs = (1, 0, t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, t)
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=_BILINEAR,
                         fillcolor=fill)
  if name == "Rotate":
    return img.rotate(_signed(30.0 * level, rng), resample=_BILINEAR, fillcolor=fill)
  raise ValueError(f"augment: unknown RandAugment op {name!r}")


def rand_augment(img: Image.Image, rng: np.random.Generator, aug_cfg: Any) -> Image.Image:
  ops = tuple(aug_cfg.randaug_ops)
  if not ops or aug_cfg.randaug_n <= 0:
    return img
  fill = tuple(int(f) for f in aug_cfg.fill)
  for k in rng.integers(0, len(ops), size=int(aug_cfg.randaug_n)):
    if rng.random() < aug_cfg.randaug_prob:
      img = apply_op(img, ops[k], float(aug_cfg.randaug_m), rng,
                     translate_const=float(aug_cfg.translate_const), fill=fill)
  return img


def swap_words(caption: str, pairs: Sequence[Sequence[str]]) -> str:
  """Exchanges each pair of words (whole words, both directions) in a caption."""
  table = {}
  for a, b in pairs:
    table[a], table[b] = b, a
  return " ".join(table.get(w, w) for w in caption.split(" "))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 (..., 3) -> float32 (x / 255 - mean) / std."""
  x = image.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def map_pixels(image: np.ndarray, eps: float) -> np.ndarray:
  """uint8 (..., 3) -> float32 in [eps, 1 - eps] (DALL-E's logit-Laplace input range)."""
  return (1 - 2 * eps) * (image.astype(np.float32) / 255.0) + eps


def _augment_pil(image: np.ndarray, rng: np.random.Generator, aug_cfg: Any,
                 size: int) -> tuple[Image.Image, bool]:
  img = Image.fromarray(image)
  top, left, h, w = random_resized_crop_box(img.height, img.width, rng, aug_cfg.crop_scale,
                                            aug_cfg.crop_ratio)
  img = img.resize((size, size), _BICUBIC, box=(left, top, left + w, top + h))
  flipped = bool(aug_cfg.flip) and rng.random() < 0.5
  if flipped:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return rand_augment(img, rng, aug_cfg), flipped


class ImageTransform:
  """(uint8 HWC RGB, rng) -> ((size, size, 3) float32 CLIP-normalised, flipped).

  train: crop / flip / RandAugment; else a bicubic resize (rng unused). A class, not a
  closure, so grain can pickle it into worker processes.
  """

  def __init__(self, aug_cfg: Any, *, image_size: int, train: bool):
    self.aug_cfg = aug_cfg
    self.image_size = int(image_size)
    self.train = bool(train)
    self.mean, self.std = tuple(aug_cfg.mean), tuple(aug_cfg.std)

  def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator]
               ) -> tuple[np.ndarray, bool]:
    if self.train:
      img, flipped = _augment_pil(image, rng, self.aug_cfg, self.image_size)
    else:
      img, flipped = Image.fromarray(image), False
      if img.size != (self.image_size, self.image_size):
        img = img.resize((self.image_size, self.image_size), _BICUBIC)
    return normalize(np.asarray(img), self.mean, self.std), flipped


class DvaeTransform:
  """(uint8 HWC, rng) -> (size, size, 3) float32 `map_pixels` view for the dVAE.

  train: its own crop / flip / RandAugment, independent of the ViT view (official).
  """

  def __init__(self, aug_cfg: Any, *, image_size: int, eps: float, train: bool):
    self.aug_cfg = aug_cfg
    self.image_size = int(image_size)
    self.eps = float(eps)
    self.train = bool(train)

  def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator]) -> np.ndarray:
    if self.train:
      img, _ = _augment_pil(image, rng, self.aug_cfg, self.image_size)
    else:
      img = Image.fromarray(image).resize((self.image_size, self.image_size), _BICUBIC)
    return map_pixels(np.asarray(img), self.eps)
