"""Variation factors applied to float HWC images with known parameters (NumPy).

Used to render the synthetic faces and as online augmentation of real faces, so the
attribute of every augmented sample is known exactly (the URFace line's "online
variation data augmentation", specs/mvcom.md §1.5):

  pose       a horizontal shift (edge pixels repeat) plus an illumination ramp across
             the face, both towards `direction` (+1 / -1): a crude yaw surrogate
  occlusion  a horizontal band of the image set to a constant
  blur       an isotropic Gaussian blur

Images are float arrays (h, w, c), typically in [-1, 1].
"""

import functools
from typing import Optional

import numpy as np

VARIATIONS = ("pose", "occlusion", "blur")


def pose(image: np.ndarray, direction: int, shift: int, ramp: float) -> np.ndarray:
  """Shift by direction*shift pixels along x and add a linear brightness ramp."""
  h, w, _ = image.shape
  src = np.clip(np.arange(w) - direction * shift, 0, w - 1)
  out = image[:, src]
  return out + (direction * ramp * np.linspace(-1.0, 1.0, w, dtype=image.dtype))[None, :, None]


def occlusion(image: np.ndarray, top: int, height: int, value: float = 0.0) -> np.ndarray:
  """Rows [top, top + height) set to `value`."""
  out = image.copy()
  out[top:top + height] = value
  return out


@functools.lru_cache(maxsize=32)
def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(np.ceil(3 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur with reflected borders."""
  if sigma <= 0:
    return image
  k = _gaussian_kernel(float(sigma))
  r = len(k) // 2
  out = image.astype(np.float32)
  for axis in (0, 1):
    pad = [(0, 0)] * 3
    pad[axis] = (r, r)
    padded = np.pad(out, pad, mode="reflect")
    n = out.shape[axis]
    out = sum(k[j] * np.take(padded, np.arange(j, j + n), axis=axis) for j in range(len(k)))
  return out.astype(image.dtype)


def apply(image: np.ndarray, flags: dict, rng: np.random.Generator, cfg,
          degrees: Optional[dict] = None) -> np.ndarray:
  """Applies the flagged variations (pose, then blur, then occlusion).

  Args:
    image: (h, w, c) float.
    flags: {"pose": bool, "occlusion": bool, "blur": bool}.
    rng: draws the pose direction and the band position.
    cfg: pose_shift (px), pose_ramp, occlusion_fraction (of the height), blur_sigma (px).
    degrees: optional {variation: degree in [0, 1]} scaling each applied variation
      (shift and ramp, band height, blur sigma); absent -> full strength.
  """
  degrees = degrees or {}
  h = image.shape[0]
  direction = 1 if rng.random() < 0.5 else -1
  band = max(1, int(round(degrees.get("occlusion", 1.0) * cfg.occlusion_fraction * h)))
  top = int(rng.integers(0, h - band + 1))
  if flags["pose"]:
    u = degrees.get("pose", 1.0)
    image = pose(image, direction, int(round(u * cfg.pose_shift)), float(u * cfg.pose_ramp))
  if flags["blur"]:
    image = blur(image, float(degrees.get("blur", 1.0) * cfg.blur_sigma))
  if flags["occlusion"]:
    image = occlusion(image, top, band)
  return image
