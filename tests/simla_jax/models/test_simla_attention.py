"""Every attention implementation computes the einsum path's attention.

The cuDNN kernel cannot run on a CPU. What can: the arguments `cudnn_attention_args` builds
are checked against the kernel's own shape/dtype rules (jax's `check_layout` and
`check_is_flash_attention`, a private module of jax 0.10.2 and 0.11.x alike), the whole
cuDNN path is traced with a gradient up to lowering, and those exact arguments are computed
by the `xla` implementation, which must reproduce the einsum path.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simla_jax.models import SIMLA, layers
from simla_torch_refs import ref_config

fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo",
                         reason="jax's cuDNN attention module moved")

WIDTH, HEADS = 32, 4          # head width 8: the smallest the kernel takes
# Weights of std 0.2 on unit inputs: logits of std ~1 and outputs of size ~1 (BERT's 0.02
# would make every output ~0.01 and any tolerance vacuous).
INIT = nn.initializers.normal(0.2)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}   # of the largest output


def _max_rel_err(out, ref):
  return float(np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref)))


def _right_padded(lengths, n):
  return (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def _case(name, rng):
  """(x (b, q, d), kv, key padding mask or None, kv_index or None) of one attention use."""
  if name == "text":            # BERT self-attention: odd length, one row of only [CLS]
    x = rng.standard_normal((3, 7, WIDTH))
    return x, x, _right_padded([7, 4, 1], 7), None
  if name == "cross":           # text queries, padded keys; one row padded on the left
    mask = _right_padded([9, 5, 2], 9)
    mask[2] = mask[2][::-1]
    return rng.standard_normal((3, 5, WIDTH)), rng.standard_normal((3, 9, 24)), mask, None
  if name == "vit":             # no mask, 1 + 4 x 4 tokens
    x = rng.standard_normal((2, 17, WIDTH))
    return x, x, None, None
  if name == "kv_index":        # 2 images' keys/values gathered for 4 texts
    mask = _right_padded([9, 6], 9)
    index = np.array([0, 1, 1, 0])
    return rng.standard_normal((4, 5, WIDTH)), rng.standard_normal((2, 9, 24)), mask, index
  raise ValueError(name)


CASES = ("text", "cross", "vit", "kv_index")


def _kernel_check(query, key, value, bias=None, key_value_seq_lengths=None):
  """The checks `jax.nn.dot_product_attention(implementation="cudnn")` applies to its
  arguments before the kernel, in training (the stricter case)."""
  layout = fa.AttentionLayout.BTNH
  b, t = query.shape[:2]
  q_seqlen = None if key_value_seq_lengths is None else jnp.full((b,), t, jnp.int32)
  fa.check_layout(query, key, value, bias, q_seqlen, key_value_seq_lengths, None, None,
                  None, None, layout)
  fa.check_is_flash_attention(query, key, value, layout.value, 90800, True, True)


@pytest.fixture
def cudnn_through_xla(monkeypatch):
  """Attention(impl="cudnn") runs: its kernel arguments, checked, computed by `xla`."""
  real = jax.nn.dot_product_attention
  calls = []

  def redirected(*args, implementation=None, **kwargs):
    if implementation == "cudnn":
      assert not args, "the cuDNN path passes keyword arguments"
      _kernel_check(**kwargs)
      calls.append({k: (v.shape, v.dtype) for k, v in kwargs.items()})
      implementation = "xla"
    return real(*args, implementation=implementation, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", redirected)
  return calls


def _attend(impl, dtype, params, x, kv, mask, kv_index):
  module = layers.Attention(HEADS, WIDTH, kernel_init=INIT, dtype=dtype, impl=impl)
  bias = None if mask is None else layers.mask_to_bias(jnp.asarray(mask))
  if bias is not None and kv_index is not None:
    bias = bias[kv_index]
  apply = jax.jit(lambda p, x, kv, bias, kv_index: module.apply(
      {"params": p}, x, kv, bias, kv_index=kv_index))
  return apply(params, jnp.asarray(x, jnp.float32), jnp.asarray(kv, jnp.float32), bias,
               kv_index)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_einsum_xla_and_cudnn_arguments_agree(case, dtype, cudnn_through_xla):
  x, kv, mask, kv_index = _case(case, np.random.default_rng(0))
  module = layers.Attention(HEADS, WIDTH, kernel_init=INIT, dtype=dtype)
  params = nn.meta.unbox(module.init(jax.random.key(1), jnp.asarray(x, jnp.float32),
                                     jnp.asarray(kv[:1], jnp.float32))["params"])
  ref = np.asarray(_attend("einsum", dtype, params, x, kv, mask, kv_index), np.float32)
  if mask is not None:          # the mask matters far beyond the tolerance
    unmasked = _attend("einsum", dtype, params, x, kv, None, kv_index)
    assert _max_rel_err(unmasked, ref) > 20 * TOL[jnp.bfloat16]
  impls = ["xla"] + (["cudnn"] if dtype == jnp.bfloat16 else [])  # cuDNN: 16-bit only
  for impl in impls:
    out = _attend(impl, dtype, params, x, kv, mask, kv_index)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _max_rel_err(out, ref) <= TOL[dtype], impl
  if dtype == jnp.bfloat16:
    assert len(cudnn_through_xla) == 1


@pytest.mark.parametrize("case", CASES)
def test_cudnn_arguments_compute_the_masked_attention_in_float32(case):
  """The layout `cudnn_attention_args` builds (keys reordered, counted, padded to even) is
  the einsum path's attention to float32 precision: only the kernel's dtype rule is waived."""
  x, kv, mask, kv_index = _case(case, np.random.default_rng(2))
  rng = np.random.default_rng(3)
  b, t, s = x.shape[0], x.shape[1], kv.shape[1]
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((b, t, HEADS, 8), (b, s, HEADS, 8), (b, s, HEADS, 8)))
  bias = None if mask is None else layers.mask_to_bias(jnp.asarray(mask))
  if bias is not None and kv_index is not None:
    bias = bias[kv_index]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  probs = jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)
  ref = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
  as16 = lambda a: a.astype(jnp.bfloat16)
  args16, queries = layers.cudnn_attention_args(as16(q), as16(k), as16(v), bias)
  # The same construction in float32: what the bfloat16 arguments hold, at full precision.
  args = _float32_layout(q, k, v, bias, args16)
  out = jax.nn.dot_product_attention(**args, implementation="xla")[:, :queries]
  assert _max_rel_err(out, np.asarray(ref)) <= 1e-6


def _float32_layout(q, k, v, bias, args16):
  """cudnn_attention_args on float32 inputs (it refuses them: the kernel does), checked to
  build exactly the bfloat16 call's layout."""
  orig = layers.CUDNN_DTYPES
  try:
    layers.CUDNN_DTYPES = (jnp.float32,)
    args, _ = layers.cudnn_attention_args(q, k, v, bias)
  finally:
    layers.CUDNN_DTYPES = orig
  assert args.keys() == args16.keys()
  for name, a in args.items():
    assert a.shape == args16[name].shape, name
    want = a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a
    np.testing.assert_array_equal(want, args16[name], err_msg=name)
  return args


def test_cudnn_arguments_have_the_kernel_shapes():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((3, 7, HEADS, 8)), jnp.bfloat16)
  kv = jnp.asarray(rng.standard_normal((3, 9, HEADS, 8)), jnp.bfloat16)
  mask = _right_padded([9, 5, 0], 9)
  mask[1] = [0, 1, 0, 1, 1, 0, 1, 0, 1]          # holes: reordered, still 5 keys
  args, queries = layers.cudnn_attention_args(q, kv, kv, layers.mask_to_bias(jnp.asarray(mask)))
  assert queries == 7
  assert args["query"].shape == (3, 8, HEADS, 8) and args["key"].shape == (3, 10, HEADS, 8)
  assert args["key_value_seq_lengths"].dtype == jnp.int32
  # Row 2 attends to nothing: like the additive bias, it attends to all 9 keys then.
  np.testing.assert_array_equal(args["key_value_seq_lengths"], [9, 5, 9])
  # The first 5 keys of row 1 are its attended keys, in order; the padding key is zero.
  np.testing.assert_array_equal(args["key"][1, :5], kv[1, np.flatnonzero(mask[1])])
  np.testing.assert_array_equal(args["key"][:, 9], 0)
  _kernel_check(**args)
  even, _ = layers.cudnn_attention_args(q[:, :6], kv[:, :8], kv[:, :8])
  assert set(even) == {"query", "key", "value"}    # nothing to mask: the plain kernel
  _kernel_check(**even)


def test_cudnn_arguments_refuse_what_the_kernel_refuses():
  q = jnp.zeros((2, 4, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match="float16 or bfloat16"):
    layers.cudnn_attention_args(q, q, q)
  odd = jnp.zeros((2, 4, 2, 12), jnp.bfloat16)
  with pytest.raises(ValueError, match="multiple of 8"):
    layers.cudnn_attention_args(odd, odd, odd)
  q = q.astype(jnp.bfloat16)
  with pytest.raises(ValueError, match=r"key padding bias \(b, 1, 1, s\)"):
    layers.cudnn_attention_args(q, q, q, jnp.zeros((2, 2, 4, 4)))


@pytest.fixture
def cudnn_traceable(monkeypatch):
  """jax's cuDNN attention traces on a CPU once a cuDNN version is reported: its shape
  rules run, the kernel is never compiled."""
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)


def test_padding_bias_as_given_is_what_cudnn_refused(cudnn_traceable):
  """The failure seen on an H200 with jax 0.11.2, reproduced on the CPU: the bias form the
  model used to pass; the arguments built now trace with a gradient."""
  q = jnp.zeros((2, 4, 2, 8), jnp.bfloat16)
  bias = layers.mask_to_bias(jnp.asarray(_right_padded([4, 2], 4)))
  with pytest.raises(ValueError, match="Bias must have same seq length as QKV"):
    jax.make_jaxpr(lambda q: jax.nn.dot_product_attention(
        q, q, q, bias=bias.astype(q.dtype), implementation="cudnn"))(q)

  def loss(q):
    args, queries = layers.cudnn_attention_args(q, q, q, bias)
    out = jax.nn.dot_product_attention(**args, implementation="cudnn")[:, :queries]
    return jnp.sum(out.astype(jnp.float32))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(q))
  assert "dot_product_attention_fwd" in jaxpr and "dot_product_attention_bwd" in jaxpr


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scan"])
def test_simla_with_cudnn_attention_traces_init_and_gradient(cudnn_traceable, monkeypatch,
                                                             scan_layers):
  """Every fused attention of the tiny SIMLA in bfloat16 (ViT of 1 + 4 tokens, padded text,
  cross-attention to the image and to the text) goes through the kernel's checks, at init
  and under a gradient: what crashed at init on the GPU."""
  real = jax.nn.dot_product_attention
  calls = []

  def spy(*args, **kwargs):
    calls.append(kwargs.get("implementation"))
    return real(*args, **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  cfg = ref_config(patch_size=16, dtype="bfloat16", attention_impl="cudnn",
                   scan_layers=scan_layers)
  model = SIMLA(cfg)
  images = jnp.zeros((2, cfg.image_size, cfg.image_size, 3))
  ids = jnp.ones((2, 5), jnp.int32)
  mask = jnp.asarray(_right_padded([5, 3], 5))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids, mask))["params"]
  # image, text, fusion (self + cross), image-query fusion (self + cross): one call per
  # layer unrolled, at least one per stack scanned.
  per_pass = 6 if scan_layers else cfg.vit.depth + 5 * cfg.bert.layers
  assert set(calls) == {"cudnn"} and len(calls) >= per_pass
  calls.clear()

  def loss(p):
    out = model.apply({"params": p}, images, ids, mask)
    return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out))
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert set(calls) == {"cudnn"} and len(calls) >= per_pass
  if not scan_layers:
    assert len(calls) == per_pass
  assert "dot_product_attention_bwd" in jaxpr


def test_a_row_without_keys_attends_to_all_as_the_additive_bias_does():
  """-10000 added to every logit of a row leaves its softmax as it was (all keys), up to the
  rounding of logit - 10000 in float32; the key lengths give that row every key."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for shape in ((2, 4, HEADS, 8), (2, 6, HEADS, 8), (2, 6, HEADS, 8)))
  bias = layers.mask_to_bias(jnp.asarray(_right_padded([3, 0], 6)))
  probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8) + bias, axis=-1)
  ref = np.asarray(jnp.einsum("bhqk,bkhd->bqhd", probs, v))
  args16, queries = layers.cudnn_attention_args(*(a.astype(jnp.bfloat16) for a in (q, k, v)),
                                                bias)
  np.testing.assert_array_equal(args16["key_value_seq_lengths"], [3, 6])
  out = jax.nn.dot_product_attention(**_float32_layout(q, k, v, bias, args16),
                                     implementation="xla")[:, :queries]
  assert _max_rel_err(out[:1], ref[:1]) <= 1e-6      # a row with keys: exact
  assert _max_rel_err(out[1:], ref[1:]) <= 1e-3      # the row without: the rounding only
