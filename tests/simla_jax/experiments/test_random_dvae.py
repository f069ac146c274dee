"""The random-weight dVAE writes a state dict that the official-weights loader reads back."""

import jax
import numpy as np

from simla_jax.data import default_data_config
from simla_jax.data import dvae
from simla_jax.experiments import random_dvae


def test_random_dvae_round_trips_through_the_loader(tmp_path):
  mim = default_data_config().mim
  mim.dvae_n_hid = 8
  mim.dvae_vocab_size = 16
  params = dvae.random_params(mim, seed=3)
  path = random_dvae.write(str(tmp_path / "random.npz"), mim, seed=3)
  state = dict(np.load(path))
  assert "blocks.input.w" in state and "blocks.output.conv.b" in state
  assert "blocks.group_2.block_1.id_path.w" in state          # 8 -> 16 channels
  assert "blocks.group_1.block_1.res_path.conv_4.w" in state
  loaded = dvae.load_encoder_params(path, mim)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
