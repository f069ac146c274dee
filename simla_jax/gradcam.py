"""Grad-CAM grounding maps and box scoring (the official Grounding.py, dataset/utils.py).

  maps = itm_gradcam(model, params, images, ids, mask, layer=8)    # (b, g, g)
  maps = itc_gradcam(model, params, images, ids, mask, block=-1)   # (b, g, g)
  heat = upsample(maps[i], height, width)                          # bicubic, as torch
  k = best_box(heat, boxes_xywh)                                   # sum(in box) / area^0.5
  hit = iou_xywh(boxes_xywh[k], truth_xywh) >= 0.5

`itm` (official `--gradcam_mode itm --block_num 8`): the ITM match logit of each
(image, expression) pair is differentiated with respect to the cross-attention
probabilities (b, heads, L, 1+N) of BERT layer `layer`; with the [CLS] image column
dropped, Grad-CAM = probs * clamp(grad, 0), padding text rows zeroed, then the mean
over heads and over all L text rows (padding counted in the denominator), on the patch
grid (ALBEF, `model.architecture="albef"`: only its fusion layers, `cross_layers`, have
cross-attention and maps). `itc`: the ITC similarity image . text / temp differentiated
with respect to the ViT self-attention of block `block`; its [CLS] row to the patches,
probs * clamp(grad, 0), mean over heads.

The probabilities and their gradients come from the models' attention hook
(`layers.Attention(hook=True)`): every hooked attention sows its probabilities into
"intermediates" and adds a zero "perturbations" variable, whose gradient is theirs.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simla_jax.models import SIMLA
from simla_jax.models import simla as simla_lib
from simla_jax.models import vit as vit_lib

MODES = ("itm", "itc")


def check_layer(index: int, depth: int, what: str) -> int:
  """`index` in [-depth, depth) -> [0, depth); else an error naming the model's depth."""
  if not -depth <= int(index) < depth:
    raise ValueError(f"{what} {index} is out of range for a model with {depth} layers "
                     f"(valid: 0..{depth - 1}, or negative from the end; the official "
                     f"block 8 needs a 12-layer BERT)")
  return int(index) % depth


def cross_layers(model: SIMLA) -> range:
  """The BERT layers with cross-attention, whose maps the itm mode has: every layer
  (SIMLA), ALBEF's fusion layers [fusion_start, layers) (its text layers have none)."""
  start = simla_lib.fusion_start(model.config)
  return range(start or 0, model.config.bert.layers)


def check_itm_layer(model: SIMLA, index: int, what: str) -> int:
  """`check_layer` over the BERT depth, and the layer must cross-attend (ALBEF)."""
  layer = check_layer(index, model.config.bert.layers, what)
  cross = cross_layers(model)
  if layer not in cross:
    raise ValueError(f"{what} {index} (layer {layer}) has no cross-attention: ALBEF's "
                     f"layers 0..{cross[0] - 1} are text-only, its fusion layers are "
                     f"{cross[0]}..{cross[-1]}")
  return layer


def _hooked_layers(tree: Any, unrolled: tuple[str, ...], scanned: tuple[str, ...],
                   indices: range) -> jax.Array:
  """The hooked arrays of layers `indices`, stacked (len(indices), ...), from an
  "intermediates" / "perturbations" tree, unrolled (`<module>/<layer>_<i>/...`) or scanned
  (`scanned` path, already with a leading `layers` axis, holding exactly those layers)."""
  def get(path):
    node = tree
    for key in path:
      node = node[key]
    return node[0] if isinstance(node, tuple) else node   # sow keeps a tuple
  module, layer, *rest = unrolled
  if f"{layer}_{indices[0]}" in tree.get(module, {}):
    return jnp.stack([get((module, f"{layer}_{i}", *rest)) for i in indices])
  return get(scanned)


_BERT = (("bert", "layer", "crossattention", "probs"),
         ("bert", "encoder", "layer", "crossattention", "probs"))
# ALBEF scanned: the fusion layers are a stack of their own.
_BERT_FUSION = (_BERT[0], ("bert", "fusion_encoder", "layer", "crossattention", "probs"))
_VIT = (("vit", "block", "attn", "probs"), ("vit", "blocks", "attn", "probs"))


def _zero_perturbations(fn, params, *args) -> Any:
  """Zeros of the "perturbations" collection `fn` creates (shapes only, nothing runs)."""
  def create(p, *a):
    return fn({"params": p}, *a, mutable=["perturbations"])[1]["perturbations"]
  shapes = jax.eval_shape(create, params, *args)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _probs_and_grads(apply, params, unrolled_scanned, indices, *args):
  """(probs, d score.sum() / d probs) of hooked layers `indices`, (len(indices), b, heads,
  q, k) each; `apply(variables, *args, mutable)` returns (per-example score (b,), state)."""
  zeros = _zero_perturbations(apply, params, *args)

  def total(pert):
    scores, state = apply({"params": params, "perturbations": pert}, *args,
                          mutable=["intermediates"])
    return scores.sum(), state["intermediates"]

  grads, inter = jax.grad(total, has_aux=True)(zeros)
  unrolled, scanned = unrolled_scanned
  return (_hooked_layers(inter, unrolled, scanned, indices),
          _hooked_layers(grads, unrolled, scanned, indices))


def itm_cam(probs_b_h_l_k: jax.Array, grads_b_h_l_k: jax.Array,
            mask_b_l: jax.Array) -> jax.Array:
  """Grad-CAM of cross-attention: (b, heads, L, 1+N) probs and grads, (b, L) text mask ->
  (b, N): mean over heads and all L rows of probs * clamp(grad, 0) with padding rows 0."""
  rows = mask_b_l.astype(jnp.float32)[:, None, :, None]
  cam = probs_b_h_l_k[..., 1:] * rows
  grad = jnp.maximum(grads_b_h_l_k[..., 1:], 0.0) * rows
  return (cam * grad).mean(axis=(1, 2))


def itc_cam(probs_b_h_q_k: jax.Array, grads_b_h_q_k: jax.Array) -> jax.Array:
  """Grad-CAM of ViT self-attention: the [CLS] row to the patches, probs * clamp(grad, 0),
  mean over heads: (b, heads, 1+N, 1+N) -> (b, N)."""
  return (probs_b_h_q_k[:, :, 0, 1:] * jnp.maximum(grads_b_h_q_k[:, :, 0, 1:], 0.0)).mean(1)


def _to_grid(cam_n: jax.Array) -> jax.Array:
  g = int(round(cam_n.shape[-1] ** 0.5))
  return cam_n.reshape(*cam_n.shape[:-1], g, g)


def itm_gradcam(model: SIMLA, params, images, ids, mask, layer: int | None) -> jax.Array:
  """ITM Grad-CAM maps (b, g, g) of (image, expression) pairs at BERT layer `layer`;
  `layer=None`: every cross-attending layer's (`cross_layers`: all of SIMLA's, ALBEF's
  fusion layers), (len(cross_layers), b, g, g), from the same forward and backward."""
  cross = cross_layers(model)
  if layer is not None:
    layer = check_itm_layer(model, layer, "grounding BERT layer")

  def match_logit(module: SIMLA, images, ids, mask):
    image_seq = module.embed_image(images)
    fused = module.bert.encode(module.bert.embed(ids), mask, image_seq, hook_cross=True)
    return module.itm_logits(fused)[:, 1].astype(jnp.float32)

  def apply(variables, *args, mutable):
    return model.apply(variables, *args, method=match_logit, mutable=mutable)

  paths = _BERT if cross[0] == 0 else _BERT_FUSION
  probs, grads = _probs_and_grads(apply, params, paths, cross, images, ids, mask)
  maps = _to_grid(jax.vmap(itm_cam, in_axes=(0, 0, None))(probs, grads, mask))
  return maps if layer is None else maps[layer - cross[0]]


def itc_gradcam(model: SIMLA, params, images, ids, mask, block: int | None) -> jax.Array:
  """ITC Grad-CAM maps (b, g, g) at ViT block `block` (official `--gradcam_mode itc`);
  `block=None`: every block's, (depth, b, g, g)."""
  depth = model.config.vit.depth
  if block is not None:
    block = check_layer(block, depth, "grounding ViT block")

  def similarity(module: SIMLA, images, ids, mask):
    image_seq = module.vit(images, hook_attention=True)
    img = module.image_feature(image_seq)
    txt = module.text_feature(module.embed_text(ids, mask))
    return (img * txt).sum(-1).astype(jnp.float32) / module.temperature()

  def apply(variables, *args, mutable):
    return model.apply(variables, *args, method=similarity, mutable=mutable)

  probs, grads = _probs_and_grads(apply, params, _VIT, range(depth), images, ids, mask)
  maps = _to_grid(jax.vmap(itc_cam)(probs, grads))
  return maps if block is None else maps[block]


def gradcam(mode: str, model: SIMLA, params, images, ids, mask, layer: int | None) -> jax.Array:
  """`itm_gradcam` or `itc_gradcam` by `mode`."""
  if mode == "itm":
    return itm_gradcam(model, params, images, ids, mask, layer)
  if mode == "itc":
    return itc_gradcam(model, params, images, ids, mask, layer)
  raise ValueError(f"grounding mode {mode!r}: expected one of {MODES}")


# --------------------------------------------------------------------------- boxes
def upsample(map_h_w: np.ndarray, height: int, width: int) -> np.ndarray:
  """torch F.interpolate(mode='bicubic', align_corners=False) of a 2-D map to (height, width)."""
  m = np.asarray(map_h_w, np.float64)
  rows = vit_lib.bicubic_matrix(m.shape[0], int(height))
  cols = vit_lib.bicubic_matrix(m.shape[1], int(width))
  return rows @ m @ cols.T


def box_scores(heat_h_w: np.ndarray, boxes_xywh: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Official proposal score: sum of the map over heat[int(y):int(y+h), int(x):int(x+w)]
  divided by (w h)^alpha. boxes (n, 4) COCO (x, y, w, h) in pixels -> (n,)."""
  boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
  # An integral image: each box's sum in O(1).
  integral = np.pad(np.cumsum(np.cumsum(heat_h_w, 0), 1), ((1, 0), (1, 0)))
  h, w = heat_h_w.shape
  x0 = np.clip(boxes[:, 0].astype(int), 0, w)
  y0 = np.clip(boxes[:, 1].astype(int), 0, h)
  x1 = np.clip((boxes[:, 0] + boxes[:, 2]).astype(int), 0, w)
  y1 = np.clip((boxes[:, 1] + boxes[:, 3]).astype(int), 0, h)
  x1, y1 = np.maximum(x1, x0), np.maximum(y1, y0)
  sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
  area = boxes[:, 2] * boxes[:, 3]
  return sums / np.maximum(area, 1e-12) ** alpha


def best_box(heat_h_w: np.ndarray, boxes_xywh: np.ndarray, alpha: float = 0.5) -> int:
  """Index of the highest-scoring proposal (the first on ties). The official loop keeps
  the first box scoring above 0 and higher than every earlier one; argmax is the same
  whenever some box scores above 0."""
  return int(np.argmax(box_scores(heat_h_w, boxes_xywh, alpha)))


def iou_xywh(a, b) -> float:
  """The official computeIoU of two (x, y, w, h) boxes (inclusive pixel corners)."""
  ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
  ix1 = min(a[0] + a[2] - 1, b[0] + b[2] - 1)
  iy1 = min(a[1] + a[3] - 1, b[1] + b[3] - 1)
  inter = (ix1 - ix0 + 1) * (iy1 - iy0 + 1) if ix0 < ix1 and iy0 < iy1 else 0
  union = a[2] * a[3] + b[2] * b[3] - inter
  return float(inter) / float(union)


def xyxy_to_xywh(boxes) -> np.ndarray:
  """(n, 4) (x0, y0, x1, y1) with x1, y1 exclusive -> (x, y, w, h)."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
