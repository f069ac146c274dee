"""arcface_torch IResNet checkpoints (`.pth`) -> Flax variables of `face_jax.models.iresnet`.

insightface's `recognition/arcface_torch` saves the backbone's `state_dict()` (`model.pt`;
training checkpoints wrap it as {"state_dict_backbone": ...}; DDP adds "module."). The
key layout and the transforms are in `face_jax/models/iresnet.py`'s docstring: conv
kernels (O, I, kh, kw) -> (kh, kw, I, O); the head Linear's input is reordered from
torch's NCHW flatten to Flax's NHWC flatten; BatchNorm weight/bias/running stats ->
scale/bias (params) and mean/var (batch_stats); PReLU weight -> alpha. The last
BatchNorm1d's scale is frozen at 1 in arcface_torch and absent in Flax: it is checked.

The expected keys come from the Flax model itself (`jax.eval_shape` of its init), so
every variable is filled exactly once; a missing, unexpected or mis-shaped key raises
`CheckpointError` naming the key and both shapes. Files are read with
`torch.load(..., weights_only=True)`; torch is imported only for that.
"""

import os
from typing import Any, Mapping, Sequence, Union

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from face_jax.models.iresnet import IResNet

PathLike = Union[str, os.PathLike]
Variables = dict[str, Any]            # {"params": ..., "batch_stats": ...}

# arcface_torch keys with no Flax variable: BatchNorm step counters, and the frozen
# (all-ones) scale of the embedding BatchNorm1d.
_IGNORED_SUFFIX = ".num_batches_tracked"
_FROZEN_SCALE = "features.weight"
_WRAPPERS = ("state_dict_backbone", "state_dict", "model")
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "alpha"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


class CheckpointError(ValueError):
  """A checkpoint does not fit the model; the message names every offending key."""


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """`.pth` -> {key: float32 array}, unwrapping training checkpoints and DDP prefixes."""
  import pickle  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{path}: not a weights-only PyTorch checkpoint (torch.load with "
                          f"weights_only=True refused it: {first})") from None
  for key in _WRAPPERS:
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    name = key[len("module."):] if key.startswith("module.") else key
    out[name] = value.detach().cpu().float().numpy() if value.is_floating_point() \
        else value.detach().cpu().numpy()
  return out


def _torch_key(flax_path: Sequence[str]) -> str:
  """('params', 'layer2_0', 'downsample_1', 'scale') -> 'layer2.0.downsample.1.weight'."""
  collection, *modules, leaf = flax_path
  parts = []
  for m in modules:
    head, sep, tail = m.rpartition("_")
    parts += [head, tail] if sep and tail.isdigit() else [m]
  return ".".join(parts + [_LEAF_NAMES[(collection, leaf)]])


def _feature_map(model: IResNet, image_size: Sequence[int]) -> tuple[int, int]:
  """Spatial size before the head: every stage halves it (3x3 conv, stride 2, pad 1)."""
  h, w = image_size
  for _ in model.layers:
    h, w = (h + 1) // 2, (w + 1) // 2
  return h, w


def iresnet_variables(state_dict: Mapping[str, np.ndarray], model: IResNet,
                      image_size: Sequence[int] = (112, 112), source: str = "checkpoint"
                      ) -> Variables:
  """arcface_torch state dict -> {"params", "batch_stats"} for `model` (numpy float32).

  Args:
    state_dict: {torch key: array}, e.g. from `read_state_dict`.
    model: the Flax IResNet whose variables to fill (its layers/widths/embed_dim must
      match the checkpoint's architecture).
    image_size: input (H, W) the model is used at; fixes the head's input size.
    source: name used in error messages (the file).
  """
  images = jnp.zeros((1, *image_size, 3), jnp.float32)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False)))
  template = traverse_util.flatten_dict(abstract)
  channels = template[("params", "bn2", "scale")].shape[0]
  height, width = _feature_map(model, image_size)

  def to_flax(key: str, path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
      return value
    if value.ndim == 4:                     # conv (O, I, kh, kw) -> (kh, kw, I, O)
      return value.transpose(2, 3, 1, 0)
    embed = value.shape[0]                  # head Linear (E, C*H*W) -> (H*W*C, E)
    if value.shape[1] != channels * height * width:
      return value.T                        # wrong size: reported by the shape check
    return (value.reshape(embed, channels, height, width).transpose(2, 3, 1, 0)
            .reshape(height * width * channels, embed))

  def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] != "kernel":
      return shape
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]

  problems, variables, used = [], {}, set()
  for path, leaf in template.items():
    key = _torch_key(path)
    want = torch_shape(path, tuple(leaf.shape))
    flax_name = "/".join(path)
    if key not in state_dict:
      problems.append(f"missing key {key!r}: the model expects shape {want} "
                      f"(Flax {flax_name} {tuple(leaf.shape)})")
      continue
    used.add(key)
    value = np.asarray(state_dict[key])
    if tuple(value.shape) != want:
      problems.append(f"key {key!r} has shape {tuple(value.shape)} in the checkpoint, the model "
                      f"expects {want} (Flax {flax_name} {tuple(leaf.shape)})")
      continue
    variables[path] = np.ascontiguousarray(to_flax(key, path, value), dtype=np.float32)

  if _FROZEN_SCALE in state_dict:
    used.add(_FROZEN_SCALE)
    scale = np.asarray(state_dict[_FROZEN_SCALE])
    if not np.all(scale == 1):
      problems.append(f"key {_FROZEN_SCALE!r} must be all ones (arcface_torch freezes it; the "
                      f"Flax model has no such scale) but ranges over [{scale.min():.6g}, "
                      f"{scale.max():.6g}]")
  for key in sorted(set(state_dict) - used):
    if not key.endswith(_IGNORED_SUFFIX):
      problems.append(f"unexpected key {key!r} with shape {tuple(np.shape(state_dict[key]))}: "
                      "the model has no such variable")
  if problems:
    shown = "\n  ".join(problems[:30])
    more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
    raise CheckpointError(f"{source} does not fit IResNet(layers={tuple(model.layers)}, "
                          f"widths={tuple(model.widths)}, embed_dim={model.embed_dim}) at "
                          f"{tuple(image_size)}:\n  {shown}{more}")
  return traverse_util.unflatten_dict(variables)


def load_iresnet_checkpoint(path: PathLike, model: IResNet,
                            image_size: Sequence[int] = (112, 112)) -> Variables:
  """arcface_torch `.pth` -> {"params", "batch_stats"}: `model.apply(variables, x)`."""
  return iresnet_variables(read_state_dict(path), model, image_size, source=os.fspath(path))
