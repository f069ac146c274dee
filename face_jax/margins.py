"""Margin softmax losses with insightface conventions and per-sample margins.

insightface's combined margin puts three margins on the target logit of sample i:

  z_y = s * (cos(m1 * theta_y + m2) - m3),   z_j = s * cos(theta_j)  (j != y)

CosFace is (1, 0, m), ArcFace is (1, m, 0). Each of m1, m2, m3 may be a scalar or a
per-sample vector (b,), which is how MvCoM and hand-set per-group margins enter.

ArcFace straight-through (arcface_torch `CombinedMarginLoss`): the angular part is applied
under no_grad, so the gradient w.r.t. the cosine logits is s * (softmax(z) - onehot), as if
the margin were a constant shift. Here the cosine gets exactly that straight-through
gradient, while the margin values themselves stay differentiable (d z_y / d m2 =
-s sin(theta_y + m2)), which the meta-gradient into a learned margin needs. For constant
margins this is identical to `logits + stop_gradient(margined - logits)`.

Logits and cross-entropy are float32 (float64 if given) whatever the compute dtype: s = 64 times a cosine
overflows float16 softmax (insightface #2200).
"""

from typing import Union

import jax
import jax.numpy as jnp

Margin = Union[float, jax.Array]   # scalar or (b,)


def at_least_f32(x):
  """Casts bfloat16/float16 to float32; float32 and float64 pass unchanged."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_const(m, value: float) -> bool:
  return isinstance(m, (int, float)) and float(m) == value


def margin_logits(cos, labels, *, s: float, m1: Margin = 1.0, m2: Margin = 0.0,
                  m3: Margin = 0.0, straight_through: bool = True):
  """Scaled logits with the combined margin on the target class.

  Args:
    cos: (b, c) cosines in [-1, 1].
    labels: (b,) int class ids in [0, c).
    s: scale.
    m1, m2, m3: multiplicative angular, additive angular and additive cosine margins;
      scalars or (b,) vectors.
    straight_through: arcface_torch's convention for the angular part (see module doc);
      False differentiates through arccos (clamped away from +-1, where it is singular).

  Returns:
    (b, c) float32 logits.
  """
  cos = at_least_f32(cos)
  onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
  target = jnp.sum(cos * onehot, axis=-1)                            # (b,)
  if _is_const(m1, 1.0) and _is_const(m2, 0.0):
    new_target = target - m3                                         # CosFace: exact
  elif straight_through:
    theta = jnp.arccos(jax.lax.stop_gradient(target))
    angular = jnp.cos(m1 * theta + m2)
    new_target = target + angular - jax.lax.stop_gradient(target) - m3
  else:
    eps = 1e-6
    theta = jnp.arccos(jnp.clip(target, -1.0 + eps, 1.0 - eps))
    new_target = jnp.cos(m1 * theta + m2) - m3
  return s * (cos + onehot * (new_target - target)[:, None])


def cosface_logits(cos, labels, *, s: float = 64.0, m: Margin = 0.4):
  """CosFace: s * (cos_y - m) on the target."""
  return margin_logits(cos, labels, s=s, m3=m)


def arcface_logits(cos, labels, *, s: float = 64.0, m: Margin = 0.5,
                   straight_through: bool = True):
  """ArcFace: s * cos(theta_y + m) on the target."""
  return margin_logits(cos, labels, s=s, m2=m, straight_through=straight_through)


def cross_entropy(logits, labels):
  """Per-sample softmax cross-entropy, (b, c) logits, (b,) labels -> (b,) float32."""
  logits = at_least_f32(logits)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * onehot, axis=-1)
