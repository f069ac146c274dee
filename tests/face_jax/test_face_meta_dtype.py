"""bfloat16 models: the meta-gradient's direction against float32, and the float32 meta passes.

Measured on the test model (tests/face_jax/face_tiny.py), meta passes in bfloat16 vs float32:
seed 0 at initialisation cosine 0.68 (the majority-group component flips sign; 0.96 for a
random phi); seed 1 at initialisation 1.0000; every state after 1, 2, 5, 10, 20 steps of
either seed >= 0.9999. Below 0.99 once, so the meta passes run in float32 by default
(config.mvcom.meta_dtype = "float32"; "model" keeps bfloat16).
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from face_tiny import make_task, tiny_config


def _setup(dtype, meta_dtype="float32"):
  config = tiny_config("")
  config.model.dtype = dtype
  config.mvcom.meta_dtype = meta_dtype
  task = make_task(config)
  state = jax.jit(lambda r: nn.meta.unbox(task.init(r)))(jax.random.key(0))
  return task, task.train_step.__self__, state


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def _cosine(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def problem():
  """f32 / bf16-compute / bf16-model-with-f32-meta steps, a state after one step, a batch."""
  task, f32, state0 = _setup("float32")
  _, bf16, _ = _setup("bfloat16", meta_dtype="model")
  _, mixed, _ = _setup("bfloat16")
  batch0, batch1 = next(task.train_data), next(task.train_data)
  state1, _ = jax.jit(f32.train_step)(state0, batch0)
  grads = {name: jax.jit(jax.grad(s.meta_objective)) for name, s in
           (("f32", f32), ("bf16", bf16), ("mixed", mixed))}
  return dict(steps=dict(f32=f32, bf16=bf16, mixed=mixed), grads=grads,
              states=(state0, state1), batches=(batch0, batch1))


def test_bf16_meta_gradient_direction(problem):
  rng = jax.random.key(3)
  for t, (state, batch) in enumerate(zip(problem["states"], problem["batches"])):
    phi = state.extras["margin"]
    g32 = _flat(problem["grads"]["f32"](phi, state, batch, rng))
    g16 = _flat(problem["grads"]["bf16"](phi, state, batch, rng))
    assert np.linalg.norm(g32) > 0
    assert np.linalg.norm(g16 - g32) > 1e-3 * np.linalg.norm(g32)   # bf16 really computed
    print(f"step {t}: cosine(bf16 meta-gradient, float32) = {_cosine(g16, g32):.5f}")
    if t == 1:   # trained one step: the directions agree
      assert _cosine(g16, g32) >= 0.99


def test_meta_passes_run_in_float32_for_a_bf16_model(problem):
  rng = jax.random.key(3)
  mixed, f32 = problem["steps"]["mixed"], problem["steps"]["f32"]
  assert mixed.meta_view is not mixed and mixed.meta_view.model.backbone.dtype == np.float32
  assert mixed.model.backbone.dtype == jax.numpy.bfloat16
  assert f32.meta_view is f32 and problem["steps"]["bf16"].meta_view is problem["steps"]["bf16"]
  for state, batch in zip(problem["states"], problem["batches"]):
    phi = state.extras["margin"]
    g32 = _flat(problem["grads"]["f32"](phi, state, batch, rng))
    g = _flat(problem["grads"]["mixed"](phi, state, batch, rng))
    assert _cosine(g, g32) >= 0.9999
    np.testing.assert_allclose(g, g32, rtol=1e-4, atol=1e-4 * np.abs(g32).max())
  # ... while the real step still computes in bfloat16.
  state, batch = problem["states"][1], problem["batches"][1]
  loss = lambda s: float(s.train_loss(state.params, state.extras["batch_stats"], batch,
                                      jax.random.key(1), state.extras["margin"])[0])
  assert abs(loss(mixed) - loss(f32)) > 1e-6


def test_unknown_meta_dtype_is_named():
  config = tiny_config("")
  config.mvcom.meta_dtype = "float16"
  with pytest.raises(ValueError, match="meta_dtype='float16'"):
    make_task(config)
