"""The SIMLA network: ViT, the three-mode BERT, and the pretraining heads.

`SIMLA(config.model)` is a Linen module; every method is called through
`model.apply({"params": p}, ..., method=...)`. Dropout draws from the rng named
"dropout" when `deterministic=False`. `init_params` creates every parameter (all
heads) in one `init`.

Parameter tree (top level): vit (..., block_i | blocks), bert (embeddings,
layer_i | encoder/layer, mlm_head), vision_proj, text_proj, itm_head, mim_head,
concept_head, temp. With `scan_layers` the repeated layers are one stacked subtree each
(`vit/blocks`, `bert/encoder/layer`, leading `layers` axis); `convert.stack_layers` /
`unstack_layers` move between the two layouts.

`config.architecture = "albef"` builds the ALBEF baseline in the same module: BERT layers
[0, bert.fusion_start) are a text encoder without cross-attention, the rest a fusion
encoder (`bert.Bert`); `embed_text` runs the text layers, `fuse` both. ALBEF has no MIM and
no PSL: its parameter tree has no mim_head / concept_head and those modes raise.
(Scanned: `bert/encoder/layer` holds the text layers, `bert/fusion_encoder/layer` the
fusion layers.)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from simla_jax.models import bert as bert_lib
from simla_jax.models import layers
from simla_jax.models import vit as vit_lib

ARCHITECTURES = ("simla", "albef")

# torch.nn.functional.normalize's default floor on the norm.
NORMALIZE_EPS = 1e-12


def l2_normalize(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
  return x / jnp.maximum(norm, NORMALIZE_EPS).astype(x.dtype)


def fusion_start(config: ml_collections.ConfigDict) -> int | None:
  """ALBEF's first fusion layer (`bert.fusion_start`, -1 = half the layers, rounded down);
  None for SIMLA, whose every layer can cross-attend."""
  arch = config.get("architecture", "simla")
  if arch not in ARCHITECTURES:
    raise ValueError(f"model.architecture {arch!r}: choose one of {ARCHITECTURES}")
  if arch == "simla":
    return None
  start = config.bert.get("fusion_start", -1)
  start = config.bert.layers // 2 if start == -1 else start
  if not 0 < start < config.bert.layers:
    raise ValueError(f"model.bert.fusion_start {start}: ALBEF needs 0 < fusion_start < "
                     f"bert.layers = {config.bert.layers} (text and fusion layers)")
  return start


def _head(features: int, fan_in: int, names: tuple[str | None, str | None], dtype) -> nn.Dense:
  """A Linear layer initialised like PyTorch's default (the official heads are plain nn.Linear)."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=layers.partitioned(layers.torch_linear_kernel_init(), names),
                  bias_init=layers.partitioned(layers.torch_linear_bias_init(fan_in), names[1:]))


class SIMLA(nn.Module):
  """SIMLA; `config` is a model config from configs/simla_model.py."""
  config: ml_collections.ConfigDict

  def setup(self):
    c = self.config
    if c.vit.width != c.bert.hidden:
      raise ValueError(f"SIMLA needs vit.width == bert.hidden (image-query mode feeds ViT "
                       f"tokens to BERT), got {c.vit.width} and {c.bert.hidden}")
    dtype = jnp.dtype(c.dtype)
    # What a rematerialised layer saves (layers.REMAT_POLICIES); a config without the key
    # gets full rematerialisation, what `remat=True` meant before the key existed.
    remat_policy = c.get("remat_policy", "nothing_saveable")
    scan_layers = c.get("scan_layers", False)
    self.vit = vit_lib.VisionTransformer(
        image_size=c.image_size, patch_size=c.patch_size, width=c.vit.width, depth=c.vit.depth,
        heads=c.vit.heads, mlp_dim=c.vit.mlp_dim, layer_norm_eps=c.vit.layer_norm_eps,
        drop_path_rate=c.vit.drop_path, use_mask_token=c.use_mask_token, init_std=c.init_std,
        remat=c.remat, remat_policy=remat_policy, scan_layers=scan_layers, dtype=dtype,
        attention_impl=c.attention_impl)
    self.bert = bert_lib.Bert(
        vocab_size=c.bert.vocab_size, hidden=c.bert.hidden, num_layers=c.bert.layers,
        heads=c.bert.heads, ffn=c.bert.ffn, max_position=c.bert.max_position,
        dropout=c.bert.dropout, attention_dropout=c.bert.attention_dropout,
        layer_norm_eps=c.bert.layer_norm_eps, init_std=c.init_std, remat=c.remat,
        remat_policy=remat_policy, scan_layers=scan_layers, dtype=dtype,
        attention_impl=c.attention_impl, fusion_start=fusion_start(c))
    width, hidden = c.vit.width, c.bert.hidden
    self.vision_proj = _head(c.embed_dim, width, ("embed", None), dtype)
    self.text_proj = _head(c.embed_dim, hidden, ("embed", None), dtype)
    self.itm_head = _head(2, hidden, ("embed", None), dtype)
    self.mim_head = _head(c.codebook_size, hidden, ("embed", "vocab"), dtype)
    self.concept_head = _head(c.bert.vocab_size, c.embed_dim, (None, "vocab"), dtype)

  @property
  def is_albef(self) -> bool:
    return self.config.get("architecture", "simla") == "albef"

  def _simla_only(self, what: str):
    if self.is_albef:
      raise ValueError(f"model.architecture 'albef' has no {what} (ALBEF trains ITC, ITM and "
                       f"MLM only): set its loss weight to 0")

  # --- encoders -------------------------------------------------------------------------------

  def embed_image(self, images: jax.Array, patch_mask: jax.Array | None = None, *,
                  deterministic: bool = True) -> jax.Array:
    """images (b, H, W, 3) normalized; patch_mask bool (b, N) -> image sequence (b, 1+N, width)."""
    return self.vit(images, patch_mask, deterministic=deterministic)

  def embed_text(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
                 cls_only: bool = False) -> jax.Array:
    """Text mode (self-attention only): ids, mask (b, l) -> (b, l, hidden).

    `cls_only`: (b, 1, hidden), the [CLS] row alone, with the last layer computed for
    that row only (enough for `text_feature`; see `Bert.encode`).
    """
    return self.bert(ids, mask, deterministic=deterministic, cls_only=cls_only)

  def fuse(self, ids: jax.Array, mask: jax.Array, image_seq: jax.Array,
           image_mask: jax.Array | None = None, *, image_index: jax.Array | None = None,
           deterministic: bool = True, cls_only: bool = False) -> jax.Array:
    """Multimodal mode, text queries cross-attending to the image: -> (b, l, hidden);
    `cls_only`: (b, 1, hidden), enough for `itm_logits` (see `embed_text`).

    `image_index` (b,): `image_seq` holds n images and text i reads image_index[i]; every
    layer projects each image to keys/values once (ITM pairs each image with 3 texts).
    """
    return self.bert(ids, mask, image_seq, image_mask, kv_index=image_index,
                     deterministic=deterministic, cls_only=cls_only)

  def fuse_text(self, text_seq: jax.Array, mask: jax.Array, image_seq: jax.Array,
                image_mask: jax.Array | None = None, *, image_index: jax.Array | None = None,
                deterministic: bool = True, cls_only: bool = False) -> jax.Array:
    """ALBEF only: the fusion layers over `text_seq` (b, l, hidden), the text layers'
    output (`embed_text`), cross-attending to the image; equals `fuse` on the same ids.
    ALBEF's ITM reuses the text output of its ITC pass this way."""
    if not self.is_albef:
      raise ValueError("fuse_text: only model.architecture 'albef' has a separate text stack")
    return self.bert.encode(text_seq, mask, image_seq, image_mask, kv_index=image_index,
                            deterministic=deterministic, cls_only=cls_only,
                            from_layer=self.bert.fusion_start)

  def fuse_with_attention(self, ids: jax.Array, mask: jax.Array, image_seq: jax.Array,
                          image_mask: jax.Array | None = None, *, layer: int = -1,
                          deterministic: bool = True,
                          cls_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """`fuse` plus the self-attention probabilities (b, heads, l, l) of `layer` (PSL).

    `cls_only`: the last layer's [CLS] row only, (b, 1, hidden) and, when `layer` is the
    last, probabilities (b, heads, 1, l): all PSL reads.
    """
    x = self.bert.embed(ids, deterministic=deterministic)
    return self.bert.encode(x, mask, image_seq, image_mask, deterministic=deterministic,
                            attention_layer=layer, cls_only=cls_only)

  def token_embeddings(self, ids: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Non-contextual token embeddings (word + position, LayerNorm, dropout): (b, l, hidden)."""
    return self.bert.embed(ids, deterministic=deterministic)

  def fuse_image_query(self, image_seq: jax.Array, ids: jax.Array | None, mask: jax.Array, *,
                       token_embeds: jax.Array | None = None,
                       deterministic: bool = True) -> jax.Array:
    """Image-query mode (MIM): the image sequence (b, 1+N, width) enters BERT as inputs_embeds
    and cross-attends to the token embeddings of `ids` (b, l) under `mask`.

    `token_embeds` (b, l, hidden) replaces `token_embeddings(ids)`: the official momentum
    branch cross-attends to the ONLINE model's token embeddings.
    Returns (b, 1+N, hidden).
    """
    self._simla_only("image-query mode (MIM)")
    if token_embeds is None:
      token_embeds = self.bert.embed(ids, deterministic=deterministic)
    x = self.bert.embed(inputs_embeds=image_seq, deterministic=deterministic)
    return self.bert.encode(x, None, token_embeds, mask, deterministic=deterministic)

  # --- heads ----------------------------------------------------------------------------------

  def image_feature(self, image_seq: jax.Array) -> jax.Array:
    """L2-normalized vision_proj of the image CLS: (b, 1+N, width) -> (b, embed_dim)."""
    return l2_normalize(self.vision_proj(image_seq[:, 0]))

  def text_feature(self, text_seq: jax.Array) -> jax.Array:
    """L2-normalized text_proj of the text CLS: (b, l, hidden) -> (b, embed_dim)."""
    return l2_normalize(self.text_proj(text_seq[:, 0]))

  def itm_logits(self, fused_seq: jax.Array) -> jax.Array:
    """Multimodal CLS -> match / no-match logits: (b, l, hidden) -> (b, 2); index 1 = match."""
    return self.itm_head(fused_seq[:, 0])

  def mlm_logits(self, fused_seq: jax.Array) -> jax.Array:
    """(b, l, hidden) -> (b, l, vocab)."""
    return self.bert.mlm_logits(fused_seq)

  def mim_logits(self, query_seq: jax.Array) -> jax.Array:
    """Image-query output without its CLS -> codebook logits: (b, 1+N, hidden) -> (b, N, codebook)."""
    self._simla_only("MIM head")
    return self.mim_head(query_seq[:, 1:])

  def concept_logits(self, image_feat: jax.Array) -> jax.Array:
    """Normalized projected image feature (b, embed_dim) -> keyword logits (b, vocab)."""
    self._simla_only("PSL concept head")
    return self.concept_head(image_feat)

  @nn.compact
  def temperature(self) -> jax.Array:
    """The ITC temperature, clamped to [temp_min, temp_max]."""
    # Declared here, not in setup, so trees without it (the momentum copies) still apply.
    c = self.config
    temp = self.param("temp", layers.partitioned(nn.initializers.constant(c.temp_init), ()),
                      (), jnp.float32)
    return jnp.clip(temp, c.temp_min, c.temp_max)

  def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array,
               patch_mask: jax.Array | None = None, *,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Every encoder mode and head once (so `init` creates all parameters); ALBEF's
    modes and heads only for `architecture = "albef"`."""
    kw = dict(deterministic=deterministic)
    image_seq = self.embed_image(images, **kw)
    text_seq = self.embed_text(ids, mask, **kw)
    fused = self.fuse(ids, mask, image_seq, **kw)
    image_feat = self.image_feature(image_seq)
    out = dict(image_seq=image_seq, text_seq=text_seq, fused=fused, image_feat=image_feat,
               text_feat=self.text_feature(text_seq), itm_logits=self.itm_logits(fused),
               mlm_logits=self.mlm_logits(fused), temp=self.temperature())
    if self.is_albef:
      return out
    masked_seq = image_seq if patch_mask is None else self.embed_image(images, patch_mask, **kw)
    query = self.fuse_image_query(masked_seq, ids, mask, **kw)
    return dict(out, query=query, mim_logits=self.mim_logits(query),
                concept_logits=self.concept_logits(image_feat))


def dummy_inputs(config: ml_collections.ConfigDict, batch: int = 1,
                 text_len: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Zero images (b, H, W, 3), ids (b, l) and an all-ones mask, for `init` and shape checks."""
  images = np.zeros((batch, config.image_size, config.image_size, 3), np.float32)
  return images, np.zeros((batch, text_len), np.int32), np.ones((batch, text_len), np.int32)


def init_params(model: SIMLA, rng: jax.Array) -> Any:
  """All parameters, boxed with their logical axis names (`nn.meta.unbox` to strip)."""
  return model.init({"params": rng}, *dummy_inputs(model.config))["params"]


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Unboxed ShapeDtypeStructs of every parameter, without allocating."""
  model = SIMLA(config)
  return nn.meta.unbox(jax.eval_shape(lambda rng: init_params(model, rng), jax.random.key(0)))


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def clamp_temperature(params: Any, config: ml_collections.ConfigDict) -> Any:
  """Clamps the stored temperature in place of the official forward's `temp.clamp_`."""
  return {**params, "temp": jnp.clip(params["temp"], config.temp_min, config.temp_max)}
