"""The face recogniser: backbone + class-centre classifier (+ attribute heads).

Variables: params/backbone/... (see models/iresnet.py for its naming),
params/classifier/centres (classes, embed), params/attributes/{kernel,bias} (present when
`attribute_dims` > 0), and batch_stats/backbone/....
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from face_jax.models.classifier import CosineClassifier


class FaceModel(nn.Module):
  """images (b, h, w, c) -> (embeddings (b, d), cosines (b, classes) float32,
  attribute logits (b, attribute_dims) or None).

  Attributes:
    backbone: maps (images, train) to (b, d) embeddings, e.g. an IResNet.
    num_classes: training identities.
    attribute_dims: total outputs of the auxiliary variation-attribute heads (the sum of
      the factors' category counts); 0 disables them.
  """
  backbone: nn.Module
  num_classes: int
  attribute_dims: int = 0

  def setup(self):
    self.classifier = CosineClassifier(self.num_classes)
    if self.attribute_dims:
      self.attributes = nn.Dense(
          self.attribute_dims,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))

  def __call__(self, images, train: bool = False):
    emb = self.backbone(images, train=train)
    attr: Optional[jnp.ndarray] = self.attributes(emb) if self.attribute_dims else None
    return emb, self.classifier(emb), attr

  def embed(self, images):
    """Inference embeddings (b, d), running BatchNorm statistics."""
    return self.backbone(images, train=False)
