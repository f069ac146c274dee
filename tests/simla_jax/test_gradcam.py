"""Grad-CAM maps against a hand computation, the attention hook, box scoring and IoU."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import simla_model
from simla_jax import convert, gradcam
from simla_jax.models import SIMLA, init_params, layers


def _tiny(scan: bool = False):
  c = simla_model.model_config("tiny")
  c.image_size, c.patch_size = 32, 8
  c.bert.vocab_size, c.codebook_size = 40, 8
  c.scan_layers = scan
  return c


@pytest.fixture(scope="module")
def tiny():
  cfg = _tiny()
  model = SIMLA(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = np.array([[1, 5, 7, 9, 0, 0], [2, 3, 4, 0, 0, 0]], np.int32)
  mask = (ids > 0).astype(np.int32)
  return cfg, model, params, images, ids, mask


def _reference_probs_and_grad(model, params, images, ids, mask, layer):
  """Cross-attention probabilities of BERT layer `layer` and the gradient of the summed
  ITM match logits with respect to them, by re-implementing that attention by hand and
  differentiating with respect to its probabilities as an explicit input (no hook)."""
  target = ("bert", f"layer_{layer}", "crossattention")

  def run(probs_in):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      mod = context.module
      if not (isinstance(mod, layers.Attention) and context.method_name == "__call__"
              and tuple(mod.scope.path) == target):
        return next_fun(*args, **kwargs)
      x, kv, bias = args[0], args[1], args[2]
      p = mod.variables["params"]
      proj = lambda name, t: (jnp.einsum("bld,dhk->blhk", t, p[name]["kernel"])
                              + p[name]["bias"])
      q, k, v = proj("query", x), proj("key", kv), proj("value", kv)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
      if bias is not None:
        logits = logits + bias
      captured["probs"] = jax.nn.softmax(logits, -1)
      used = captured["probs"] if probs_in is None else probs_in
      out = jnp.einsum("bhqk,bkhd->bqhd", used, v)
      return jnp.einsum("bqhd,hde->bqe", out, p["out"]["kernel"]) + p["out"]["bias"]

    def logit(module):
      image_seq = module.embed_image(images)
      fused = module.bert.encode(module.bert.embed(ids), mask, image_seq)
      return module.itm_logits(fused)[:, 1].sum()

    with nn.intercept_methods(interceptor):
      total = model.apply({"params": params}, method=logit)
    return total, captured["probs"]

  _, probs = run(None)
  grad = jax.grad(lambda pr: run(pr)[0])(probs)
  return np.asarray(probs), np.asarray(grad)


def _hand_itm_map(probs, grad, mask):
  """The itm Grad-CAM (b, N) by loops over (b, heads, L, 1+N) probabilities and grads."""
  b, h, length, keys = probs.shape
  expected = np.zeros((b, keys - 1))
  for i in range(b):
    for n in range(keys - 1):
      total = 0.0
      for head in range(h):
        for t in range(length):   # padding rows count in the mean, with value 0
          if mask[i, t]:
            total += probs[i, head, t, 1 + n] * max(grad[i, head, t, 1 + n], 0.0)
      expected[i, n] = total / (h * length)
  return expected


def test_itm_map_equals_hand_computation(tiny):
  cfg, model, params, images, ids, mask = tiny
  layer = 1
  probs, grad = _reference_probs_and_grad(model, params, images, ids, mask, layer)
  expected = _hand_itm_map(probs, grad, mask)
  b, g = len(images), cfg.image_size // cfg.patch_size
  maps = np.asarray(gradcam.itm_gradcam(model, params, images, ids, mask, layer))
  assert maps.shape == (b, g, g)
  assert np.abs(expected).max() > 0
  np.testing.assert_allclose(maps.reshape(b, -1), expected, rtol=1e-4, atol=1e-9)


def test_albef_itm_maps_are_its_fusion_layers_only(tiny):
  cfg, _, _, images, ids, mask = tiny
  albef = _tiny()
  albef.architecture, albef.bert.fusion_start = "albef", cfg.bert.layers - 2
  model = SIMLA(albef)
  params = nn.meta.unbox(init_params(model, jax.random.key(1)))
  fusion = range(cfg.bert.layers - 2, cfg.bert.layers)
  assert gradcam.cross_layers(model) == fusion
  every = np.asarray(gradcam.itm_gradcam(model, params, images, ids, mask, None))
  assert every.shape[0] == len(fusion)                  # one map per fusion layer
  for k, layer in enumerate(fusion):
    probs, grad = _reference_probs_and_grad(model, params, images, ids, mask, layer)
    expected = _hand_itm_map(probs, grad, mask)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(every[k].reshape(len(images), -1), expected, rtol=1e-4,
                               atol=1e-9)
  np.testing.assert_allclose(gradcam.itm_gradcam(model, params, images, ids, mask, -1),
                             every[-1], rtol=1e-6)
  with pytest.raises(ValueError, match="has no cross-attention: ALBEF's layers 0..1"):
    gradcam.itm_gradcam(model, params, images, ids, mask, 0)
  # Scanned, the fusion layers are a stack of their own: the same maps.
  scan_cfg = _tiny(scan=True)
  scan_cfg.architecture, scan_cfg.bert.fusion_start = "albef", fusion[0]
  bert = dict(params["bert"])
  stack = lambda names: jax.tree.map(lambda *a: np.stack(a), *[bert.pop(n) for n in names])
  bert["encoder"] = {"layer": stack([f"layer_{i}" for i in range(fusion[0])])}
  bert["fusion_encoder"] = {"layer": stack([f"layer_{i}" for i in fusion])}
  stacked = convert.stack_layers({k: v for k, v in params.items() if k != "bert"}, scan_cfg)
  np.testing.assert_allclose(
      gradcam.itm_gradcam(SIMLA(scan_cfg), dict(stacked, bert=bert), images, ids, mask, None),
      every, rtol=1e-4, atol=1e-8)


def test_scanned_layers_give_the_same_maps(tiny):
  cfg, model, params, images, ids, mask = tiny
  scan_cfg = _tiny(scan=True)
  stacked = convert.stack_layers(params, scan_cfg)
  for fn, layer in ((gradcam.itm_gradcam, 2), (gradcam.itc_gradcam, -1)):
    np.testing.assert_allclose(fn(SIMLA(scan_cfg), stacked, images, ids, mask, layer),
                               fn(model, params, images, ids, mask, layer),
                               rtol=1e-4, atol=1e-8)


def test_itc_map_is_cls_row_times_positive_grad(tiny):
  cfg, model, params, images, ids, mask = tiny
  depth = cfg.vit.depth

  def sim(pert):
    def f(module):
      seq = module.vit(images, hook_attention=True)
      txt = module.text_feature(module.embed_text(ids, mask))
      return ((module.image_feature(seq) * txt).sum(-1) / module.temperature()).sum()
    total, state = model.apply({"params": params, "perturbations": pert}, method=f,
                               mutable=["intermediates"])
    return total, state["intermediates"]

  zeros = {"vit": {f"block_{i}": {"attn": {"probs": jnp.zeros((2, cfg.vit.heads, 17, 17))}}
                   for i in range(depth)}}
  grads, inter = jax.grad(sim, has_aux=True)(zeros)
  probs = np.asarray(inter["vit"][f"block_{depth - 1}"]["attn"]["probs"][0])
  grad = np.asarray(grads["vit"][f"block_{depth - 1}"]["attn"]["probs"])
  expected = (probs[:, :, 0, 1:] * np.maximum(grad[:, :, 0, 1:], 0)).mean(1)
  maps = np.asarray(gradcam.itc_gradcam(model, params, images, ids, mask, -1))
  np.testing.assert_allclose(maps.reshape(2, -1), expected, rtol=1e-5, atol=1e-10)


def test_hook_is_inert(tiny):
  _, model, params, images, ids, mask = tiny

  def fused(module, hook):
    seq = module.vit(images, hook_attention=hook)
    return module.bert.encode(module.bert.embed(ids), mask, seq, hook_cross=hook)

  plain, state = model.apply({"params": params}, False, method=fused,
                             mutable=["intermediates", "perturbations"])
  assert not state                                # off: nothing is sown or created
  hooked, state = model.apply({"params": params}, True, method=fused,
                              mutable=["intermediates", "perturbations"])
  np.testing.assert_array_equal(np.asarray(hooked), np.asarray(plain))
  zeros = state["perturbations"]
  again = model.apply({"params": params, "perturbations": zeros}, True, method=fused)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(plain))


def test_layer_out_of_range_is_named(tiny):
  _, model, params, images, ids, mask = tiny
  with pytest.raises(ValueError, match="8 is out of range for a model with 4 layers"):
    gradcam.itm_gradcam(model, params, images, ids, mask, 8)


# --------------------------------------------------------------------------- boxes
def test_upsample_matches_torch_bicubic():
  m = np.random.default_rng(1).normal(size=(4, 4))
  want = torch.nn.functional.interpolate(torch.tensor(m)[None, None], size=(37, 53),
                                         mode="bicubic", align_corners=False)[0, 0].numpy()
  np.testing.assert_allclose(gradcam.upsample(m, 37, 53), want, atol=1e-10)


def test_box_scores_are_sum_over_sqrt_area():
  heat = np.arange(100, dtype=np.float64).reshape(10, 10)
  boxes = np.array([[0, 0, 2, 3], [4.7, 5.2, 3.5, 2.1], [8, 8, 5, 5]])   # x y w h
  scores = gradcam.box_scores(heat, boxes)
  # Official: heat[int(y):int(y+h), int(x):int(x+w)].sum() / (w h)^0.5
  want = [heat[0:3, 0:2].sum() / 6 ** 0.5, heat[5:7, 4:8].sum() / (3.5 * 2.1) ** 0.5,
          heat[8:13, 8:13].sum() / 25 ** 0.5]
  np.testing.assert_allclose(scores, want)
  assert gradcam.best_box(heat, boxes) == int(np.argmax(want))


def test_iou_and_accuracy_threshold_on_hand_boxes():
  a = [0, 0, 10, 10]
  assert gradcam.iou_xywh(a, a) == 1.0
  assert gradcam.iou_xywh(a, [5, 0, 10, 10]) == pytest.approx(50 / 150)
  assert gradcam.iou_xywh(a, [20, 20, 5, 5]) == 0.0
  assert gradcam.iou_xywh(a, [0, 0, 10, 5]) == pytest.approx(0.5)   # exactly 0.5: a hit
  np.testing.assert_array_equal(gradcam.xyxy_to_xywh([[2, 3, 7, 9]]), [[2, 3, 5, 6]])


def test_hook_refuses_cls_only(tiny):
  _, model, params, images, ids, mask = tiny

  def fused(module):
    seq = module.embed_image(images)
    return module.bert.encode(module.bert.embed(ids), mask, seq, hook_cross=True, cls_only=True)

  with pytest.raises(ValueError, match="hook_cross needs every layer over all positions"):
    model.apply({"params": params}, method=fused)
