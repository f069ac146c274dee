"""The SIMLA ViT against Hugging Face ViTModel (same block math as timm / DeiT), with the
blocks unrolled and scanned (`model.scan_layers`)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from simla_jax import convert
from simla_jax.models import SIMLA, init_params
from simla_jax.models import vit as vit_lib
from simla_torch_refs import hf_vit, ref_config, rel_err, torch_images, vit_to_timm

TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def vit_setup(request):
  cfg = ref_config(scan_layers=request.param)
  model = SIMLA(cfg)
  hf = hf_vit(cfg, seed=3)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  params = convert.load_vit_checkpoint(vit_to_timm(hf), cfg, params)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  n = (cfg.image_size // cfg.patch_size) ** 2
  patch_mask = rng.random((2, n)) < 0.4
  return cfg, model, hf, params, images, patch_mask


def test_vit_matches_hf(vit_setup):
  cfg, model, hf, params, images, _ = vit_setup
  ours = jax.jit(lambda p, x: model.apply({"params": p}, x, method="embed_image"))(params, images)
  with torch.no_grad():
    ref = hf(pixel_values=torch_images(images)).last_hidden_state.numpy()
  assert ours.shape == ref.shape == (2, 1 + (cfg.image_size // cfg.patch_size) ** 2, cfg.vit.width)
  err = rel_err(ours, ref)
  print(f"ViT parity: max rel err {err:.2e}")
  assert err < TOL


def test_vit_mask_token_matches_hf(vit_setup):
  _, model, hf, params, images, patch_mask = vit_setup
  assert patch_mask.any() and not patch_mask.all()
  ours = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, method="embed_image"))(
      params, images, patch_mask)
  with torch.no_grad():
    ref = hf(pixel_values=torch_images(images),
             bool_masked_pos=torch.from_numpy(patch_mask)).last_hidden_state.numpy()
  err = rel_err(ours, ref)
  print(f"ViT (masked patches) parity: max rel err {err:.2e}")
  assert err < TOL
  unmasked = model.apply({"params": params}, images, method="embed_image")
  assert rel_err(ours, unmasked) > 1e-2   # the mask token changes the output


def test_patch_mask_needs_mask_token(vit_setup):
  cfg, _, _, _, images, patch_mask = vit_setup
  cfg = cfg.copy_and_resolve_references()
  cfg.use_mask_token = False
  model = SIMLA(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  assert "mask_token" not in params["vit"]
  with pytest.raises(ValueError, match="mask_token"):
    model.apply({"params": params}, images, patch_mask, method="embed_image")


@pytest.mark.parametrize("g_in,g_out", [(14, 16), (6, 4), (3, 3)])
def test_interpolate_pos_embed_matches_torch_bicubic(g_in, g_out):
  rng = np.random.default_rng(g_in)
  pos = rng.standard_normal((1, 1 + g_in * g_in, 8)).astype(np.float32)
  ours = vit_lib.interpolate_pos_embed(pos, g_out * g_out)
  grid = torch.from_numpy(pos[:, 1:]).reshape(1, g_in, g_in, 8).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(g_out, g_out), mode="bicubic",
                                        align_corners=False)
  ref = np.concatenate([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()], axis=1)
  assert ours.shape == (1, 1 + g_out * g_out, 8)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
  x = np.ones((4000, 3, 2), np.float32)
  y = np.asarray(vit_lib.drop_path(x, 0.25, False, jax.random.key(0)))
  per_sample = y.reshape(4000, -1)
  assert set(np.unique(per_sample)) <= {0.0, np.float32(1 / 0.75)}
  assert np.all(per_sample.min(1) == per_sample.max(1))    # one decision per sample
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
  assert abs(y.mean() - 1.0) < 0.05
  np.testing.assert_array_equal(vit_lib.drop_path(x, 0.25, True, None), x)
