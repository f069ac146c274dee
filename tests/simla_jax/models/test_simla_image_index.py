"""`fuse(..., image_index=)`: each image projected to cross-attention keys/values once and
gathered per text equals fusing every text with its own copy of the image, in value and in
every gradient, for fewer FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simla_jax.models import SIMLA
from simla_torch_refs import ref_config, ref_model, xla_flops


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def setup(request):
  cfg = ref_config(scan_layers=request.param)
  model, params = ref_model(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.bert.vocab_size, (6, 7)).astype(np.int32)
  mask = (np.arange(7)[None] < rng.integers(1, 8, (6, 1))).astype(np.int32)
  images = rng.standard_normal((2, 17, cfg.vit.width)).astype(np.float32)
  image_mask = (np.arange(17)[None] < np.array([[17], [9]])).astype(np.int32)
  index = np.array([0, 1, 1, 0, 1, 0], np.int32)   # 6 texts over 2 images, ITM-like
  return model, params, (ids * mask, mask, images, image_mask, index)


def _fuse(model, params, ids, mask, images, image_mask, index, gathered, cls_only=False):
  if gathered:
    return model.apply({"params": params}, ids, mask, images, image_mask, image_index=index,
                       cls_only=cls_only, method=SIMLA.fuse)
  return model.apply({"params": params}, ids, mask, images[index], image_mask[index],
                     cls_only=cls_only, method=SIMLA.fuse)


def test_gathered_keys_values_equal_per_text_images(setup):
  model, params, inputs = setup
  want = _fuse(model, params, *inputs, gathered=False)
  np.testing.assert_allclose(_fuse(model, params, *inputs, gathered=True), want,
                             rtol=1e-5, atol=1e-6)


def test_gradients_match_and_flops_fall(setup):
  model, params, (ids, mask, images, image_mask, index) = setup

  def loss(p, imgs, gathered):
    fused = _fuse(model, p, ids, mask, imgs, image_mask, index, gathered, cls_only=True)
    return jnp.sum(jnp.sin(model.apply({"params": p}, fused, method=SIMLA.itm_logits)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  (gp_full, gi_full), (gp, gi) = grad(params, images, False), grad(params, images, True)
  np.testing.assert_allclose(gi, gi_full, rtol=1e-4, atol=1e-6)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(gp_full), jax.tree.leaves(gp)):
    np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(g))) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))

  assert (xla_flops(grad.lower(params, images, True))
          < xla_flops(grad.lower(params, images, False)))
