"""The multi-variation cosine margin (MvCoM): an additive model of the per-sample margin.

  m_i = m0 + class_bound * tanh(beta) * q(y_i) + sum_k bound * <tanh(alpha_k), v_ik>

The patent's class-level weight plus a sample-level one (specs/mvcom.md §1.1, claim 2).
k runs over the variation factors (group, pose, occlusion, blur); v_ik is sample i's
encoding of factor k: a one-hot (or, for predicted attributes, a probability vector) over
the factor's categories, or a (1,)-vector for a binary factor holding its flag or its
continuous degree in [0, 1] (sample level: a blurrier image gets a proportionally larger
offset). alpha_k has one entry per category, so f_k(v) = bound * <tanh(alpha_k), v> is a
learned margin offset per category (a generalised additive model with one bounded term
per factor). q(y) is a class prior: n_y^(-1/4) centred and divided by its largest
magnitude (LDAM's shape, the rarest class at +1; 0 when all classes are equally frequent).

All parameters start at 0, so training starts exactly at the base margin m0. Encodings are
clipped to [0, 1] (a categorical one scaled to sum <= 1) and q to [-1, 1], so |m_i - m0| <= class_bound + (number of factors) *
bound for any input (tested). Reconstruction of the paper's model, see specs/mvcom.md §1.4
(UNVERIFIED in detail).
"""

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class AdditiveMargin(nn.Module):
  """Attributes -> (b,) per-sample margins.

  Attributes:
    factors: ((name, number of categories), ...); a binary factor has 1 category.
    base: m0.
    bound: largest offset one factor can add (tanh bound).
    class_bound: largest offset of the class term; 0 disables it.
  """
  factors: Sequence[tuple[str, int]]
  base: float
  bound: float
  class_bound: float = 0.0

  @nn.compact
  def __call__(self, attributes: Mapping[str, jax.Array], class_prior=None):
    """attributes[name]: (b, n) encodings; class_prior: (b,) or None -> (b,) margins."""
    margin = self.base
    for name, size in self.factors:
      alpha = self.param(name, nn.initializers.zeros, (size,), jnp.float32)
      if name not in attributes:
        raise KeyError(f"AdditiveMargin: no attribute {name!r} (have {sorted(attributes)})")
      v = jnp.clip(attributes[name].astype(alpha.dtype), 0.0, 1.0)
      if size > 1:   # one-hot / softmax sum to 1 already; anything else is scaled to sum <= 1
        v = v / jnp.maximum(jnp.sum(v, -1, keepdims=True), 1.0)
      # So <tanh(alpha), v> is in [-1, 1] for every factor.
      margin = margin + self.bound * v @ jnp.tanh(alpha)
    if self.class_bound:
      beta = self.param("class", nn.initializers.zeros, (), jnp.float32)
      if class_prior is None:
        raise ValueError("AdditiveMargin: class_bound > 0 needs a class_prior")
      q = jnp.clip(class_prior.astype(beta.dtype), -1.0, 1.0)
      margin = margin + self.class_bound * jnp.tanh(beta) * q
    return margin


def factor_offsets(params, bound: float, class_bound: float = 0.0) -> dict[str, np.ndarray]:
  """Learned margin offset per factor category, {name: (n,)}; for logs and plots."""
  out = {name: bound * np.tanh(np.asarray(a)) for name, a in params.items() if name != "class"}
  if "class" in params:
    out["class"] = class_bound * np.tanh(np.asarray(params["class"]))[None]
  return out


def oracle_attributes(batch: Mapping[str, jax.Array], factors: Sequence[tuple[str, int]],
                      prefix: str = "", degrees: bool = False) -> dict[str, jax.Array]:
  """Encodings from attributes stored in the batch: categorical -> one-hot, binary -> (b, 1)
  holding the flag, or with `degrees` the continuous `<name>_degree` where the batch has it."""
  out = {}
  for name, size in factors:
    key = prefix + name
    if degrees and size == 1 and f"{key}_degree" in batch:
      key = f"{key}_degree"
    if key not in batch:
      raise KeyError(f"batch has no attribute {key!r} (keys: {sorted(batch)})")
    v = batch[key]
    out[name] = (jax.nn.one_hot(v, size, dtype=jnp.float32) if size > 1
                 else v.astype(jnp.float32).reshape(-1, 1))
  return out


def predicted_attributes(logits: jax.Array, factors: Sequence[tuple[str, int]]) -> dict[str, jax.Array]:
  """Encodings from attribute-head logits (b, sum n): softmax per categorical factor,
  sigmoid per binary one. Stop-gradient: the margin must not let the backbone lower its
  own margin by moving the attribute predictions."""
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  out, start = {}, 0
  for name, size in factors:
    z = logits[:, start:start + size]
    out[name] = jax.nn.softmax(z, axis=-1) if size > 1 else jax.nn.sigmoid(z)
    start += size
  return out


def attribute_loss(logits: jax.Array, batch: Mapping[str, jax.Array],
                   factors: Sequence[tuple[str, int]], prefix: str = "") -> jax.Array:
  """(b,) attribute-head loss: softmax CE for categorical factors, logistic for binary."""
  logits = logits.astype(jnp.float32)
  loss, start = jnp.zeros(logits.shape[:1], jnp.float32), 0
  for name, size in factors:
    z = logits[:, start:start + size]
    y = batch[prefix + name]
    if size > 1:
      loss += jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, y[:, None].astype(jnp.int32), -1)[:, 0]
    else:
      y = y.astype(jnp.float32)
      loss += jnp.logaddexp(0.0, z[:, 0]) - y * z[:, 0]
    start += size
  return loss


def class_prior(counts: np.ndarray, power: float = -0.25) -> np.ndarray:
  """(c,) images per class -> (c,) n^power centred and scaled to max |q| = 1 (LDAM's
  n^(-1/4) shape: the rarest class at the top), 0 if all counts are equal."""
  q = np.asarray(counts, np.float64) ** power
  q = q - q.mean()
  scale = np.abs(q).max()
  return (q / scale if scale > 1e-12 else np.zeros_like(q)).astype(np.float32)


def fixed_margins(batch: Mapping[str, jax.Array], base: float, offsets,
                  degrees: bool = False) -> jax.Array:
  """Hand-set margins (baselines and the positive control) -> (b,):

    m0 + offsets.group[group] + sum_v offsets[v] * v_i + offsets.class_prior * q(y_i)

  v_i: the flag of variation v, or its degree with `degrees`; an entry that is 0 (or an
  empty group tuple) needs no batch key. offsets: config.fixed_margins.
  """
  margin = jnp.asarray(base, jnp.float32)
  if len(offsets["group"]) and any(offsets["group"]):
    margin = margin + jnp.asarray(offsets["group"], jnp.float32)[batch["group"]]
  for name, value in offsets.items():
    if name in ("group", "class_prior") or not value:
      continue
    key = f"{name}_degree" if degrees and f"{name}_degree" in batch else name
    margin = margin + float(value) * batch[key].astype(jnp.float32)
  if offsets["class_prior"]:
    margin = margin + float(offsets["class_prior"]) * batch["class_prior"].astype(jnp.float32)
  return jnp.broadcast_to(margin, batch["label"].shape)
