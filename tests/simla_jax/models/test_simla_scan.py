"""`config.model.scan_layers`: the ViT blocks and BERT layers as one `nn.scan` each compute the
same function and gradients as the unrolled layers on the same (stacked) weights, keep
per-layer dropout and the stochastic-depth ramp, and `convert.stack_layers` /
`unstack_layers` move parameters between the two layouts."""

import contextlib
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from simla_jax import convert
from simla_jax.models import SIMLA, init_params
from simla_torch_refs import ref_config, ref_model


def _scan_config(cfg, **changes):
  c = cfg.copy_and_resolve_references()
  c.scan_layers = True
  c.update(changes)
  return c


def _inputs(cfg, rng):
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.bert.vocab_size, (2, 6)).astype(np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
  patch_mask = np.zeros((2, (cfg.image_size // cfg.patch_size) ** 2), bool)
  patch_mask[:, 2:5] = True
  return images, ids * mask, mask, patch_mask


@pytest.fixture(scope="module")
def setup():
  cfg = ref_config(bert_layers=3)
  unrolled, params = ref_model(cfg)
  return cfg, unrolled, params, _inputs(cfg, np.random.default_rng(0))


def test_stack_and_unstack_are_inverse_and_match_the_scanned_init(setup):
  cfg, _, params, _ = setup
  scan_cfg = _scan_config(cfg)
  _, scanned_init = ref_model(scan_cfg)
  stacked = convert.stack_layers(params, scan_cfg)
  shapes = lambda t: jax.tree.map(np.shape, t)
  assert shapes(stacked) == shapes(scanned_init)
  assert shapes(stacked)["bert"]["encoder"]["layer"]["mlp"]["fc1"]["kernel"] == (
      3, cfg.bert.hidden, cfg.bert.ffn)
  assert "blocks" in stacked["vit"] and "block_0" not in stacked["vit"]
  back = convert.unstack_layers(stacked, scan_cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Without scan_layers both are the identity.
  assert convert.stack_layers(params, cfg) is params
  assert convert.unstack_layers(params, cfg) is params


def test_stack_and_unstack_name_what_does_not_fit(setup):
  cfg, _, params, _ = setup
  scan_cfg = _scan_config(cfg)
  short = {**params, "bert": {k: v for k, v in params["bert"].items() if k != "layer_2"}}
  with pytest.raises(convert.CheckpointError, match="bert has no layer_2.*bert.layers = 3"):
    convert.stack_layers(short, scan_cfg)
  long = {**params, "vit": {**params["vit"], "block_2": params["vit"]["block_0"]}}
  with pytest.raises(convert.CheckpointError, match="vit has block_2 beyond config vit.depth"):
    convert.stack_layers(long, scan_cfg)
  deeper = _scan_config(cfg)
  deeper.bert.layers = 4
  stacked = convert.stack_layers(params, scan_cfg)
  with pytest.raises(convert.CheckpointError,
                     match=r"bert/encoder/layer/.*shape \(3, .*leading axis of bert.layers = 4"):
    convert.unstack_layers(stacked, deeper)


def _outputs(model, p, inputs, attention_layer):
  """Every encoder mode and head, plus the PSL pass (one layer's probabilities, [CLS] only)."""
  images, ids, mask, patch_mask = inputs
  out = model.apply({"params": p}, images, ids, mask, patch_mask)
  seq, probs = model.apply({"params": p}, ids, mask, out["image_seq"], layer=attention_layer,
                           cls_only=True, method="fuse_with_attention")
  return {**out, "psl_seq": seq, "psl_probs": probs}


def test_scanned_and_unrolled_give_the_same_outputs_and_gradients():
  """Dropout off; the scanned side also rematerialises its layers (policy inside the scan).
  The PSL pass (last layer's probabilities, [CLS] only) runs layers 0-1 as a scan over a
  slice of the stack and layer 2 alone."""
  cfg = ref_config(bert_layers=3)
  unrolled, params = ref_model(cfg)
  inputs, attention_layer = _inputs(cfg, np.random.default_rng(1)), -1
  scan_cfg = _scan_config(cfg, remat=True, remat_policy="dots_with_no_batch_dims_saveable")
  scanned, stacked = SIMLA(scan_cfg), convert.stack_layers(params, scan_cfg)

  def loss(model, p):
    out = _outputs(model, p, inputs, attention_layer)
    return sum(jnp.sum(jnp.sin(v)) for v in out.values()), out
  grad = lambda model: jax.jit(jax.grad(lambda p: loss(model, p), has_aux=True))
  g_unrolled, out_unrolled = grad(unrolled)(params)
  g_scanned, out_scanned = grad(scanned)(stacked)
  for k, want in out_unrolled.items():
    np.testing.assert_allclose(out_scanned[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
  g_scanned = convert.unstack_layers(jax.device_get(g_scanned), scan_cfg)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(g_unrolled),
                          jax.tree.leaves(g_scanned)):
    np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(g))) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_dropout_masks_differ_from_layer_to_layer(setup):
  cfg, _, params, (_, ids, _, _) = setup
  scan_cfg = _scan_config(cfg)
  model = SIMLA(scan_cfg)
  mask = np.ones_like(ids)   # no padded keys: a zero probability is a dropped one
  _, state = model.apply({"params": convert.stack_layers(params, scan_cfg)}, ids, mask,
                         method="embed_text", deterministic=False,
                         rngs={"dropout": jax.random.key(3)},
                         capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout),
                         mutable=["intermediates"])
  (probs,) = state["intermediates"]["bert"]["encoder"]["layer"]["attention"]["Dropout_0"][
      "__call__"]
  dropped = np.asarray(probs) == 0          # (layers, b, heads, q, k)
  assert dropped.shape[0] == 3 and all(dropped[i].any() for i in range(3))
  assert all(not np.array_equal(dropped[i], dropped[j]) for i, j in ((0, 1), (0, 2), (1, 2)))


def test_stochastic_depth_ramp_under_scan(setup):
  """Ramp 0 -> 1 over two blocks: block 0 always runs, block 1 is always dropped, so a train
  pass equals the deterministic one-block ViT on block 0's weights."""
  cfg, _, params, (images, *_) = setup
  scan_cfg = _scan_config(cfg)
  scan_cfg.vit.drop_path = 1.0
  one = cfg.copy_and_resolve_references()
  one.vit.depth = 1
  one_params = {**params, "vit": {k: v for k, v in params["vit"].items() if k != "block_1"}}
  train = SIMLA(scan_cfg).apply({"params": convert.stack_layers(params, scan_cfg)}, images,
                                method="embed_image", deterministic=False,
                                rngs={"dropout": jax.random.key(0)})
  want = SIMLA(one).apply({"params": one_params}, images, method="embed_image")
  np.testing.assert_allclose(train, want, rtol=1e-5, atol=1e-6)


def _saved_size(model, params, inputs) -> int:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(
        lambda p: sum(jnp.sum(v) for v in model.apply({"params": p}, *inputs).values()), params)
  return sum(int(np.prod([int(d) for d in dims.split(",") if d]))
             for dims in re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M))


def test_remat_inside_the_scan_keeps_less(setup):
  cfg, _, params, inputs = setup
  sizes = {}
  for remat in (False, True):
    c = _scan_config(cfg, remat=remat)
    sizes[remat] = _saved_size(SIMLA(c), convert.stack_layers(params, c), inputs)
  assert sizes[True] < sizes[False], sizes


def test_a_partial_stack_needs_initialised_layers(setup):
  cfg, *_ = setup
  model = SIMLA(_scan_config(cfg))
  ids, mask = np.ones((1, 4), np.int32), np.ones((1, 4), np.int32)
  with pytest.raises(ValueError, match="initialise with all layers"):
    model.init(jax.random.key(0), ids, mask, method="embed_text", cls_only=True)


def test_init_params_scanned_are_boxed_with_a_layers_axis(setup):
  cfg, *_ = setup
  boxed = init_params(SIMLA(_scan_config(cfg)), jax.random.key(0))
  spec = nn.get_partition_spec(boxed)
  assert spec["bert"]["encoder"]["layer"]["attention"]["query"]["kernel"] == (
      jax.sharding.PartitionSpec("layers", "embed", "heads", "kv"))
  assert spec["vit"]["blocks"]["mlp"]["fc1"]["kernel"] == (
      jax.sharding.PartitionSpec("layers", "embed", "mlp"))
