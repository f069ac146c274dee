"""DALL-E dVAE encoder port: parity with the `dall-e` package and safe weight loading."""

import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from simla_jax.data import default_data_config, dvae

torch = pytest.importorskip("torch")
dall_e = pytest.importorskip("dall_e")


def _small_cfg():
  cfg = default_data_config().mim
  cfg.update(dvae_n_hid=64, dvae_vocab_size=512)  # the package's minimum sizes
  return cfg


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  encoder = dall_e.Encoder(n_hid=64, vocab_size=512)
  # Non-zero biases so that the bias conversion is exercised too.
  with torch.no_grad():
    for name, p in encoder.named_parameters():
      if name.endswith(".b"):
        p.normal_(std=0.1)
  return encoder


def test_logits_match_dall_e_encoder(reference):
  cfg = _small_cfg()
  params = dvae.convert_state_dict(reference.state_dict(), cfg)
  x = np.random.default_rng(0).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
  x = 0.8 * x + 0.1  # map_pixels
  with torch.no_grad():
    ref = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  out = np.asarray(dvae.encoder_from_config(cfg).apply({"params": params}, jnp.asarray(x)))
  assert out.shape == ref.shape == (1, 8, 8, 512)
  err = np.abs(out - ref).max()
  print(f"dVAE max abs logit error {err:.3g} (logit scale {np.abs(ref).max():.3g})")
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))


def test_loads_state_dict_npz_and_whole_module_pickle(reference, tmp_path):
  cfg = _small_cfg()
  expected = dvae.convert_state_dict(reference.state_dict(), cfg)
  torch.save(reference.state_dict(), tmp_path / "sd.pt")
  torch.save(reference, tmp_path / "encoder.pkl")  # what the official encoder.pkl is
  np.savez(tmp_path / "sd.npz", **{k: v.numpy() for k, v in reference.state_dict().items()})
  for name in ("sd.pt", "encoder.pkl", "sd.npz"):
    got = dvae.load_encoder_params(str(tmp_path / name), cfg)
    for path in [("input", "kernel"), ("group_4_block_2", "conv_3", "bias"),
                 ("group_2_block_1", "id_path", "kernel"), ("output", "kernel")]:
      a, b = got, expected
      for p in path:
        a, b = a[p], b[p]
      np.testing.assert_array_equal(a, b)


class _Evil:
  def __reduce__(self):
    return (print, ("pwned",))


def test_refuses_unsafe_pickles(tmp_path, capsys):
  cfg = _small_cfg()
  path = tmp_path / "evil.pkl"
  torch.save({"blocks.input.w": _Evil()}, path)
  with pytest.raises(ValueError, match="evil.pkl"):
    dvae.load_encoder_params(str(path), cfg)
  raw = tmp_path / "raw.pkl"
  raw.write_bytes(pickle.dumps(_Evil()))
  with pytest.raises(ValueError, match="raw.pkl"):
    dvae.load_encoder_params(str(raw), cfg)
  assert "pwned" not in capsys.readouterr().out


def test_conversion_errors_name_the_key(reference):
  cfg = _small_cfg()
  sd = dict(reference.state_dict())
  del sd["blocks.group_3.block_1.res_path.conv_2.b"]
  with pytest.raises(KeyError, match="group_3_block_1/conv_2/bias"):
    dvae.convert_state_dict(sd, cfg)
  sd = dict(reference.state_dict())
  sd["blocks.extra.w"] = sd["blocks.input.w"]
  with pytest.raises(KeyError, match="blocks.extra.w"):
    dvae.convert_state_dict(sd, cfg)
  cfg.dvae_n_hid = 128
  with pytest.raises(ValueError, match="blocks.input.w"):
    dvae.convert_state_dict(reference.state_dict(), cfg)
