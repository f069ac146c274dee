"""DALL-E dVAE encoder (OpenAI `dall_e.Encoder`) in Flax, and its weight converters.

Architecture (as the `dall-e` package builds it, NHWC here):
  input   conv 7x7, 3 -> n_hid
  group_g for g = 1..4 with width w_g = 2^(g-1) n_hid: `n_blk_per_group` blocks
          (the first takes the previous width), then 2x2 max-pool after groups 1-3
  output  ReLU, conv 1x1 -> vocab_size logits
Block(n_in -> n_out): id_path (1x1 conv if n_in != n_out, else identity) +
  post_gain * [ReLU, conv3x3 -> n_out/4, ReLU, conv3x3, ReLU, conv3x3, ReLU, conv1x1 -> n_out]
  with post_gain = 1 / (group_count * n_blk_per_group)^2. Convs pad (k-1)/2, have bias,
  and are initialised N(0, 1/(n_in k^2)), bias 0.
An (B, H, W, 3) image in `map_pixels` range gives (B, H/8, W/8, vocab) logits; MIM
targets are their argmax (official `get_codebook_indices`).

Weights: `load_encoder_params(path, cfg)` reads
  - a PyTorch state dict saved with `torch.save(encoder.state_dict(), f)` (loaded with
    `torch.load(weights_only=True)`), optionally nested under "state_dict" / "model";
  - the official `encoder.pkl`, a pickled whole `dall_e.Encoder` module: loaded with
    `weights_only=True` where the module classes it names are replaced by inert
    records (no code from the pickle runs); any other global is refused;
  - a `.npz` of the state dict (no torch needed).
`convert_state_dict(sd, cfg)` maps `blocks.*.w` (OIHW) / `.b` to the Flax tree.
"""

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_KERNEL_AXES = (None, None, "conv_in", "conv_out")
_BIAS_AXES = ("conv_out",)


def _conv(features: int, kernel: int, name: str) -> nn.Conv:
  return nn.Conv(
      features, (kernel, kernel), padding=(kernel - 1) // 2, name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "normal"), _KERNEL_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), _BIAS_AXES))


class EncoderBlock(nn.Module):
  n_out: int
  post_gain: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_hid = self.n_out // 4
    identity = x if x.shape[-1] == self.n_out else _conv(self.n_out, 1, "id_path")(x)
    h = _conv(n_hid, 3, "conv_1")(nn.relu(x))
    h = _conv(n_hid, 3, "conv_2")(nn.relu(h))
    h = _conv(n_hid, 3, "conv_3")(nn.relu(h))
    h = _conv(self.n_out, 1, "conv_4")(nn.relu(h))
    return identity + self.post_gain * h


class DalleEncoder(nn.Module):
  """dVAE encoder: (B, H, W, C) float32 -> (B, H/8, W/8, vocab_size) logits."""
  n_hid: int = 256
  n_blk_per_group: int = 2
  group_count: int = 4
  vocab_size: int = 8192

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.group_count != 4:
      raise ValueError("DalleEncoder: the DALL-E layout has exactly 4 groups")
    post_gain = 1.0 / (self.group_count * self.n_blk_per_group) ** 2
    x = _conv(self.n_hid, 7, "input")(x)
    for g in range(1, 5):
      width = 2 ** (g - 1) * self.n_hid
      for i in range(self.n_blk_per_group):
        x = EncoderBlock(width, post_gain, name=f"group_{g}_block_{i + 1}")(x)
      if g < 4:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return _conv(self.vocab_size, 1, "output")(nn.relu(x))


def encoder_from_config(mim_cfg: Any) -> DalleEncoder:
  return DalleEncoder(n_hid=int(mim_cfg.dvae_n_hid),
                      n_blk_per_group=int(mim_cfg.dvae_n_blk_per_group),
                      group_count=int(mim_cfg.dvae_group_count),
                      vocab_size=int(mim_cfg.dvae_vocab_size))


def codebook_indices(params: Any, images: jax.Array, encoder: DalleEncoder) -> jax.Array:
  """(B, H, W, 3) `map_pixels` images -> (B, H/8 * W/8) int32 tokens, row-major."""
  logits = encoder.apply({"params": params}, images)
  return jnp.argmax(logits, axis=-1).reshape(images.shape[0], -1).astype(jnp.int32)


def random_params(mim_cfg: Any, seed: int = 0) -> dict:
  """Freshly initialised encoder params (the package's init), drawn with numpy.

  Same distribution as `DalleEncoder.init` (kernels N(0, 1/fan_in), biases 0) without
  compiling a JAX initialiser for every layer shape.
  """
  encoder = encoder_from_config(mim_cfg)
  abstract = nn.unbox(jax.eval_shape(
      encoder.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.float32))["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "bias":
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


# -- weights ---------------------------------------------------------------------------
def _flax_path(torch_key: str) -> tuple[str, ...]:
  """`blocks.group_1.block_2.res_path.conv_3.w` -> ("group_1_block_2", "conv_3", "kernel")."""
  parts = torch_key.split(".")
  if parts[0] != "blocks" or parts[-1] not in ("w", "b"):
    raise KeyError(torch_key)
  leaf = "kernel" if parts[-1] == "w" else "bias"
  body = parts[1:-1]
  if body == ["input"]:
    return ("input", leaf)
  if body == ["output", "conv"]:
    return ("output", leaf)
  if len(body) == 3 and body[0].startswith("group_") and body[2] == "id_path":
    return (f"{body[0]}_{body[1]}", "id_path", leaf)
  if len(body) == 4 and body[0].startswith("group_") and body[2] == "res_path":
    return (f"{body[0]}_{body[1]}", body[3], leaf)
  raise KeyError(torch_key)


def convert_state_dict(state_dict: Mapping[str, Any], mim_cfg: Any) -> dict:
  """PyTorch `Encoder.state_dict()` (tensors or arrays) -> Flax params (float32).

  Checks that every parameter of the configured encoder is present with the right
  shape and that no key is left over; errors name the key.
  """
  encoder = encoder_from_config(mim_cfg)
  abstract = jax.eval_shape(
      encoder.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.float32))["params"]
  abstract = nn.unbox(abstract)
  expected = {tuple(k.key for k in path): leaf.shape
              for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  params: dict = {}
  for key, value in state_dict.items():
    try:
      path = _flax_path(key)
    except KeyError:
      raise KeyError(f"dvae: unexpected state-dict key {key!r}") from None
    if path not in expected:
      raise KeyError(f"dvae: state-dict key {key!r} has no place in an encoder with "
                     f"n_hid={mim_cfg.dvae_n_hid}, n_blk_per_group={mim_cfg.dvae_n_blk_per_group}")
    array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value,
                       np.float32)
    if path[-1] == "kernel":
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if array.shape != expected[path]:
      raise ValueError(f"dvae: {key!r} has shape {array.shape} after conversion, "
                       f"expected {expected[path]}")
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = array
  missing = sorted("/".join(p) for p in expected
                   if _get(params, p) is None)
  if missing:
    raise KeyError(f"dvae: state dict lacks parameters {missing[:5]}"
                   f"{' ...' if len(missing) > 5 else ''}")
  return params


def _get(tree, path):
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return None
    tree = tree[p]
  return tree


# Globals of a pickled `dall_e.Encoder` module besides the tensor machinery that
# `torch.load(weights_only=True)` already accepts. Each becomes an inert record.
_MODULE_CLASSES = (
    "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.linear.Identity",
)


class _ModuleRecord:
  """Stands in for a pickled torch module: keeps its `__dict__`, runs nothing."""

  def __setstate__(self, state):
    self.state = state


def _flatten_module(record: _ModuleRecord, prefix: str = "") -> dict[str, Any]:
  state = record.state if isinstance(record, _ModuleRecord) else {}
  out = {}
  for name, value in (state.get("_parameters") or {}).items():
    if value is not None:
      out[prefix + name] = value
  for name, child in (state.get("_modules") or {}).items():
    if child is not None:
      out.update(_flatten_module(child, f"{prefix}{name}."))
  return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a dVAE encoder state dict from `.npz`, a torch state dict, or encoder.pkl."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"dvae: weights file {path} does not exist")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  import torch  # pylint: disable=g-import-not-at-top  (dev dependency, only for .pt/.pkl)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as plain_error:  # pylint: disable=broad-except
    records = {name: type(name.rsplit(".", 1)[1], (_ModuleRecord,), {})
               for name in _MODULE_CLASSES}
    try:
      with torch.serialization.safe_globals([(cls, name) for name, cls in records.items()]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"dvae: refusing {path}: it is neither a tensor state dict nor a pickled "
          f"dall_e Encoder made only of {', '.join(_MODULE_CLASSES)} "
          f"({type(plain_error).__name__}: {str(plain_error).splitlines()[0][:200]}; "
          f"{type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
  if isinstance(obj, _ModuleRecord):
    obj = _flatten_module(obj)
  if isinstance(obj, Mapping):
    for nest in ("state_dict", "model"):
      if nest in obj and isinstance(obj[nest], Mapping):
        obj = obj[nest]
  if not isinstance(obj, Mapping):
    raise ValueError(f"dvae: {path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "detach"):
      raise ValueError(f"dvae: {path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().cpu().float().numpy()
  return out


def load_encoder_params(path: str, mim_cfg: Any) -> dict:
  """Flax params of the dVAE encoder from a weights file (see module docstring)."""
  try:
    return convert_state_dict(load_state_dict(path), mim_cfg)
  except (KeyError, ValueError) as e:
    raise type(e)(f"{path}: {e}") from e
