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

Both layouts of the Flax model are read and written: with `scan_layers` the torch keys
`layerS.1 ... layerS.<n-1>` are stacked into `layerS_blocks` (axis 0) and split again by
`iresnet_state_dict`, the way back to a torch state dict; `relayout` moves variables
between a scanned and an unrolled model through it.
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
_STACK_SUFFIX = "_blocks"    # IResNet(scan_layers=True): layerS_blocks = blocks 1.. of stage S
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


def _torch_modules(modules: Sequence[str]) -> list[str]:
  """('layer2_0', 'downsample_1') -> ['layer2', '0', 'downsample', '1']."""
  parts = []
  for m in modules:
    head, sep, tail = m.rpartition("_")
    parts += [head, tail] if sep and tail.isdigit() else [m]
  return parts


def _torch_keys(flax_path: Sequence[str], layers: Sequence[int]) -> list[str]:
  """Flax path -> the torch key(s) it holds, in stacking order.

  ('params', 'layer2_0', 'downsample_1', 'scale') -> ['layer2.0.downsample.1.weight'];
  a scanned stack ('params', 'layer2_blocks', 'conv1', 'kernel') of stage 2 with 4 blocks
  -> ['layer2.1.conv1.weight', 'layer2.2.conv1.weight', 'layer2.3.conv1.weight'].
  """
  collection, first, *modules, leaf = flax_path
  rest = _torch_modules(modules) + [_LEAF_NAMES[(collection, leaf)]]
  if first.endswith(_STACK_SUFFIX):
    stage = first[:-len(_STACK_SUFFIX)]                 # 'layer2'
    blocks = layers[int(stage[len("layer"):]) - 1]
    return [".".join([stage, str(i), *rest]) for i in range(1, blocks)]
  return [".".join(_torch_modules([first]) + rest)]


def _feature_map(model: IResNet, image_size: Sequence[int]) -> tuple[int, int]:
  """Spatial size before the head: every stage halves it (3x3 conv, stride 2, pad 1)."""
  h, w = image_size
  for _ in model.layers:
    h, w = (h + 1) // 2, (w + 1) // 2
  return h, w


class _Layout:
  """The Flax model's variables and how each maps onto torch keys and shapes."""

  def __init__(self, model: IResNet, image_size: Sequence[int]):
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    abstract = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.key(0), images, train=False)))
    self.template = {path: tuple(leaf.shape)
                     for path, leaf in traverse_util.flatten_dict(abstract).items()}
    self.channels = self.template[("params", "bn2", "scale")][0]
    self.height, self.width = _feature_map(model, image_size)
    self.layers = tuple(model.layers)

  def keys(self, path) -> list[str]:
    return _torch_keys(path, self.layers)

  @staticmethod
  def stacked(path) -> bool:
    return path[1].endswith(_STACK_SUFFIX)

  def torch_shape(self, path) -> tuple[int, ...]:
    """One torch tensor's shape for this Flax leaf (one block's, if stacked)."""
    shape = self.template[path][1:] if self.stacked(path) else self.template[path]
    if path[-1] != "kernel":
      return shape
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]

  def to_flax(self, path, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
      return value
    if value.ndim == 4:                     # conv (O, I, kh, kw) -> (kh, kw, I, O)
      return value.transpose(2, 3, 1, 0)
    embed = value.shape[0]                  # head Linear (E, C*H*W) -> (H*W*C, E)
    c, h, w = self.channels, self.height, self.width
    return value.reshape(embed, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, embed)

  def to_torch(self, path, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
      return value
    if value.ndim == 4:                     # conv (kh, kw, I, O) -> (O, I, kh, kw)
      return value.transpose(3, 2, 0, 1)
    embed = value.shape[-1]                 # head Linear (H*W*C, E) -> (E, C*H*W)
    c, h, w = self.channels, self.height, self.width
    return value.reshape(h, w, c, embed).transpose(3, 2, 0, 1).reshape(embed, c * h * w)


def _describe(model: IResNet, image_size: Sequence[int]) -> str:
  return (f"IResNet(layers={tuple(model.layers)}, widths={tuple(model.widths)}, "
          f"embed_dim={model.embed_dim}, scan_layers={model.scan_layers}) at {tuple(image_size)}")


def iresnet_variables(state_dict: Mapping[str, np.ndarray], model: IResNet,
                      image_size: Sequence[int] = (112, 112), source: str = "checkpoint"
                      ) -> Variables:
  """arcface_torch state dict -> {"params", "batch_stats"} for `model` (numpy float32).

  With `model.scan_layers` the blocks after each stage's first are stacked on a leading
  axis (`layerS_blocks`), otherwise one entry per block (`layerS_<i>`).

  Args:
    state_dict: {torch key: array}, e.g. from `read_state_dict`.
    model: the Flax IResNet whose variables to fill (its layers/widths/embed_dim must
      match the checkpoint's architecture).
    image_size: input (H, W) the model is used at; fixes the head's input size.
    source: name used in error messages (the file).
  """
  layout = _Layout(model, image_size)
  problems, variables, used = [], {}, set()
  for path, shape in layout.template.items():
    want = layout.torch_shape(path)
    flax_name = "/".join(path)
    where = f"Flax {flax_name} {shape}"
    blocks = []
    for i, key in enumerate(layout.keys(path)):
      if layout.stacked(path):
        where = f"Flax {flax_name}[{i}] of {shape}"
      if key not in state_dict:
        problems.append(f"missing key {key!r}: the model expects shape {want} ({where})")
        continue
      used.add(key)
      value = np.asarray(state_dict[key])
      if tuple(value.shape) != want:
        problems.append(f"key {key!r} has shape {tuple(value.shape)} in the checkpoint, the "
                        f"model expects {want} ({where})")
        continue
      blocks.append(layout.to_flax(path, value))
    if len(blocks) == len(layout.keys(path)):
      value = np.stack(blocks) if layout.stacked(path) else blocks[0]
      variables[path] = np.ascontiguousarray(value, dtype=np.float32)

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
    raise CheckpointError(f"{source} does not fit {_describe(model, image_size)}:\n  "
                          f"{shown}{more}")
  return traverse_util.unflatten_dict(variables)


def iresnet_state_dict(variables: Variables, model: IResNet,
                       image_size: Sequence[int] = (112, 112)) -> dict[str, np.ndarray]:
  """{"params", "batch_stats"} of `model` -> an arcface_torch state dict (numpy).

  The inverse of `iresnet_variables`, for either layout: stacked blocks are split into
  one key per block. The result loads into arcface_torch's IResNet with `strict=True`:
  it also holds the frozen `features.weight` (ones) and BatchNorm `num_batches_tracked`
  counters (0: Flax keeps none).
  """
  layout = _Layout(model, image_size)
  flat = traverse_util.flatten_dict(nn.meta.unbox(variables))
  if set(flat) != set(layout.template):
    missing = sorted("/".join(p) for p in set(layout.template) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(layout.template))
    stacked = lambda names: any(_STACK_SUFFIX + "/" in n for n in names)
    hint = ("; the variables are in the other scan_layers layout: convert them with "
            "face_jax.convert.relayout" if stacked(missing) != stacked(extra) else "")
    raise CheckpointError(f"variables do not fit {_describe(model, image_size)}: missing "
                          f"{missing[:10]}, unexpected {extra[:10]}{hint}")
  out = {}
  for path, shape in layout.template.items():
    value = np.asarray(flat[path], np.float32)
    if value.shape != shape:
      raise CheckpointError(f"Flax {'/'.join(path)} has shape {value.shape}, "
                            f"{_describe(model, image_size)} expects {shape}")
    values = list(value) if layout.stacked(path) else [value]
    for key, v in zip(layout.keys(path), values):
      out[key] = np.ascontiguousarray(layout.to_torch(path, v))
      if key.endswith(".running_mean"):
        out[key[:-len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
  out[_FROZEN_SCALE] = np.ones_like(out["features.bias"])
  return out


def relayout(variables: Variables, source: IResNet, target: IResNet,
             image_size: Sequence[int] = (112, 112)) -> Variables:
  """Variables of `source` -> the same weights for `target` (e.g. scan_layers off -> on)."""
  return iresnet_variables(iresnet_state_dict(variables, source, image_size), target,
                           image_size, source=f"variables of {_describe(source, image_size)}")


def save_iresnet_checkpoint(path: PathLike, variables: Variables, model: IResNet,
                            image_size: Sequence[int] = (112, 112)) -> None:
  """Writes `variables` as an arcface_torch `model.pt` (a state dict of torch tensors)."""
  import torch  # pylint: disable=import-outside-toplevel
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           iresnet_state_dict(variables, model, image_size).items()}
  torch.save(state, os.fspath(path))


def load_iresnet_checkpoint(path: PathLike, model: IResNet,
                            image_size: Sequence[int] = (112, 112)) -> Variables:
  """arcface_torch `.pth` -> {"params", "batch_stats"}: `model.apply(variables, x)`."""
  return iresnet_variables(read_state_dict(path), model, image_size, source=os.fspath(path))
