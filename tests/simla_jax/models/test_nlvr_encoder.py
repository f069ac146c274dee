"""The NLVR2 two-image BERT: layer copies, shared cross-attention key / value, image order."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simla_jax.models import bert as bert_lib
from simla_jax.models import nlvr_encoder as ne

L, HIDDEN, WIDTH = 3, 16, 8


def test_layer_sources_follow_the_official_key_remap():
  # Pretrain_NLVR.py: layers 0-5 kept, layer j >= 6 copied to 6 + 2(j-6) and 7 + 2(j-6).
  sources = ne.layer_sources(12, 6)
  assert len(sources) == 18
  assert sources == (0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11)
  assert ne.layer_sources(3, ne.default_duplicate_from(3)) == (0, 1, 1, 2, 2)
  assert [ne.image_of_layer(i) for i in range(5)] == [0, 1, 0, 1, 0]
  with pytest.raises(ValueError, match="duplicate_from"):
    ne.layer_sources(3, 4)


@functools.lru_cache(maxsize=None)
def _pretrained():
  """A per-layer pretrained BERT (embeddings, layer_0..layer_{L-1}) with distinct layers."""
  bert = bert_lib.Bert(vocab_size=20, hidden=HIDDEN, num_layers=L, heads=2, ffn=32)
  ids = jnp.zeros((1, 3), jnp.int32)
  params = jax.jit(lambda k: nn.meta.unbox(bert.init(
      k, ids, jnp.ones((1, 3), jnp.int32), jnp.zeros((1, 2, WIDTH)))["params"]))(
          jax.random.key(0))
  # Non-zero biases everywhere, so a wrong copy cannot hide behind equal zero inits.
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda a: np.asarray(a) + 0.05 * rng.normal(size=a.shape).astype(np.float32),
                      params)


def _encoder(**kw):
  return ne.NlvrBert(vocab_size=20, hidden=HIDDEN, num_layers=L, heads=2, ffn=32,
                     duplicate_from=1, **kw)


def _inputs():
  ids = jnp.array([[1, 5, 7, 0], [2, 3, 0, 0]])
  mask = (ids > 0).astype(jnp.int32).at[:, 0].set(1)
  i0 = jax.random.normal(jax.random.key(2), (2, 5, WIDTH))
  i1 = jax.random.normal(jax.random.key(3), (2, 5, WIDTH))
  return ids, mask, i0, i1


def test_converted_layers_are_the_pretrained_ones_and_kv_is_one_array_per_pair():
  pre = _pretrained()
  p = ne.from_pretrained_bert(pre, L, 1)
  sources = ne.layer_sources(L, 1)
  assert "key" not in p["layer"]["crossattention"] and "value" not in p["layer"]["crossattention"]
  assert p["cross_kv"]["key"]["kernel"].shape[0] == L      # one key / value per source layer
  for i, s in enumerate(sources):
    want = dict(pre[f"layer_{s}"])
    want["crossattention"] = {k: v for k, v in want["crossattention"].items()
                              if k not in ("key", "value")}
    got = jax.tree.map(lambda a, i=i: a[i], p["layer"])
    jax.tree.map(np.testing.assert_array_equal, got, want)
  for j in range(L):
    for k in ("key", "value"):
      jax.tree.map(np.testing.assert_array_equal,
                   jax.tree.map(lambda a, j=j: a[j], p["cross_kv"][k]),
                   pre[f"layer_{j}"]["crossattention"][k])
  jax.tree.map(np.testing.assert_array_equal, p["embeddings"], pre["embeddings"])


def test_forward_is_the_pretrained_layers_in_order_each_on_image_i_mod_2():
  pre = _pretrained()
  enc = _encoder()
  ids, mask, i0, i1 = _inputs()
  apply = jax.jit(enc.apply)
  got = apply(ne.from_pretrained_bert(pre, L, 1), ids, mask, i0, i1)
  # Reference: the pretrained layers (0, 1, 1, 2, 2) run one after another, layer i on image i % 2.
  layer, images = enc.layer(), (i0, i1)

  @jax.jit
  def reference(pre):
    x = enc.embeddings().apply({"params": pre["embeddings"]}, ids)
    bias = ne.layers.mask_to_bias(mask)
    for i, s in enumerate(ne.layer_sources(L, 1)):
      x, _ = layer.apply({"params": pre[f"layer_{s}"]}, x, bias, images[i % 2])
    return x
  np.testing.assert_allclose(got, reference(pre), atol=1e-5)
  # Swapping the images is a different function (each layer reads its own image).
  assert not np.allclose(got, apply(ne.from_pretrained_bert(pre, L, 1), ids, mask, i1, i0),
                         atol=1e-3)


def test_one_kept_layer_reads_only_the_left_image():
  enc = ne.NlvrBert(vocab_size=20, hidden=HIDDEN, num_layers=1, heads=2, ffn=32,
                    duplicate_from=1)
  p = jax.jit(lambda k: nn.meta.unbox(enc.init(k, WIDTH)))(jax.random.key(0))
  ids, mask, i0, i1 = _inputs()
  apply = jax.jit(enc.apply)
  a = apply(p, ids, mask, i0, i1)
  np.testing.assert_array_equal(a, apply(p, ids, mask, i0, 3 * i1 + 1))
  assert not np.allclose(a, apply(p, ids, mask, 3 * i0 + 1, i1), atol=1e-3)


def test_shared_kv_gradient_sums_both_layers_of_the_pair():
  enc = _encoder()
  p = ne.from_pretrained_bert(_pretrained(), L, 1)
  ids, mask, i0, i1 = _inputs()
  g = jax.jit(jax.grad(lambda p: jnp.sum(enc.apply(p, ids, mask, i0, i1) ** 2)))(p)
  g = g["cross_kv"]["key"]["kernel"]          # (L, width, heads, kv)

  def loss_split(k_a, k_b):
    """The same network with layer 1 reading key kernel k_a and layer 2 (its copy) k_b."""
    layer, images = enc.layer(), (i0, i1)
    x = enc.embeddings().apply({"params": p["embeddings"]}, ids)
    bias = ne.layers.mask_to_bias(mask)
    for i, s in enumerate(enc.sources):
      lp = jax.tree.map(lambda a, i=i: a[i], p["layer"])
      kv = jax.tree.map(lambda a, s=s: a[s], p["cross_kv"])
      if i in (1, 2):
        kv = dict(kv, key=dict(kv["key"], kernel=k_a if i == 1 else k_b))
      lp = dict(lp, crossattention=dict(lp["crossattention"], **kv))
      x, _ = layer.apply({"params": lp}, x, bias, images[i % 2])
    return jnp.sum(x ** 2)

  kernel1 = p["cross_kv"]["key"]["kernel"][1]
  ga, gb = jax.jit(jax.grad(loss_split, argnums=(0, 1)))(kernel1, kernel1)
  assert float(jnp.abs(ga).max()) > 0 and float(jnp.abs(gb).max()) > 0
  np.testing.assert_allclose(g[1], ga + gb, rtol=1e-4, atol=1e-6)


def test_scan_and_unrolled_compute_the_same_with_and_without_dropout():
  enc = _encoder()
  p = jax.jit(lambda k: nn.meta.unbox(enc.init(k, WIDTH)))(jax.random.key(0))
  ids, mask, i0, i1 = _inputs()
  scan = dataclasses.replace(enc, scan_layers=True)

  @jax.jit
  def outputs(p):
    kw = dict(deterministic=False, rng=jax.random.key(4))
    return (enc.apply(p, ids, mask, i0, i1), scan.apply(p, ids, mask, i0, i1),
            enc.apply(p, ids, mask, i0, i1, **kw), scan.apply(p, ids, mask, i0, i1, **kw))
  plain, plain_scan, drop, drop_scan = outputs(p)
  np.testing.assert_allclose(plain, plain_scan, atol=1e-5)
  np.testing.assert_allclose(drop, drop_scan, atol=1e-5)
  assert not np.allclose(drop, plain, atol=1e-3)   # dropout was on


def test_init_is_boxed_with_a_layers_axis():
  boxed = jax.eval_shape(lambda k: _encoder().init(k, WIDTH), jax.random.key(0))
  kernel = boxed["cross_kv"]["key"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv")
  assert kernel.value.shape == (L, WIDTH, 2, HIDDEN // 2)
  assert boxed["layer"]["mlp"]["fc1"]["kernel"].value.shape[0] == 5
