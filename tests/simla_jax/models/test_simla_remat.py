"""`config.model.remat_policy`: each policy computes the same function and gradient as no
remat (dropout masks included), keeps what its name says, and an unknown name is refused."""

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from simla_jax.models import SIMLA, init_params, layers
from simla_torch_refs import ref_config

POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


def _model(remat: bool, policy: str | None = None) -> SIMLA:
  cfg = ref_config()
  cfg.remat = remat
  if policy is None:      # a config written before the key existed
    del cfg["remat_policy"]
  else:
    cfg.remat_policy = policy
  return SIMLA(cfg)


def _inputs(cfg):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.bert.vocab_size, (2, 5)).astype(np.int32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
  patch_mask = np.zeros((2, (cfg.image_size // cfg.patch_size) ** 2), bool)
  patch_mask[:, 3:6] = True
  return images, ids, mask, patch_mask


def _loss(model, params, inputs, vit_only=False):
  """Every encoder mode and head (or the ViT alone), train mode (dropout on, fixed key)."""
  kw = dict(deterministic=False, rngs={"dropout": jax.random.key(7)})
  if vit_only:
    images, _, _, patch_mask = inputs
    out = {"seq": model.apply({"params": params}, images, patch_mask, method="embed_image", **kw)}
  else:
    out = model.apply({"params": params}, *inputs, **kw)
  return sum(jnp.sum(jnp.sin(v.astype(jnp.float32))) for v in out.values())


def _saved(model, params, inputs, vit_only=False) -> list[tuple[int, ...]]:
  """Shapes of the residuals the backward pass of `_loss` keeps (JAX's own listing)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(lambda p: _loss(model, p, inputs, vit_only), params)
  return [tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M)]


@pytest.fixture(scope="module")
def setup():
  base = _model(False)
  params = nn.meta.unbox(init_params(base, jax.random.key(0)))
  inputs = _inputs(base.config)
  value, grads = jax.jit(jax.value_and_grad(lambda p: _loss(base, p, inputs)))(params)
  return params, inputs, float(value), grads


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_the_same_value_and_gradient(setup, policy):
  params, inputs, value, grads = setup
  model = _model(True, policy)
  got, got_grads = jax.jit(jax.value_and_grad(lambda p: _loss(model, p, inputs)))(params)
  assert abs(float(got) - value) <= 1e-5 * abs(value)
  flat, got_flat = (jax.tree_util.tree_leaves_with_path(g) for g in (grads, got_grads))
  for (path, g), (_, h) in zip(flat, got_flat):
    # Recomputation reorders float32 sums: compare on the scale of each gradient leaf
    # (attention key biases have a zero gradient in exact arithmetic: rounding noise only).
    np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(g))) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("vit_only", [True, False], ids=["vit", "all"])
def test_policies_keep_what_their_names_say(setup, vit_only):
  """Residuals kept for the backward pass: full remat < weight matmuls < all matmuls < none."""
  params, inputs, _, _ = setup
  size = lambda model: sum(int(np.prod(s)) for s in _saved(model, params, inputs, vit_only))
  sizes = [size(_model(True, p)) for p in POLICIES] + [size(_model(False))]
  assert sizes == sorted(set(sizes)), dict(zip(POLICIES + ("no remat",), sizes))


def test_a_config_without_the_key_is_full_remat_and_unknown_names_are_refused(setup):
  params, inputs, _, _ = setup
  default = _saved(_model(True), params, inputs)
  assert default == _saved(_model(True, "nothing_saveable"), params, inputs)
  assert len(default) < len(_saved(_model(False), params, inputs))
  with pytest.raises(ValueError, match="remat_policy 'dots'.*nothing_saveable"):
    _model(True, "dots").init(jax.random.key(0), *inputs)
  with pytest.raises(ValueError, match="everything_saveable"):
    layers.remat_policy("offload")
