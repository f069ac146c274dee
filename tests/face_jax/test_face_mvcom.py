"""The class + sample margin model: gradients by finite differences, the margin bound for
any input, continuous degrees, the LDAM-shaped class prior and the hand-set margins."""

import jax
import jax.numpy as jnp
import numpy as np

from face_jax import margins, mvcom

FACTORS = (("group", 3), ("pose", 1), ("occlusion", 1), ("blur", 1))


def _batch(n, rng, degrees=True):
  out = {"label": rng.integers(0, 5, n), "group": rng.integers(0, 3, n),
         "class_prior": rng.uniform(-1, 1, n)}
  for v in ("pose", "occlusion", "blur"):
    flag = rng.random(n) < 0.5
    out[v] = flag.astype(np.int32)
    if degrees:
      out[f"{v}_degree"] = np.where(flag, rng.uniform(0.3, 1.0, n), 0.0)
  return {k: jnp.asarray(v) for k, v in out.items()}


def test_class_and_sample_margin_gradients_match_finite_differences():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    batch = _batch(10, rng)
    batch["class_prior"] = batch["class_prior"].astype(jnp.float64)
    cos = jnp.asarray(rng.uniform(-0.5, 0.9, (10, 5)))
    model = mvcom.AdditiveMargin(FACTORS, base=0.35, bound=0.3, class_bound=0.2)
    attrs = mvcom.oracle_attributes(batch, FACTORS, degrees=True)
    assert float(attrs["blur"].max()) < 1 and len(np.unique(np.asarray(attrs["blur"]))) > 2

    def loss(phi):
      m = model.apply({"params": phi}, {k: v.astype(jnp.float64) for k, v in attrs.items()},
                      batch["class_prior"])
      z = margins.cosface_logits(cos, batch["label"], s=16.0, m=m)
      return jnp.mean(margins.cross_entropy(z, batch["label"]))

    phi = {"group": jnp.asarray([0.3, -0.2, 0.5]), "pose": jnp.asarray([0.1]),
           "occlusion": jnp.asarray([-0.4]), "blur": jnp.asarray([0.7]), "class": jnp.asarray(0.2)}
    grad = jax.grad(loss)(phi)
    loss = jax.jit(loss)
    h = 1e-6
    for name, leaf in phi.items():
      for j in range(leaf.size):
        e = jnp.zeros(leaf.shape).at[np.unravel_index(j, leaf.shape)].set(h)
        fd = (loss({**phi, name: leaf + e}) - loss({**phi, name: leaf - e})) / (2 * h)
        assert abs(float(np.ravel(grad[name])[j]) - float(fd)) < 1e-7 * max(1.0, abs(float(fd))), name
    assert abs(float(grad["class"])) > 1e-4 and abs(float(grad["blur"][0])) > 1e-4


def test_margin_bound_holds_for_any_input():
  rng = np.random.default_rng(1)
  model = mvcom.AdditiveMargin(FACTORS, base=0.35, bound=0.3, class_bound=0.2)
  attrs = {"group": jnp.asarray(rng.normal(size=(50, 3)) * 3, jnp.float32),
           **{v: jnp.asarray(rng.normal(size=(50, 1)) * 3, jnp.float32)
              for v in ("pose", "occlusion", "blur")}}
  prior = jnp.asarray(rng.normal(size=50) * 5, jnp.float32)
  for sign in (1.0, -1.0):
    phi = {"group": jnp.full((3,), 50.0 * sign), "pose": jnp.full((1,), 50.0 * sign),
           "occlusion": jnp.full((1,), 50.0 * sign), "blur": jnp.full((1,), 50.0 * sign),
           "class": jnp.asarray(50.0 * sign)}
    m = np.asarray(model.apply({"params": phi}, attrs, prior))
    assert np.all(np.abs(m - 0.35) <= 0.2 + 4 * 0.3 + 1e-6)
    assert np.max(np.abs(m - 0.35)) > 0.9   # the bound is approached, not a loose cap


def test_class_prior_has_ldam_shape():
  q = mvcom.class_prior(np.array([2, 4, 8, 16, 100]))
  assert np.argmax(q) == 0 and np.argmin(q) == 4
  assert abs(q.mean()) < 1e-6 and np.isclose(np.abs(q).max(), 1.0)
  np.testing.assert_array_equal(mvcom.class_prior(np.array([5, 5, 5])), 0.0)


def test_fixed_margins_equal_a_hand_computation():
  rng = np.random.default_rng(2)
  batch = _batch(20, rng)
  offsets = {"group": (0.0, 0.1, -0.05), "pose": 0.02, "occlusion": -0.1, "blur": 0.2,
             "class_prior": 0.05}
  b = {k: np.asarray(v) for k, v in batch.items()}
  for degrees in (False, True):
    got = np.asarray(mvcom.fixed_margins(batch, 0.35, offsets, degrees=degrees))
    v = {name: b[f"{name}_degree"] if degrees else b[name] for name in ("pose", "occlusion", "blur")}
    want = (0.35 + np.array(offsets["group"])[b["group"]] + 0.02 * v["pose"] - 0.1 * v["occlusion"]
            + 0.2 * v["blur"] + 0.05 * b["class_prior"])
    np.testing.assert_allclose(got, want, rtol=1e-6)
  none = {"group": (), "pose": 0.0, "occlusion": 0.0, "blur": 0.0, "class_prior": 0.0}
  np.testing.assert_allclose(np.asarray(mvcom.fixed_margins({"label": batch["label"]}, 0.35, none)), 0.35)
