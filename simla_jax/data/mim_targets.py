"""MIM target tokens, one per image patch, computed in the train step (JAX, jit-able).

`config.data.mim.target` selects:
  "random_projection" (default for the built-in data; no weights): each
      `patch_size` x `patch_size` x 3 patch of the model's image view is normalised
      (zero mean, unit variance over its pixels, `norm_eps` added to the variance),
      projected by a frozen Gaussian matrix (P, projection_dim) and assigned to the
      nearest of `codebook_size` frozen unit vectors (largest cosine). Projection and
      codebook come from `projection_seed`, so targets are a fixed function of pixels.
  "dvae": the DALL-E dVAE encoder (`dvae.DalleEncoder`) on the batch's separate
      half-resolution view `dvae_image` (`map_pixels` range); target = argmax of its
      logits, row-major over the (H_d/8, W_d/8) grid, as the official code does. The
      grid must equal the ViT patch grid (official: 128/8 = 256/16).

  targeter = MimTargeter(config.data.mim)
  tstate = targeter.init_state()          # numpy pytree; dvae: loads mim.dvae_weights
  tokens = jax.jit(targeter)(tstate, batch)   # (B, N) int32 in [0, targeter.vocab_size)
Pass `tstate` as an argument of the jitted step (e.g. in `TrainState.extras`), not as
a closure constant.
"""

from typing import Any, Mapping, Optional

import einops
import jax
import jax.numpy as jnp
import numpy as np

from simla_jax.data import dvae


class MimTargeter:
  """Target tokens for masked image modelling (see module docstring)."""

  def __init__(self, mim_cfg: Any):
    self.cfg = mim_cfg
    self.kind = str(mim_cfg.target)
    if self.kind not in ("random_projection", "dvae"):
      raise ValueError(f"mim.target: unknown {self.kind!r}; expected random_projection | dvae")
    self.patch_size = int(mim_cfg.patch_size)
    self._encoder = dvae.encoder_from_config(mim_cfg) if self.kind == "dvae" else None

  @property
  def vocab_size(self) -> int:
    """Number of target classes (size of the MIM head)."""
    if self.kind == "dvae":
      return int(self.cfg.dvae_vocab_size)
    return int(self.cfg.codebook_size)

  @property
  def input_key(self) -> str:
    """Batch entry the targets are computed from."""
    return "dvae_image" if self.kind == "dvae" else "image"

  def init_state(self, dvae_params: Optional[Any] = None, channels: int = 3) -> dict:
    """Frozen target parameters as a pytree of float32 arrays."""
    if self.kind == "dvae":
      if dvae_params is None:
        if not self.cfg.dvae_weights:
          raise ValueError("mim.target='dvae' needs mim.dvae_weights (or dvae_params)")
        dvae_params = dvae.load_encoder_params(self.cfg.dvae_weights, self.cfg)
      return {"dvae": dvae_params}
    rng = np.random.default_rng(int(self.cfg.projection_seed))
    dim_in = self.patch_size * self.patch_size * channels
    dim = int(self.cfg.projection_dim)
    projection = rng.standard_normal((dim_in, dim)).astype(np.float32) / np.sqrt(dim_in)
    codebook = rng.standard_normal((self.vocab_size, dim)).astype(np.float32)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    return {"projection": projection, "codebook": codebook}

  def __call__(self, state: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
    """(B, N) int32 target tokens for the batch."""
    images = jnp.asarray(batch[self.input_key], jnp.float32)
    if self.kind == "dvae":
      return dvae.codebook_indices(state["dvae"], images, self._encoder)
    return random_projection_tokens(images, state["projection"], state["codebook"],
                                    patch_size=self.patch_size, eps=float(self.cfg.norm_eps))


def random_projection_tokens(images: jax.Array, projection: jax.Array, codebook: jax.Array, *,
                             patch_size: int, eps: float) -> jax.Array:
  """(B, H, W, C) -> (B, (H/p)(W/p)) int32 nearest-code index of each normalised patch."""
  patches = einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)",
                             p=patch_size, q=patch_size)
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True)
  patches = (patches - mean) / jnp.sqrt(var + eps)
  z = patches @ projection                       # (b, n, d)
  z = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)
  return jnp.argmax(z @ codebook.T, axis=-1).astype(jnp.int32)
