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


class Attention(nn.Module):
  """Multi-head attention: queries from `x`, keys and values from `kv`.

  Attributes:
    num_heads: number of heads; the head width is `features // num_heads`.
    features: width of the query/key/value projections and of the output.
    dropout_rate: dropout on the attention probabilities (BERT: 0.1, ViT: 0).
    impl: "einsum" (explicit softmax), or "xla" / "cudnn" for
      `jax.nn.dot_product_attention` when neither probabilities nor attention
      dropout are needed.
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
               return_probs: bool = False):
    """x: (b, q, d_q); kv: (b, k, d_kv); bias: additive, broadcastable to (b, h, q, k).

    `kv_index` (b,) int: `kv` is (n, k, d_kv) and row i of `x` attends to `kv[kv_index[i]]`;
    keys and values are projected once per row of `kv` and then gathered, so a batch that
    pairs each of n images with several texts projects each image once.

    Returns (b, q, features), and the attention probabilities (b, h, q, k) in
    float32 when `return_probs`.
    """
    if self.features % self.num_heads:
      raise ValueError(f"attention width {self.features} is not divisible by "
                       f"{self.num_heads} heads")
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
    if return_probs or dropout or self.impl == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
      if bias is not None:
        logits = logits + bias
      probs = jax.nn.softmax(logits, axis=-1)
      dropped = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v)
    else:
      if self.impl not in ("xla", "cudnn"):
        raise ValueError(f"attention_impl {self.impl!r}: expected einsum, xla or cudnn")
      out = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias.astype(q.dtype),
          implementation=self.impl)
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
