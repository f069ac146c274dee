"""Class-centre matrix and normalised cosine logits.

The (classes, embed) matrix carries the logical axes `classes` and `embed`, so with the
default rules it is split over `model` on the identity axis (millions of identities do
not fit one device) and over `fsdp` on the embedding axis; XLA partitions the logits
matmul and the softmax reductions accordingly.
"""

import flax.linen as nn
import jax.numpy as jnp

CENTRE_INIT_STD = 0.01   # arcface_torch PartialFC: N(0, 0.01)
NORM_EPS = 1e-12         # torch.nn.functional.normalize default


def l2_normalize(x, axis: int = -1):
  """x / max(|x|, eps), in float32 (float64 if given)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), NORM_EPS)


def cosine_logits(embeddings, centres):
  """(b, d) embeddings, (c, d) centres -> (b, c) float32 cosines clamped to [-1, 1]."""
  cos = jnp.einsum("bd,cd->bc", l2_normalize(embeddings), l2_normalize(centres))
  return jnp.clip(cos, -1.0, 1.0)


class CosineClassifier(nn.Module):
  """(b, d) embeddings -> (b, num_classes) cosines to the class centres, float32."""
  num_classes: int

  @nn.compact
  def __call__(self, embeddings):
    centres = self.param(
        "centres", nn.with_logical_partitioning(nn.initializers.normal(CENTRE_INIT_STD),
                                                ("classes", "embed")),
        (self.num_classes, embeddings.shape[-1]), jnp.float32)
    return cosine_logits(embeddings, centres)
