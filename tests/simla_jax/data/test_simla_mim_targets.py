"""MIM targets: frozen random projection (determinism, shape, invariances) and dVAE."""

import jax
import numpy as np
import pytest

from simla_jax.data import default_data_config, dvae
from simla_jax.data.mim_targets import MimTargeter


def _images(seed, b=3, size=64):
  return np.random.default_rng(seed).standard_normal((b, size, size, 3)).astype(np.float32)


def test_random_projection_is_deterministic_with_shape_and_range():
  cfg = default_data_config().mim
  targeter = MimTargeter(cfg)
  s1, s2 = targeter.init_state(), targeter.init_state()
  for k in s1:
    np.testing.assert_array_equal(s1[k], s2[k])
  assert s1["projection"].shape == (16 * 16 * 3, cfg.projection_dim)
  assert s1["codebook"].shape == (cfg.codebook_size, cfg.projection_dim)
  batch = {"image": _images(0)}
  tokens = np.asarray(jax.jit(targeter)(s1, batch))
  assert tokens.shape == (3, 16) and tokens.dtype == np.int32
  assert tokens.min() >= 0 and tokens.max() < targeter.vocab_size == cfg.codebook_size
  np.testing.assert_array_equal(tokens, np.asarray(targeter(s2, batch)))
  assert len(np.unique(tokens)) > 8  # random patches spread over the codebook
  cfg.projection_seed = 1
  other = MimTargeter(cfg)
  assert not np.array_equal(np.asarray(other(other.init_state(), batch)), tokens)


def test_random_projection_matches_numpy_and_is_patch_local():
  cfg = default_data_config().mim
  targeter = MimTargeter(cfg)
  state = targeter.init_state()
  images = _images(1)
  tokens = np.asarray(targeter(state, {"image": images}))
  # Independent numpy computation of patch (row 1, col 2) of image 2.
  patch = images[2, 16:32, 32:48].reshape(-1)
  patch = (patch - patch.mean()) / np.sqrt(patch.var() + cfg.norm_eps)
  scores = (patch @ state["projection"]) @ state["codebook"].T
  assert tokens[2, 1 * 4 + 2] == np.argmax(scores)
  # Per-patch normalisation: a brightness / contrast change of one patch keeps its
  # token (up to eps) and leaves the other patches alone.
  edited = images.copy()
  edited[0, :16, :16] = 3.0 * edited[0, :16, :16] + 0.7
  cfg.norm_eps = 1e-8
  exact = MimTargeter(cfg)
  np.testing.assert_array_equal(np.asarray(exact(state, {"image": edited})),
                                np.asarray(exact(state, {"image": images})))


def test_dvae_targets_from_half_resolution_view():
  cfg = default_data_config().mim
  cfg.update(target="dvae", dvae_n_hid=64, dvae_vocab_size=512)
  targeter = MimTargeter(cfg)
  assert targeter.input_key == "dvae_image" and targeter.vocab_size == 512
  encoder = dvae.encoder_from_config(cfg)
  params = dvae.random_params(cfg, seed=0)
  state = targeter.init_state(dvae_params=params)
  x = np.random.default_rng(0).uniform(0.1, 0.9, (2, 32, 32, 3)).astype(np.float32)
  tokens = np.asarray(targeter(state, {"dvae_image": x}))
  logits = np.asarray(encoder.apply({"params": params}, x))
  assert logits.shape == (2, 4, 4, 512) and tokens.shape == (2, 16)
  np.testing.assert_array_equal(tokens, logits.argmax(-1).reshape(2, 16))
  with pytest.raises(ValueError, match="dvae_weights"):
    targeter.init_state()
