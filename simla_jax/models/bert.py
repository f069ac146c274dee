"""The SIMLA BERT: one set of weights used in three modes (BLIP "med" layout).

Embeddings are word + absolute position (no token types), LayerNorm (eps 1e-12),
dropout. Each post-norm layer is self-attention -> cross-attention -> FFN, where the
cross-attention runs only when keys/values are given:
  text mode         `encode(embed(ids), mask)`: self-attention only (ITC);
  multimodal mode   `encode(embed(ids), mask, kv=image_seq)`: text queries (ITM/MLM/PSL);
  image-query mode  `encode(embed(inputs_embeds=image_seq), ones, kv=embed(ids), kv_mask=mask)`:
                    image queries over non-contextual token embeddings (MIM).
Attention is bidirectional with additive padding masks.

ALBEF's split (`fusion_start` = F, set by `model.architecture = "albef"`): layers [0, F)
are a text encoder without cross-attention parameters, layers [F, num_layers) a fusion
encoder. Text mode runs layers [0, F) only (the ITC text feature is their [CLS]); a pass
with keys/values runs [0, F) as text layers and [F, num_layers) with cross-attention on
their output, as ALBEF's fusion stack reads its text encoder's output.

The layers are either unrolled (`layer_i`, one parameter subtree each) or, with
`scan_layers`, one `nn.scan` over `encoder/layer`, whose parameters carry a leading
`layers` axis: the program then holds one layer body per pass, whatever the depth.
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
               kv_bias: jax.Array | None = None, kv_index: jax.Array | None = None,
               deterministic: bool = True, return_probs: bool = False,
               queries: int | None = None, hook_cross: bool = False):
    """x: (b, l, hidden); bias: (b, 1, 1, l); kv: (b, k, d_kv); kv_bias: (b, 1, 1, k).
    With `kv_index` (b,): kv is (n, k, d_kv), row i reads kv[kv_index[i]] (see Attention).
    The signature is `nn.scan`'s (carry, *broadcast) -> (carry, per-layer output).

    `queries`: compute only the first `queries` positions (their self-attention still
    reads all l positions); the rest of the sequence is dropped. Returns
    (x (b, q, hidden), self-attention probabilities (b, heads, q, l) or None), q = l or
    `queries`. `hook_cross`: the cross-attention's `layers.Attention` hook (Grad-CAM).
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
                                        deterministic=deterministic, hook=hook_cross)
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


# Arguments of BertLayer that are Python values, static for nn.remat (argument 0 is self):
# deterministic, return_probs, queries, hook_cross.
_STATIC_ARGNUMS = (6, 7, 8, 9)


def _layer_class(remat: bool, policy: str) -> type[nn.Module]:
  if not remat:
    return BertLayer
  return nn.remat(BertLayer, static_argnums=_STATIC_ARGNUMS, policy=layers.remat_policy(policy))


def _take(index):
  """Variables of a stacked layer -> those of `index` (an int or a slice) on the `layers` axis."""
  return lambda variables: jax.tree.map(lambda a: a[index], variables)


def split_at(segments: list[tuple[int, int, bool, int | None]],
             cut: int) -> list[tuple[int, int, bool, int | None]]:
  """`layer_segments` with any run that spans `cut` split there (a one-layer run never does)."""
  out = []
  for start, stop, probs, queries in segments:
    if start < cut < stop:
      out += [(start, cut, probs, queries), (cut, stop, probs, queries)]
    else:
      out.append((start, stop, probs, queries))
  return out


def layer_segments(num_layers: int, attention_layer: int | None,
                   cls_only: bool) -> list[tuple[int, int, bool, int | None]]:
  """Splits layers [0, num_layers) into runs (start, stop, return_probs, queries) that each
  run the same way: the layer whose probabilities are wanted and the `cls_only` last layer
  (1 query) are runs of their own; the layers between them are one run each."""
  last = num_layers - 1
  cuts = {0, num_layers}
  if attention_layer is not None:
    cuts |= {attention_layer, attention_layer + 1}
  if cls_only:
    cuts.add(last)
  cuts = sorted(cuts)
  return [(a, b, a == attention_layer, 1 if cls_only and a == last else None)
          for a, b in zip(cuts[:-1], cuts[1:])]


class BertEncoder(nn.Module):
  """`num_layers` BertLayers as one `nn.scan`: parameters `layer/...` with a leading
  `layers` axis, dropout rngs split per layer, `nn.remat` inside the scanned body.

  A call runs layers [start, stop) on their slice of the stack, so a pass that treats one
  layer differently (its attention probabilities, or `queries`) runs the layers around it
  as scans of their own; a single layer runs unscanned.
  """
  num_layers: int
  hidden: int
  heads: int
  ffn: int
  dropout: float
  attention_dropout: float
  layer_norm_eps: float
  init_std: float = 0.02
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None, kv: jax.Array | None,
               kv_bias: jax.Array | None, kv_index: jax.Array | None, *, start: int, stop: int,
               deterministic: bool = True, return_probs: bool = False,
               queries: int | None = None, hook_cross: bool = False):
    """Layers [start, stop) (see `BertLayer`); probabilities and `queries` need one layer.
    `hook_cross` hooks every layer's cross-attention (stacked along `layers` when scanned)."""
    if not 0 <= start < stop <= self.num_layers:
      raise ValueError(f"BERT layers [{start}, {stop}) out of range for {self.num_layers}")
    if (return_probs or queries is not None) and stop - start != 1:
      raise ValueError("BertEncoder: return_probs / queries apply to a single layer")
    whole = (start, stop) == (0, self.num_layers)
    # One layer runs unscanned (a scan's carry cannot change shape, as `queries` does).
    single = stop - start == 1 and (not whole or queries is not None)
    if (single or not whole) and not self.has_variable("params", "layer"):
      raise ValueError("BertEncoder: initialise with all layers before running a part of them")
    layer_cls = _layer_class(self.remat, self.remat_policy)
    args = (self.hidden, self.heads, self.ffn, self.dropout, self.attention_dropout,
            self.layer_norm_eps, self.init_std, self.dtype, self.attention_impl)
    if single:
      layer = nn.map_variables(layer_cls, "params", trans_in_fn=_take(start))
      return layer(*args, name="layer")(x, bias, kv, kv_bias, kv_index, deterministic,
                                        return_probs, queries, hook_cross)
    stack = nn.scan(layer_cls,
                    variable_axes={"params": 0, "intermediates": 0, "perturbations": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * 8, length=stop - start,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                    # No broadcast variables or outputs: skip the extra trace that checks them.
                    check_constancy_invariants=False)
    if not whole:
      stack = nn.map_variables(stack, "params", trans_in_fn=_take(slice(start, stop)))
    x, probs = stack(*args, name="layer")(x, bias, kv, kv_bias, kv_index, deterministic,
                                          return_probs, queries, hook_cross)
    return x, None if probs is None else probs[0]


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
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"
  # None: SIMLA, every layer can cross-attend. F: ALBEF, layers [0, F) text-only,
  # [F, num_layers) fusion (see the module docstring).
  fusion_start: int | None = None

  def setup(self):
    if self.fusion_start is not None and not 0 < self.fusion_start < self.num_layers:
      raise ValueError(f"BERT fusion_start {self.fusion_start} must lie in (0, "
                       f"{self.num_layers}): ALBEF needs text and fusion layers")
    self.embeddings = BertEmbeddings(self.vocab_size, self.hidden, self.max_position,
                                     self.layer_norm_eps, self.dropout, self.init_std, self.dtype)
    args = (self.hidden, self.heads, self.ffn, self.dropout, self.attention_dropout,
            self.layer_norm_eps, self.init_std)
    impl = self.layer_attention_impl()
    if self.scan_layers:
      # ALBEF: the text and the fusion layers are two stacks (their parameters differ).
      text_layers = self.num_layers if self.fusion_start is None else self.fusion_start
      self.encoder = BertEncoder(text_layers, *args, remat=self.remat,
                                 remat_policy=self.remat_policy, dtype=self.dtype,
                                 attention_impl=impl)
      if self.fusion_start is not None:
        self.fusion_encoder = BertEncoder(self.num_layers - self.fusion_start, *args,
                                          remat=self.remat, remat_policy=self.remat_policy,
                                          dtype=self.dtype, attention_impl=impl)
    else:
      layer = _layer_class(self.remat, self.remat_policy)
      self.layer = [layer(*args, self.dtype, impl) for _ in range(self.num_layers)]
    self.mlm_head = MlmHead(self.hidden, self.vocab_size, self.layer_norm_eps, self.init_std,
                            self.dtype)

  def layer_attention_impl(self) -> str:
    """The layers' attention kernel (a subclass with another mask may need another)."""
    return self.attention_impl

  def embed(self, ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None, *,
            deterministic: bool = True) -> jax.Array:
    """(b, l) ids or (b, l, hidden) vectors -> non-contextual embeddings (b, l, hidden)."""
    return self.embeddings(ids, inputs_embeds, deterministic=deterministic)

  def encode(self, x: jax.Array, mask: jax.Array | None, kv: jax.Array | None = None,
             kv_mask: jax.Array | None = None, *, kv_index: jax.Array | None = None,
             deterministic: bool = True, attention_layer: int | None = None,
             cls_only: bool = False, from_layer: int = 0, hook_cross: bool = False):
    """Runs the layers over embedded queries: all of them (SIMLA; ALBEF with `kv`), or
    ALBEF's text layers [0, fusion_start) in text mode.

    Args:
      x: (b, l, hidden) output of `embed`.
      mask: (b, l) 1 = token, 0 = padding; None = all tokens.
      kv: (b, k, d) keys/values of the cross-attention; None skips it (text mode).
      kv_mask: (b, k) padding mask of `kv`; None = all valid.
      kv_index: (b,) int or None: `kv` and `kv_mask` hold n distinct rows and row i of
        `x` cross-attends to row kv_index[i]; each is projected to keys/values once.
      attention_layer: index (negative counts from the end) among the layers that run of
        the layer whose self-attention probabilities to return.
      cls_only: the last layer computes the first position only (whose attention reads
        every position): the same first row for 1/num_layers less work, when only the
        [CLS] output (ITC, ITM) or the last layer's [CLS] attention row (PSL) is used.
      from_layer: 0, or ALBEF's fusion_start: `x` is then the text layers' output and only
        the fusion layers run (ALBEF's ITM reuses its ITC pass's text output).
      hook_cross: every cross-attention sows its probabilities (b, heads, l, k) into
        "intermediates" and adds the "perturbations" collection's zeros to them, when
        the caller passes it, so their gradient can be taken (Grad-CAM,
        `simla_jax.gradcam`). Scanned layers stack both along a leading `layers` axis.
    Returns:
      (b, l, hidden), and with `attention_layer` also the probabilities (b, heads, l, l);
      with `cls_only`, (b, 1, hidden) and (b, heads, 1, l) for the last layer.
    """
    bias = None if mask is None else layers.mask_to_bias(mask)
    kv_bias = None if kv is None or kv_mask is None else layers.mask_to_bias(kv_mask)
    if kv_bias is not None and kv_index is not None:
      kv_bias = kv_bias[kv_index]
    # ALBEF: layers below `fuse_from` run without cross-attention.
    fuse_from = 0 if self.fusion_start is None else self.fusion_start
    depth = fuse_from if kv is None and fuse_from else self.num_layers
    if attention_layer is not None:
      if not -depth <= attention_layer < depth:
        raise ValueError(f"attention_layer {attention_layer} out of range for "
                         f"{depth} layers")
      attention_layer %= depth
    # Hooked maps of equal shapes from every layer, and (scanned) one scan over all of them.
    if hook_cross and (cls_only or (self.scan_layers and attention_layer is not None)):
      raise ValueError("hook_cross needs every layer over all positions (no cls_only) and, "
                       "with scan_layers, one pass over all layers (no attention_layer)")
    probs = None
    if from_layer not in (0, fuse_from):
      raise ValueError(f"BERT from_layer {from_layer}: only 0 or the fusion_start "
                       f"{self.fusion_start} can start a pass")
    segments = [s for s in split_at(layer_segments(depth, attention_layer, cls_only), fuse_from)
                if s[0] >= from_layer]
    for start, stop, want_probs, queries in segments:
      fusion = start >= fuse_from
      kv_args = (kv, kv_bias, kv_index) if fusion else (None, None, None)
      if self.scan_layers and self.fusion_start is not None and fusion:
        x, p = self.fusion_encoder(x, bias, *kv_args, start=start - fuse_from,
                                   stop=stop - fuse_from, deterministic=deterministic,
                                   return_probs=want_probs, queries=queries,
                                   hook_cross=hook_cross)
      elif self.scan_layers:
        x, p = self.encoder(x, bias, *kv_args, start=start, stop=stop,
                            deterministic=deterministic, return_probs=want_probs,
                            queries=queries, hook_cross=hook_cross)
      else:
        for layer in self.layer[start:stop]:
          x, p = layer(x, bias, *kv_args, deterministic, want_probs, queries, hook_cross)
      if want_probs:
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
