"""`cls_only` (text mode, multimodal mode, PSL attention): the last BERT layer computes the
[CLS] row alone; that row, its attention probabilities and every gradient through it equal
the full computation's, for fewer FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simla_jax import convert
from simla_jax.models import SIMLA
from simla_torch_refs import ref_config, ref_model, xla_flops


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def setup(request):
  cfg = ref_config(scan_layers=request.param)
  model, params = ref_model(cfg)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, cfg.bert.vocab_size, (3, 7)).astype(np.int32)
  mask = (np.arange(7)[None] < np.array([[7], [4], [1]])).astype(np.int32)
  image_seq = rng.standard_normal((3, 17, cfg.vit.width)).astype(np.float32)
  return cfg, model, params, (ids * mask, mask, image_seq)


def _apply(model, params, method, *args, **kw):
  return model.apply({"params": params}, *args, method=method, **kw)


def test_first_row_and_attention_equal_the_full_computation(setup):
  _, model, params, (ids, mask, image_seq) = setup
  text = _apply(model, params, "embed_text", ids, mask)
  text_cls = _apply(model, params, "embed_text", ids, mask, cls_only=True)
  assert text_cls.shape == (3, 1, text.shape[-1])
  np.testing.assert_allclose(text_cls, text[:, :1], rtol=1e-5, atol=1e-6)
  fused = _apply(model, params, "fuse", ids, mask, image_seq)
  np.testing.assert_allclose(_apply(model, params, "fuse", ids, mask, image_seq, cls_only=True),
                             fused[:, :1], rtol=1e-5, atol=1e-6)
  for layer in (-1, 0):
    seq, probs = _apply(model, params, "fuse_with_attention", ids, mask, image_seq, layer=layer)
    seq1, probs1 = _apply(model, params, "fuse_with_attention", ids, mask, image_seq,
                          layer=layer, cls_only=True)
    np.testing.assert_allclose(seq1, seq[:, :1], rtol=1e-5, atol=1e-6)
    # The last layer's probabilities keep only the [CLS] row; earlier layers' are whole.
    want = probs[:, :, :1] if layer == -1 else probs
    assert probs1.shape == want.shape
    np.testing.assert_allclose(probs1, want, rtol=1e-5, atol=1e-7)


def test_gradients_through_the_cls_row_are_unchanged(setup):
  _, model, params, (ids, mask, image_seq) = setup

  def itm_and_itc(p, cls_only):
    fused = _apply(model, p, "fuse", ids, mask, image_seq, cls_only=cls_only)
    text = _apply(model, p, "embed_text", ids, mask, cls_only=cls_only)
    return (jnp.sum(_apply(model, p, "itm_logits", fused) ** 2)
            + jnp.sum(jnp.sin(_apply(model, p, "text_feature", text))))
  grad = jax.jit(jax.grad(itm_and_itc), static_argnums=1)
  full, cls = grad(params, False), grad(params, True)
  for (path, g), h in zip(jax.tree_util.tree_leaves_with_path(full), jax.tree.leaves(cls)):
    np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(g))) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_train_mode_with_remat_and_fewer_flops(setup):
  cfg, _, params, (ids, mask, image_seq) = setup
  c = cfg.copy_and_resolve_references()
  c.remat = True
  model = SIMLA(c)

  def fuse(p, key, cls_only):
    return _apply(model, p, "fuse", ids, mask, image_seq, cls_only=cls_only,
                  deterministic=False, rngs={"dropout": key})
  out = jax.jit(fuse, static_argnums=2)(params, jax.random.key(1), True)
  assert out.shape == (3, 1, c.bert.hidden) and np.all(np.isfinite(out))

  # Counted on the unrolled layers: XLA's cost analysis counts a scan's body once.
  per_layer = SIMLA(convert.per_layer_config(c))
  per_layer_params = convert.unstack_layers(params, c)

  def flops(cls_only):
    loss = lambda p: jnp.sum(_apply(per_layer, p, "fuse", ids, mask, image_seq,
                                    cls_only=cls_only, deterministic=False,
                                    rngs={"dropout": jax.random.key(1)})[:, 0] ** 2)
    return xla_flops(jax.jit(jax.grad(loss)).lower(per_layer_params))
  # Two layers, seven text positions: most of the second layer's work goes.
  ratio = flops(True) / flops(False)
  assert ratio < 0.75, ratio
