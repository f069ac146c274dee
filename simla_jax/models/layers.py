"""Blocks the ViT and the BERT share: attention, MLP, LayerNorm and initialisers.

Every parameter carries logical axis names (configs/common.py AXIS_RULES):
  embed  model width          mlp   feed-forward hidden      heads  attention heads
  kv     per-head width       vocab vocabularies / codebook  norm   LayerNorm scale and bias
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Init = Callable[..., jax.Array]

# Additive attention bias of masked keys, as the official BERT builds it: (1 - mask) * -10000.
MASK_BIAS = -10000.0


def partitioned(init: Init, names: Sequence[str | None]) -> Init:
  return nn.with_logical_partitioning(init, tuple(names))


def torch_linear_kernel_init() -> Init:
  """PyTorch's default `nn.Linear` weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> Init:
  """PyTorch's default `nn.Linear` bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  # Two-pass variance, as torch computes it: the one-pass form loses digits at eps 1e-12.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False,
                      scale_init=partitioned(nn.initializers.ones, ("norm",)),
                      bias_init=partitioned(nn.initializers.zeros, ("norm",)),
                      name=name)


# `nn.remat` policies by name (config.model.remat_policy): what a rematerialised layer keeps
# from its forward pass for the backward pass; everything else is recomputed.
#   nothing_saveable                  only the layer inputs (least memory, one extra forward)
#   dots_with_no_batch_dims_saveable  also the weight matmuls (projections, MLP); attention
#                                     scores/probabilities, GELU and LayerNorm recomputed
#   dots_saveable                     every matmul output, attention scores included
#   everything_saveable               nothing recomputed (the same as no remat)
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable",
                  "everything_saveable")


def remat_policy(name: str) -> Callable[..., bool]:
  """The `jax.checkpoint_policies` entry of one of REMAT_POLICIES."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy {name!r}: expected one of {', '.join(REMAT_POLICIES)}")
  return getattr(jax.checkpoint_policies, name)


def mask_to_bias(mask: jax.Array) -> jax.Array:
  """Key padding mask (b, k) of 1 = attend / 0 = ignore -> additive bias (b, 1, 1, k)."""
  return ((1.0 - mask.astype(jnp.float32)) * MASK_BIAS)[:, None, None, :]


# What `jax.nn.dot_product_attention(implementation="cudnn")` accepts, in jax 0.10.2 and
# 0.11.x alike (jax/_src/cudnn/fused_attention_stablehlo.py: check_layout and
# check_is_flash_attention):
#   * query, key, value of one dtype, float16 or bfloat16, layout (b, t, h, d) / (b, s, h, d);
#   * a head width that is a multiple of 8 and at most 256 (128 before Hopper);
#   * a bias or boolean mask only of the full (., ., t, s) shape: a (b, 1, 1, s) padding bias
#     is refused ("Bias must have same seq length as QKV, got 1 and s");
#   * under a gradient, even t and s whatever the mask (its training check always sees a bias:
#     the placeholder it passes for none), so the ViT's 1 + 16 x 16 tokens are refused;
#   * padding as `key_value_seq_lengths` (b,) int32: row i attends to keys [0, len_i).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256


def _pad_to_even(x: jax.Array, axis: int) -> jax.Array:
  if x.shape[axis] % 2 == 0:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, 1)
  return jnp.pad(x, pad)


def cudnn_attention_args(q: jax.Array, k: jax.Array, v: jax.Array,
                         bias: jax.Array | None = None) -> tuple[dict[str, jax.Array], int]:
  """The cuDNN kernel's arguments for the attention the einsum path computes.

  q: (b, t, h, d); k, v: (b, s, h, d), float16 or bfloat16; bias: None or the key padding
  bias (b, 1, 1, s) of `mask_to_bias` (0 = attend, MASK_BIAS = ignore).

  The padding reaches the kernel as key lengths: each row's attended keys are moved to the
  front in their order (attention does not depend on the order of its keys, so any padding
  pattern is exact, right padding being the identity) and counted. A row with no attended
  key gets its full length: under the additive -10000 bias such a row attends to every key
  as if unmasked, and so does this (up to the rounding of logit - 10000 in float32). Odd
  t or s get one more query (its output is dropped) or one more, never attended, key.

  Returns (keyword arguments of `jax.nn.dot_product_attention`: query, key, value and,
  where keys are masked or padded, key_value_seq_lengths), and t: the output is
  `dot_product_attention(**args)[:, :t]`.
  """
  if q.dtype not in CUDNN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"attention_impl 'cudnn' needs float16 or bfloat16 queries, keys and "
                     f"values (model.dtype), got {q.dtype}, {k.dtype}, {v.dtype}; "
                     f"use 'xla' or 'einsum' in float32")
  b, t, h, d = q.shape
  s = k.shape[1]
  if d % 8 or d > CUDNN_MAX_HEAD_DIM:
    raise ValueError(f"attention_impl 'cudnn' needs a head width that is a multiple of 8 and "
                     f"at most {CUDNN_MAX_HEAD_DIM}, got {d}")
  lengths = None
  if bias is not None:
    if bias.shape != (b, 1, 1, s):
      raise ValueError(f"attention_impl 'cudnn' takes a key padding bias (b, 1, 1, s) = "
                       f"{(b, 1, 1, s)} from mask_to_bias, got shape {bias.shape}")
    attend = bias[:, 0, 0, :] > MASK_BIAS / 2                             # b s
    order = jnp.argsort(~attend, axis=-1, stable=True)                     # attended first
    k = jnp.take_along_axis(k, order[:, :, None, None], axis=1)
    v = jnp.take_along_axis(v, order[:, :, None, None], axis=1)
    count = jnp.sum(attend, axis=-1, dtype=jnp.int32)
    lengths = jnp.where(count > 0, count, s).astype(jnp.int32)
  elif s % 2:
    lengths = jnp.full((b,), s, jnp.int32)
  args = dict(query=_pad_to_even(q, 1), key=_pad_to_even(k, 1), value=_pad_to_even(v, 1))
  if lengths is not None:
    args["key_value_seq_lengths"] = lengths
  return args, t


class Attention(nn.Module):
  """Multi-head attention: queries from `x`, keys and values from `kv`.

  Attributes:
    num_heads: number of heads; the head width is `features // num_heads`.
    features: width of the query/key/value projections and of the output.
    dropout_rate: dropout on the attention probabilities (BERT: 0.1, ViT: 0).
    impl: "einsum" (explicit softmax), or "xla" / "cudnn" for
      `jax.nn.dot_product_attention` when neither probabilities nor attention
      dropout are needed. "cudnn" (GPU only) needs float16 / bfloat16 compute and a
      key padding bias from `mask_to_bias` (see `cudnn_attention_args`); all three
      give the einsum path's outputs.
  """
  num_heads: int
  features: int
  dropout_rate: float = 0.0
  kernel_init: Init = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32
  impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, kv: jax.Array, bias: jax.Array | None = None, *,
               kv_index: jax.Array | None = None, deterministic: bool = True,
               return_probs: bool = False, hook: bool = False):
    """x: (b, q, d_q); kv: (b, k, d_kv); bias: additive, broadcastable to (b, h, q, k)
    ("cudnn": the key padding bias (b, 1, 1, k) of `mask_to_bias`, or None).

    `kv_index` (b,) int: `kv` is (n, k, d_kv) and row i of `x` attends to `kv[kv_index[i]]`;
    keys and values are projected once per row of `kv` and then gathered, so a batch that
    pairs each of n images with several texts projects each image once.

    `hook` (Grad-CAM): the probabilities (b, h, q, k) are sown into "intermediates/probs"
    and pass through `perturb("probs")`: given a zero "perturbations" collection, its
    gradient is theirs. Off (the default) it costs nothing.

    Returns (b, q, features), and the attention probabilities (b, h, q, k) in
    float32 when `return_probs`.
    """
    if self.features % self.num_heads:
      raise ValueError(f"attention width {self.features} is not divisible by "
                       f"{self.num_heads} heads")
    if self.impl not in ("einsum", "xla", "cudnn"):
      raise ValueError(f"attention_impl {self.impl!r}: expected einsum, xla or cudnn")
    head_dim = self.features // self.num_heads

    def project(name):
      return nn.DenseGeneral((self.num_heads, head_dim), axis=-1, dtype=self.dtype,
                             param_dtype=jnp.float32,
                             kernel_init=partitioned(self.kernel_init, ("embed", "heads", "kv")),
                             bias_init=partitioned(nn.initializers.zeros, ("heads", "kv")),
                             name=name)
    q = project("query")(x)     # b q h d
    k = project("key")(kv)      # b k h d (n k h d with kv_index)
    v = project("value")(kv)
    if kv_index is not None:
      k, v = k[kv_index], v[kv_index]
    dropout = self.dropout_rate > 0 and not deterministic
    probs = None
    if return_probs or dropout or hook or self.impl == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
      if bias is not None:
        logits = logits + bias
      probs = jax.nn.softmax(logits, axis=-1)
      if hook:
        probs = self.perturb("probs", probs)
        self.sow("intermediates", "probs", probs)
      dropped = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v)
    elif self.impl == "cudnn":
      args, queries = cudnn_attention_args(q, k, v, bias)
      out = jax.nn.dot_product_attention(**args, implementation="cudnn")[:, :queries]
    else:
      # The bias stays float32 (exactly MASK_BIAS): the xla path adds it to float32 logits.
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
    y = nn.DenseGeneral(self.features, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=partitioned(self.kernel_init, ("heads", "kv", "embed")),
                        bias_init=partitioned(nn.initializers.zeros, ("embed",)),
                        name="out")(out)
    return (y, probs) if return_probs else y


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2; (b, n, d) -> (b, n, d)."""
  hidden: int
  kernel_init: Init = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=partitioned(self.kernel_init, ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.zeros, ("mlp",)), name="fc1")(x)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=partitioned(self.kernel_init, ("mlp", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="fc2")(h)
