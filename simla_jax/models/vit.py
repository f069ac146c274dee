"""The SIMLA image encoder: a DeiT-B/16-layout ViT with a learned MIM mask token.

Pre-norm blocks (LayerNorm eps 1e-6, qkv bias, exact GELU), CLS token, learned
absolute position embedding, final LayerNorm, no head. Masked patches (MIM) are
replaced by `mask_token` before the position embedding is added; CLS is never masked.

The blocks are unrolled (`block_i`) or, with `scan_layers`, one `nn.scan` over `blocks`
whose parameters carry a leading `layers` axis (the stochastic-depth rate of each block
is a scanned input).
"""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simla_jax.models import layers

Dtype = layers.Dtype


def drop_path(x: jax.Array, rate: float | jax.Array, deterministic: bool,
              rng: jax.Array | None) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per sample, rescales the kept ones.

  `rate` may be traced (a scanned block's); at rate 0 every sample is kept unscaled.
  """
  if deterministic or rng is None or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Block(nn.Module):
  """x + attn(norm1(x)); x + mlp(norm2(x)). (b, n, d) -> ((b, n, d), None).

  The output pair is `nn.scan`'s (carry, per-layer output). `drop_path_rate` is this
  block's stochastic-depth rate (a float, or a traced scalar under scan); `stochastic_depth`
  says whether any block of the model has one, i.e. whether to draw an rng at all.
  """
  heads: int
  mlp_dim: int
  layer_norm_eps: float
  stochastic_depth: bool = False
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, drop_path_rate: float | jax.Array = 0.0,
               deterministic: bool = True, hook: bool = False) -> tuple[jax.Array, None]:
    width = x.shape[-1]
    init = nn.initializers.normal(self.init_std)
    rate = drop_path_rate
    rng = None if deterministic or not self.stochastic_depth else self.make_rng("dropout")
    h = layers.layer_norm(self.layer_norm_eps, self.dtype, "norm1")(x)
    h = layers.Attention(self.heads, width, kernel_init=init, dtype=self.dtype,
                         impl=self.attention_impl, name="attn")(h, h, hook=hook)
    x = x + drop_path(h, rate, deterministic, rng)
    h = layers.layer_norm(self.layer_norm_eps, self.dtype, "norm2")(x)
    h = layers.Mlp(self.mlp_dim, kernel_init=init, dtype=self.dtype, name="mlp")(h)
    if rng is not None:
      rng = jax.random.fold_in(rng, 1)
    return x + drop_path(h, rate, deterministic, rng), None


class VisionTransformer(nn.Module):
  """Images (b, H, W, 3) normalized float -> token sequence (b, 1 + N, width)."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-6
  drop_path_rate: float = 0.0
  use_mask_token: bool = True
  init_std: float = 0.02
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"

  @property
  def grid(self) -> int:
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images: jax.Array, patch_mask: jax.Array | None = None, *,
               deterministic: bool = True, hook_attention: bool = False) -> jax.Array:
    """patch_mask: optional bool (b, N), row-major over the patch grid; True = masked.

    `hook_attention` (Grad-CAM, `simla_jax.gradcam`): every block's self-attention sows
    its probabilities (b, heads, 1+N, 1+N) and adds the "perturbations" collection's
    zeros to them when the caller passes it (`layers.Attention`'s hook); scanned blocks
    stack both along a leading `layers` axis.
    """
    n = self.grid ** 2
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"ViT expects images (b, {self.image_size}, {self.image_size}, c), "
                       f"got {images.shape}")
    init = nn.initializers.normal(self.init_std)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding="VALID",
                dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, "conv_in", "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
                name="patch_embed")(images.astype(self.dtype))
    x = einops.rearrange(x, "b h w d -> b (h w) d")

    token_names = (None, None, "embed")
    if self.use_mask_token:
      # Zeros, as in the official code (DeiT checkpoints have no mask token).
      mask_token = self.param("mask_token", layers.partitioned(nn.initializers.zeros, token_names),
                              (1, 1, self.width), jnp.float32)
    if patch_mask is not None:
      if not self.use_mask_token:
        raise ValueError("patch_mask given but the model has no mask_token "
                         "(config.model.use_mask_token=False)")
      if patch_mask.shape != (x.shape[0], n):
        raise ValueError(f"patch_mask must be (b, {n}), got {patch_mask.shape}")
      x = jnp.where(patch_mask[..., None], mask_token.astype(x.dtype), x)

    cls = self.param("cls_token", layers.partitioned(init, token_names), (1, 1, self.width),
                     jnp.float32)
    pos = self.param("pos_embed", layers.partitioned(init, token_names), (1, 1 + n, self.width),
                     jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x],
                        axis=1)
    x = x + pos.astype(x.dtype)

    block = Block
    if self.remat:   # static: deterministic, hook (argument 0 is self)
      block = nn.remat(Block, static_argnums=(3, 4),
                       policy=layers.remat_policy(self.remat_policy))
    args = (self.heads, self.mlp_dim, self.layer_norm_eps, self.drop_path_rate > 0.0,
            self.init_std, self.dtype, self.attention_impl)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)   # stochastic-depth ramp
    if self.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0, "perturbations": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"},
                      # No broadcast variables or outputs: skip the extra trace that checks them.
                      check_constancy_invariants=False)
      x, _ = stack(*args, name="blocks")(x, jnp.asarray(rates, jnp.float32), deterministic,
                                         hook_attention)
    else:
      for i in range(self.depth):
        x, _ = block(*args, name=f"block_{i}")(x, float(rates[i]), deterministic,
                                               hook_attention)
    return layers.layer_norm(self.layer_norm_eps, self.dtype, "norm")(x)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 (torch's A = -0.75)."""
  def near(d):   # |d| <= 1
    return ((a + 2) * d - (a + 3)) * d * d + 1

  def far(d):    # 1 < |d| < 2
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of torch's 1-D bicubic resize, align_corners=False, edge clamped."""
  scale = n_in / n_out
  src = scale * (np.arange(n_out) + 0.5) - 0.5
  base = np.floor(src)
  w = _cubic_weights(src - base)
  m = np.zeros((n_out, n_in), np.float64)
  for tap in range(4):
    idx = np.clip(base + tap - 1, 0, n_in - 1).astype(int)
    np.add.at(m, (np.arange(n_out), idx), w[:, tap])
  return m


def interpolate_pos_embed(pos_embed: np.ndarray, num_patches: int, num_extra: int = 1) -> np.ndarray:
  """Resizes a (1, extra + g*g, d) position embedding to `num_patches` grid tokens.

  The extra (CLS) tokens are kept; the grid is resized bicubically exactly as the
  official `interpolate_pos_embed` does with `torch.nn.functional.interpolate`.
  """
  pos_embed = np.asarray(pos_embed)
  g_in = int(round((pos_embed.shape[1] - num_extra) ** 0.5))
  g_out = int(round(num_patches ** 0.5))
  if g_in ** 2 != pos_embed.shape[1] - num_extra or g_out ** 2 != num_patches:
    raise ValueError(f"position embedding {pos_embed.shape} / {num_patches} patches: "
                     f"only square grids can be interpolated")
  if g_in == g_out:
    return pos_embed
  m = bicubic_matrix(g_in, g_out)
  grid = einops.rearrange(pos_embed[:, num_extra:], "o (h w) d -> o h w d", h=g_in)
  grid = np.einsum("Hh,Ww,ohwd->oHWd", m, m, grid.astype(np.float64))
  grid = einops.rearrange(grid, "o h w d -> o (h w) d").astype(pos_embed.dtype)
  return np.concatenate([pos_embed[:, :num_extra], grid], axis=1)
