"""Meta-gradient of the one-step look-ahead vs central finite differences (float64), and
L2RW weights vs explicit per-example gradient dot products."""

import jax
import jax.numpy as jnp
import numpy as np


from face_jax import margins, meta, mvcom

FACTORS = (("group", 3), ("pose", 1), ("occlusion", 1))


def _problem(dtype):
  rng = np.random.default_rng(0)
  b, bm, d_in, d, c = 12, 9, 5, 4, 6
  theta = {"w1": rng.normal(size=(d_in, 8)) * 0.5, "b1": rng.normal(size=8) * 0.1,
           "w2": rng.normal(size=(8, d)) * 0.5, "centres": rng.normal(size=(c, d))}
  theta = jax.tree.map(lambda x: jnp.asarray(x, dtype), theta)

  def split(n, salt):
    r = np.random.default_rng(salt)
    return {"x": jnp.asarray(r.normal(size=(n, d_in)), dtype), "label": jnp.asarray(r.integers(0, c, n)),
            "group": jnp.asarray(r.integers(0, 3, n)), "pose": jnp.asarray(r.integers(0, 2, n)),
            "occlusion": jnp.asarray(r.integers(0, 2, n)), "class_prior": jnp.asarray(r.normal(size=n), dtype)}

  batch, meta_batch = split(b, 1), split(bm, 2)

  def logits_cos(theta, x):
    h = jnp.tanh(x @ theta["w1"] + theta["b1"]) @ theta["w2"]
    h = h / jnp.linalg.norm(h, axis=-1, keepdims=True)
    w = theta["centres"] / jnp.linalg.norm(theta["centres"], axis=-1, keepdims=True)
    return h @ w.T

  model = mvcom.AdditiveMargin(FACTORS, base=0.3, bound=0.4, class_bound=0.2)

  def per_example(theta, phi, arc=False):
    m = model.apply({"params": phi}, mvcom.oracle_attributes(batch, FACTORS), batch["class_prior"])
    cos = logits_cos(theta, batch["x"])
    z = (margins.arcface_logits(cos, batch["label"], s=8.0, m=m) if arc
         else margins.cosface_logits(cos, batch["label"], s=8.0, m=m))
    return margins.cross_entropy(z, batch["label"])

  def meta_loss(theta):
    z = margins.cosface_logits(logits_cos(theta, meta_batch["x"]), meta_batch["label"], s=8.0, m=0.3)
    return jnp.mean(margins.cross_entropy(z, meta_batch["label"]))

  phi = {"group": jnp.asarray([0.3, -0.2, 0.5], dtype), "pose": jnp.asarray([0.1], dtype),
         "occlusion": jnp.asarray([-0.4], dtype), "class": jnp.asarray(0.2, dtype)}
  return theta, phi, per_example, meta_loss


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _central_differences(f, phi, h):
  leaves, treedef = jax.tree.flatten(phi)
  out = []
  for li, leaf in enumerate(leaves):
    flat = np.asarray(leaf).ravel()
    for j in range(flat.size):
      def shifted(delta):
        new = flat.copy()
        new[j] += delta
        ls = list(leaves)
        ls[li] = jnp.asarray(new.reshape(np.shape(leaf)), leaf.dtype)
        return float(f(jax.tree.unflatten(treedef, ls)))
      out.append((shifted(h) - shifted(-h)) / (2 * h))
  return np.array(out)


def test_meta_gradient_matches_central_differences_float64():
  with jax.enable_x64(True):
    theta, phi, per_example, meta_loss = _problem(jnp.float64)
    lr = 0.5
    for arc in (False, True):
      train_loss = lambda t, p: jnp.mean(per_example(t, p, arc))
      value, grad = jax.jit(lambda p: meta.lookahead_meta_grad(p, theta, train_loss, meta_loss, lr))(phi)
      f = jax.jit(lambda p: meta.lookahead_meta_loss(p, theta, train_loss, meta_loss, lr))
      fd = _central_differences(f, phi, 1e-5)
      g = _flat(grad)
      assert np.linalg.norm(g) > 1e-4   # the check is not vacuous
      rel = np.linalg.norm(g - fd) / np.linalg.norm(fd)
      print(f"meta-gradient vs central differences ({'arcface' if arc else 'cosface'}): "
            f"relative error {rel:.2e}")
      assert rel < 1e-3, (arc, rel, g, fd)
      assert np.isclose(float(value), float(f(phi)))


def test_first_order_shortcut_gives_no_signal():
  theta, phi, per_example, meta_loss = _problem(jnp.float32)
  train_loss = lambda t, p: jnp.mean(per_example(t, p))

  def first_order(p):
    g = jax.lax.stop_gradient(jax.grad(train_loss)(theta, p))
    return meta_loss(meta.sgd_lookahead(theta, g, 0.5))

  assert np.all(_flat(jax.jit(jax.grad(first_order))(phi)) == 0)
  _, grad = jax.jit(lambda p: meta.lookahead_meta_grad(p, theta, train_loss, meta_loss, 0.5))(phi)
  assert np.linalg.norm(_flat(grad)) > 0


def test_l2rw_weights_match_explicit_per_example_gradients():
  theta, phi, per_example, meta_loss = _problem(jnp.float32)
  losses = lambda t: per_example(t, phi)
  # Explicit: one gradient per example (rows of the reverse-mode Jacobian), dotted
  # with the meta-batch gradient.
  g_meta = _flat(jax.jit(jax.grad(meta_loss))(theta)).astype(np.float64)
  jac = jax.jit(jax.jacrev(losses))(theta)
  n = losses(theta).shape[0]
  rows = np.concatenate([np.asarray(x).reshape(n, -1) for x in jax.tree.leaves(jac)], 1)
  scores = rows.astype(np.float64) @ g_meta
  assert (scores > 0).any() and (scores < 0).any()   # clamping is exercised
  want = np.maximum(scores, 0) / np.maximum(scores, 0).sum()
  np.testing.assert_allclose(jax.jit(lambda t: meta.l2rw_weights(t, losses, meta_loss))(theta),
                             want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda t: meta.l2rw_weights_lookahead(t, losses, meta_loss))(theta),
                             want, rtol=1e-4, atol=1e-6)
  # All scores negative -> all weights zero (no division by zero).
  w = jax.jit(lambda t: meta.l2rw_weights(t, lambda u: -jnp.sum(u["b1"]) * jnp.ones(n),
                                          lambda u: jnp.sum(u["b1"])))(theta)
  assert np.all(np.asarray(w) == 0)
