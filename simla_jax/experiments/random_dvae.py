"""A random-weight DALL-E dVAE encoder saved as a state-dict `.npz`, for the MIM-target
study when no official weights are given (the targets are then a fixed random function of
the half-resolution view's pixels, not the official codebook: say so wherever it is used)."""

import numpy as np

from simla_jax.data import dvae


def state_dict(params) -> dict[str, np.ndarray]:
  """Flax encoder params -> the `dall_e.Encoder` state dict (`blocks.*.w` OIHW, `.b`): the
  inverse of `dvae.convert_state_dict`."""
  out = {}

  def put(path: tuple[str, ...], leaf):
    *module, name = path
    suffix = "w" if name == "kernel" else "b"
    array = np.asarray(leaf, np.float32)
    if name == "kernel":
      array = array.transpose(3, 2, 0, 1)          # HWIO -> OIHW
    if module == ["input"]:
      key = "blocks.input"
    elif module == ["output"]:
      key = "blocks.output.conv"
    else:
      group, _, block = module[0].rpartition("_block_")
      inner = "id_path" if module[1] == "id_path" else f"res_path.{module[1]}"
      key = f"blocks.{group}.block_{block}.{inner}"
    out[f"{key}.{suffix}"] = array

  def walk(node, path):
    for k, v in node.items():
      walk(v, path + (k,)) if isinstance(v, dict) else put(path + (k,), v)

  walk(params, ())
  return out


def write(path: str, mim_cfg, seed: int = 0) -> str:
  """Writes a random-weight encoder for `mim_cfg`'s sizes to `path` (.npz); returns it."""
  np.savez(path, **state_dict(dvae.random_params(mim_cfg, seed)))
  return path
