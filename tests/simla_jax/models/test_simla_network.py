"""SIMLA as a whole: parameter counts of the official sizes, logical axis names on every
parameter, one init creating every head, momentum copies, queues and the temperature."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import AXIS_RULES
from configs.simla_model import model_config
from simla_jax.models import (MOMENTUM_MODULES, SIMLA, abstract_params, clamp_temperature,
                              count_params, dummy_inputs, ema_update, init_momentum, init_params,
                              init_queues)
from simla_torch_refs import ref_config
from train_jax import sharding


def test_official_size_parameter_count():
  """specs/simla.md §7: 238,264,183 trainable parameters of the official pretraining model."""
  abstract = abstract_params(model_config("base"))     # jax.eval_shape: nothing allocated
  per_module = {k: count_params(v) for k, v in abstract.items()}
  assert per_module == {"vit": 85_845_504, "bert": 137_879_610, "mim_head": 6_299_648,
                        "concept_head": 7_844_154, "vision_proj": 196_864,
                        "text_proj": 196_864, "itm_head": 1_538, "temp": 1}
  assert count_params(abstract) == 238_264_183
  # With the momentum copies of the six `model_pairs` modules (no itm_head, no temp).
  assert count_params(abstract) + count_params(init_momentum(abstract)) == 476_526_827


@pytest.mark.parametrize("size,count", [("tiny", 1_003_267), ("small", 48_442_615)])
def test_reference_size_parameter_counts(size, count):
  """The tiny and small sizes are the reference-measurement configs of specs/simla.md §7."""
  assert count_params(abstract_params(model_config(size))) == count


def test_one_init_creates_every_parameter_with_logical_names():
  cfg = model_config("tiny")
  boxed = jax.eval_shape(lambda r: init_params(SIMLA(cfg), r), jax.random.key(0))
  assert sorted(boxed) == sorted(["vit", "bert", "vision_proj", "text_proj", "itm_head",
                                  "mim_head", "concept_head", "temp"])
  assert "mask_token" in boxed["vit"] and "mlm_head" in boxed["bert"]
  assert all("crossattention" in boxed["bert"][f"layer_{i}"] for i in range(cfg.bert.layers))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  unnamed = [x for x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
  assert not unnamed
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
  sharding.check_rules(boxed, AXIS_RULES)
  names = sharding.logical_names(boxed)
  assert {"embed", "mlp", "heads", "kv", "vocab", "norm"} <= names


def test_forward_shapes_and_dtype():
  cfg = model_config("tiny")
  cfg.dtype = "bfloat16"
  model = SIMLA(cfg)
  images, ids, mask = dummy_inputs(cfg, batch=2, text_len=5)
  patch_mask = np.zeros((2, 4), bool)
  patch_mask[:, 1] = True
  params = nn.meta.unbox(jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))   # params stay float32
  out = jax.eval_shape(lambda p: model.apply({"params": p}, images, ids, mask, patch_mask),
                       params)
  n, v, e = 4, cfg.bert.vocab_size, cfg.embed_dim
  want = {"image_seq": (2, 1 + n, 64), "text_seq": (2, 5, 64), "fused": (2, 5, 64),
          "query": (2, 1 + n, 64), "image_feat": (2, e), "text_feat": (2, e),
          "itm_logits": (2, 2), "mlm_logits": (2, 5, v), "mim_logits": (2, n, cfg.codebook_size),
          "concept_logits": (2, v), "temp": ()}
  assert {k: x.shape for k, x in out.items()} == want
  assert out["fused"].dtype == jnp.bfloat16


def test_momentum_ema_and_queues():
  cfg = ref_config()
  params = nn.meta.unbox(init_params(SIMLA(cfg), jax.random.key(0)))
  params_m = init_momentum(params)
  assert sorted(params_m) == sorted(MOMENTUM_MODULES)
  shifted = jax.tree.map(lambda x: x + 1.0, params)
  updated = jax.jit(ema_update)(params_m, shifted, cfg.momentum)
  for m, p, u in zip(jax.tree.leaves(params_m), jax.tree.leaves({k: shifted[k] for k in params_m}),
                     jax.tree.leaves(updated)):
    np.testing.assert_allclose(u, 0.995 * m + 0.005 * p, rtol=1e-6, atol=1e-6)
  # The momentum tree runs every method it has weights for.
  images, ids, mask = dummy_inputs(cfg, batch=1)
  seq = SIMLA(cfg).apply({"params": params_m}, images, method="embed_image")
  assert seq.shape == (1, 1 + (cfg.image_size // cfg.patch_size) ** 2, cfg.vit.width)
  queues = init_queues(jax.random.key(1), 64, cfg.embed_dim)
  assert queues["image_queue"].shape == queues["text_queue"].shape == (64, cfg.embed_dim)
  np.testing.assert_allclose(jnp.linalg.norm(queues["text_queue"], axis=-1), 1.0, rtol=1e-5)
  assert not np.allclose(queues["image_queue"], queues["text_queue"])
  assert int(queues["queue_ptr"]) == 0


def test_temperature_is_clamped():
  cfg = model_config("tiny")
  model = SIMLA(cfg)
  for stored, want in ((0.07, 0.07), (1.3, 0.5), (-0.2, 0.001)):
    params = {"temp": jnp.float32(stored)}
    assert float(model.apply({"params": params}, method="temperature")) == pytest.approx(want)
    assert float(clamp_temperature(params, cfg)["temp"]) == pytest.approx(want)
