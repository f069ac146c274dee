"""The SIMLA BERT: one set of weights used in three modes (BLIP "med" layout).

Embeddings are word + absolute position (no token types), LayerNorm (eps 1e-12),
dropout. Each post-norm layer is self-attention -> cross-attention -> FFN, where the
cross-attention runs only when keys/values are given:
  text mode         `encode(embed(ids), mask)`: self-attention only (ITC);
  multimodal mode   `encode(embed(ids), mask, kv=image_seq)`: text queries (ITM/MLM/PSL);
  image-query mode  `encode(embed(inputs_embeds=image_seq), ones, kv=embed(ids), kv_mask=mask)`:
                    image queries over non-contextual token embeddings (MIM).
Attention is bidirectional with additive padding masks.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from simla_jax.models import layers

Dtype = layers.Dtype


class BertEmbeddings(nn.Module):
  """Token ids (b, l) or input vectors (b, l, d) -> LayerNorm(x + position) with dropout."""
  vocab_size: int
  hidden: int
  max_position: int
  layer_norm_eps: float
  dropout: float
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  def setup(self):
    init = nn.initializers.normal(self.init_std)
    self.word_embeddings = nn.Embed(
        self.vocab_size, self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.partitioned(init, ("vocab", "embed")))
    self.position_embeddings = nn.Embed(
        self.max_position, self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.partitioned(init, (None, "embed")))
    self.layer_norm = layers.layer_norm(self.layer_norm_eps, self.dtype)
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    if (ids is None) == (inputs_embeds is None):
      raise ValueError("BERT embeddings: give exactly one of ids and inputs_embeds")
    x = self.word_embeddings(ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    length = x.shape[1]
    if length > self.max_position:
      raise ValueError(f"BERT input of {length} positions exceeds max_position "
                       f"{self.max_position}")
    if x.shape[-1] != self.hidden:
      raise ValueError(f"BERT inputs_embeds width {x.shape[-1]} != hidden {self.hidden}")
    x = x + self.position_embeddings(jnp.arange(length))[None]
    return self.drop(self.layer_norm(x), deterministic=deterministic)

  def word_table(self) -> jax.Array:
    """The word embedding matrix (vocab, hidden); the MLM decoder is tied to it."""
    return self.word_embeddings.embedding


class BertLayer(nn.Module):
  """Self-attention -> (cross-attention if `kv` is given) -> FFN, each post-norm."""
  hidden: int
  heads: int
  ffn: int
  dropout: float
  attention_dropout: float
  layer_norm_eps: float
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None, kv: jax.Array | None = None,
               kv_bias: jax.Array | None = None, deterministic: bool = True,
               return_probs: bool = False, queries: int | None = None,
               kv_index: jax.Array | None = None):
    """x: (b, l, hidden); bias: (b, 1, 1, l); kv: (b, k, d_kv); kv_bias: (b, 1, 1, k).
    With `kv_index` (b,): kv is (n, k, d_kv), row i reads kv[kv_index[i]] (see Attention).

    `queries`: compute only the first `queries` positions (their self-attention still
    reads all l positions); the rest of the sequence is dropped. Returns
    (x (b, q, hidden), self-attention probabilities (b, heads, q, l) or None), q = l or
    `queries`.
    """
    init = nn.initializers.normal(self.init_std)

    def attention(name):
      return layers.Attention(self.heads, self.hidden, self.attention_dropout, kernel_init=init,
                              dtype=self.dtype, impl=self.attention_impl, name=name)

    def residual(h, skip, name):
      h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
      return layers.layer_norm(self.layer_norm_eps, self.dtype, name)(h + skip)

    q = x if queries is None else x[:, :queries]
    out = attention("attention")(q, x, bias, deterministic=deterministic,
                                 return_probs=return_probs)
    out, probs = out if return_probs else (out, None)
    x = residual(out, q, "attention_norm")
    if kv is not None:
      out = attention("crossattention")(x, kv.astype(self.dtype), kv_bias, kv_index=kv_index,
                                        deterministic=deterministic)
      x = residual(out, x, "crossattention_norm")
    out = layers.Mlp(self.ffn, kernel_init=init, dtype=self.dtype, name="mlp")(x)
    return residual(out, x, "output_norm"), probs


class MlmHead(nn.Module):
  """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, own bias."""
  hidden: int
  vocab_size: int
  layer_norm_eps: float
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, word_table: jax.Array) -> jax.Array:
    """x: (b, l, hidden); word_table: (vocab, hidden) -> logits (b, l, vocab)."""
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=layers.partitioned(nn.initializers.normal(self.init_std),
                                                ("embed", "mlp")),
                 bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
                 name="transform")(x)
    h = layers.layer_norm(self.layer_norm_eps, self.dtype, "layer_norm")(nn.gelu(h, approximate=False))
    bias = self.param("bias", layers.partitioned(nn.initializers.zeros, ("vocab",)),
                      (self.vocab_size,), jnp.float32)
    return jnp.einsum("bld,vd->blv", h, word_table.astype(self.dtype)) + bias.astype(self.dtype)


class Bert(nn.Module):
  """The shared BERT with its MLM head. See the module docstring for the modes."""
  vocab_size: int
  hidden: int
  num_layers: int
  heads: int
  ffn: int
  max_position: int = 512
  dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  init_std: float = 0.02
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  def setup(self):
    self.embeddings = BertEmbeddings(self.vocab_size, self.hidden, self.max_position,
                                     self.layer_norm_eps, self.dropout, self.init_std, self.dtype)
    # static: deterministic, return_probs, queries (argument 0 is self).
    layer = (nn.remat(BertLayer, static_argnums=(5, 6, 7),
                      policy=layers.remat_policy(self.remat_policy))
             if self.remat else BertLayer)
    self.layer = [layer(self.hidden, self.heads, self.ffn, self.dropout, self.attention_dropout,
                        self.layer_norm_eps, self.init_std, self.dtype, self.attention_impl)
                  for _ in range(self.num_layers)]
    self.mlm_head = MlmHead(self.hidden, self.vocab_size, self.layer_norm_eps, self.init_std,
                            self.dtype)

  def embed(self, ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None, *,
            deterministic: bool = True) -> jax.Array:
    """(b, l) ids or (b, l, hidden) vectors -> non-contextual embeddings (b, l, hidden)."""
    return self.embeddings(ids, inputs_embeds, deterministic=deterministic)

  def encode(self, x: jax.Array, mask: jax.Array | None, kv: jax.Array | None = None,
             kv_mask: jax.Array | None = None, *, kv_index: jax.Array | None = None,
             deterministic: bool = True, attention_layer: int | None = None,
             cls_only: bool = False):
    """Runs all layers over embedded queries.

    Args:
      x: (b, l, hidden) output of `embed`.
      mask: (b, l) 1 = token, 0 = padding; None = all tokens.
      kv: (b, k, d) keys/values of the cross-attention; None skips it (text mode).
      kv_mask: (b, k) padding mask of `kv`; None = all valid.
      kv_index: (b,) int or None: `kv` and `kv_mask` hold n distinct rows and row i of
        `x` cross-attends to row kv_index[i]; each is projected to keys/values once.
      attention_layer: index (negative counts from the end) of the layer whose
        self-attention probabilities to return.
      cls_only: the last layer computes the first position only (whose attention reads
        every position): the same first row for 1/num_layers less work, when only the
        [CLS] output (ITC, ITM) or the last layer's [CLS] attention row (PSL) is used.
    Returns:
      (b, l, hidden), and with `attention_layer` also the probabilities (b, heads, l, l);
      with `cls_only`, (b, 1, hidden) and (b, heads, 1, l) for the last layer.
    """
    bias = None if mask is None else layers.mask_to_bias(mask)
    kv_bias = None if kv is None or kv_mask is None else layers.mask_to_bias(kv_mask)
    if kv_bias is not None and kv_index is not None:
      kv_bias = kv_bias[kv_index]
    if attention_layer is not None:
      if not -self.num_layers <= attention_layer < self.num_layers:
        raise ValueError(f"attention_layer {attention_layer} out of range for "
                         f"{self.num_layers} layers")
      attention_layer %= self.num_layers
    probs = None
    last = self.num_layers - 1
    for i, layer in enumerate(self.layer):
      x, p = layer(x, bias, kv, kv_bias, deterministic, i == attention_layer,
                   1 if cls_only and i == last else None, kv_index)
      if i == attention_layer:
        probs = p
    return x if attention_layer is None else (x, probs)

  def mlm_logits(self, seq: jax.Array) -> jax.Array:
    """(b, l, hidden) -> (b, l, vocab)."""
    return self.mlm_head(seq, self.embeddings.word_table())

  def __call__(self, ids: jax.Array, mask: jax.Array, kv: jax.Array | None = None,
               kv_mask: jax.Array | None = None, *, kv_index: jax.Array | None = None,
               deterministic: bool = True, cls_only: bool = False) -> jax.Array:
    """Text mode without `kv`, multimodal mode with it: (b, l) ids -> (b, l, hidden)
    ((b, 1, hidden) with `cls_only`, see `encode`)."""
    x = self.embed(ids, deterministic=deterministic)
    return self.encode(x, mask, kv, kv_mask, kv_index=kv_index, deterministic=deterministic,
                       cls_only=cls_only)
