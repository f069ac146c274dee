"""Margins against hand-computed logits and closed-form gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from face_jax import margins
from face_jax.models.classifier import CosineClassifier, cosine_logits

COS = np.array([[0.5, 0.2, -0.1], [0.3, 0.9, 0.0], [-0.2, 0.1, 0.7]], np.float32)
LABELS = np.array([0, 1, 2])


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def test_cosface_logits_by_hand():
  got = margins.cosface_logits(COS, LABELS, s=10.0, m=0.35)
  want = [[10 * (0.5 - 0.35), 2.0, -1.0], [3.0, 10 * (0.9 - 0.35), 0.0], [-2.0, 1.0, 10 * (0.7 - 0.35)]]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_arcface_and_combined_logits_by_hand():
  got = margins.arcface_logits(COS, LABELS, s=10.0, m=0.5)
  want = 10 * COS.astype(np.float64)
  for i, y in enumerate(LABELS):
    want[i, y] = 10 * math.cos(math.acos(COS[i, y]) + 0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Combined (m1, m2, m3) with per-sample vectors, both gradient conventions.
  m1, m2, m3 = np.array([0.9, 1.0, 1.1]), np.array([0.1, 0.2, 0.3]), np.array([0.05, 0.1, 0.15])
  want = 8 * COS.astype(np.float64)
  for i, y in enumerate(LABELS):
    want[i, y] = 8 * (math.cos(m1[i] * math.acos(COS[i, y]) + m2[i]) - m3[i])
  for st in (True, False):
    got = margins.margin_logits(COS, LABELS, s=8.0, m1=jnp.asarray(m1), m2=jnp.asarray(m2),
                                m3=jnp.asarray(m3), straight_through=st)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cosface_margin_gradient_is_s_one_minus_p():
  s = 16.0
  m = jnp.array([0.2, 0.4, 0.3])
  loss = lambda m: jnp.sum(margins.cross_entropy(margins.cosface_logits(COS, LABELS, s=s, m=m), LABELS))
  grad = jax.grad(loss)(m)
  p = _softmax(np.asarray(margins.cosface_logits(COS, LABELS, s=s, m=m), np.float64))
  p_true = p[np.arange(3), LABELS]
  np.testing.assert_allclose(grad, s * (1 - p_true), rtol=1e-5)
  # ... and the gradient w.r.t. the target cosine is -s (1 - p).
  gcos = jax.grad(lambda c: jnp.sum(margins.cross_entropy(margins.cosface_logits(c, LABELS, s=s, m=m), LABELS)))(COS)
  np.testing.assert_allclose(gcos, s * (p - np.eye(3)[LABELS]), rtol=1e-5, atol=1e-6)


def test_arcface_straight_through_gradient():
  s, m = 16.0, jnp.array([0.5, 0.3, 0.4])
  def loss(c, m):
    return jnp.sum(margins.cross_entropy(margins.arcface_logits(c, LABELS, s=s, m=m), LABELS))
  z = np.asarray(margins.arcface_logits(COS, LABELS, s=s, m=m), np.float64)
  p = _softmax(z)
  onehot = np.eye(3)[LABELS]
  gcos, gm = jax.grad(loss, argnums=(0, 1))(COS, m)
  np.testing.assert_allclose(gcos, s * (p - onehot), rtol=1e-5, atol=1e-6)
  # The margin stays differentiable: dL/dm2 = s (1 - p_y) sin(theta_y + m2).
  theta = np.arccos(COS[np.arange(3), LABELS].astype(np.float64))
  np.testing.assert_allclose(gm, s * (1 - p[np.arange(3), LABELS]) * np.sin(theta + np.asarray(m)), rtol=1e-4)
  # Scalar margin: identical to logits + stop_gradient(margined - logits).
  def reference(c):
    plain = s * c
    margined = plain + s * onehot * (np.cos(np.arccos(np.clip(c, -1, 1)) + 0.5) - c)
    return plain + jax.lax.stop_gradient(margined - plain)
  c = jnp.asarray(COS)
  np.testing.assert_allclose(margins.arcface_logits(c, LABELS, s=s, m=0.5), reference(c), rtol=1e-5, atol=1e-5)


def test_float32_whatever_the_input_dtype():
  logits = margins.cosface_logits(jnp.asarray(COS, jnp.bfloat16), LABELS, s=64.0, m=0.4)
  assert logits.dtype == jnp.float32
  assert margins.cross_entropy(logits.astype(jnp.bfloat16), LABELS).dtype == jnp.float32
  emb = jnp.ones((2, 4), jnp.bfloat16)
  cos = cosine_logits(emb, jnp.asarray(np.random.default_rng(0).normal(size=(5, 4))))
  assert cos.dtype == jnp.float32 and float(jnp.max(jnp.abs(cos))) <= 1.0


def test_cross_entropy_matches_numpy():
  z = np.random.default_rng(1).normal(size=(4, 7)).astype(np.float32) * 5
  y = np.array([0, 3, 6, 2])
  want = -np.log(_softmax(z.astype(np.float64))[np.arange(4), y])
  np.testing.assert_allclose(margins.cross_entropy(z, y), want, rtol=1e-5)


def test_classifier_axes_and_range():
  clf = CosineClassifier(num_classes=11)
  variables = clf.init(jax.random.key(0), jnp.ones((3, 6)))
  box = variables["params"]["centres"]
  assert box.names == ("classes", "embed") and box.value.shape == (11, 6)
  cos = clf.apply(variables, jax.random.normal(jax.random.key(1), (3, 6)))
  assert cos.shape == (3, 11) and float(jnp.max(jnp.abs(cos))) <= 1.0
  w = np.asarray(box.value, np.float64)
  e = np.asarray(jax.random.normal(jax.random.key(1), (3, 6)), np.float64)
  want = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
  np.testing.assert_allclose(cos, want, rtol=1e-5, atol=1e-6)
