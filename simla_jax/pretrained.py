"""Initialisation from public weights, as the official pretraining starts (spec §1.1).

`config.init.vit`: a DeiT-B/16 state dict (timm `.pth` as released, or a Hugging Face ViT /
DeiT file); `config.init.bert`: a `bert-base-uncased` state dict (HF `.bin` / `.safetensors`).
They replace the random values right after the random init and before the momentum copies
are taken, so momentum = online at step 0 as in the official `copy_params`. What stays
random is what the official code leaves random: every BERT cross-attention layer, the
MIM mask token (zeros), the projections and heads.

The files are read on the host once (`load_public_weights`); `with_weights` puts them into
the traced params inside the jitted, sharded init through one `jax.pure_callback`, so no
weights become compile-time constants and the loop's init contract (rng -> state) holds.
"""

import os
from typing import Any

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import ml_collections
import numpy as np

from simla_jax import convert

Path = tuple[str, ...]


def init_config() -> ml_collections.ConfigDict:
  """`config.init`: paths of public weights ("" = random init)."""
  return ml_collections.ConfigDict(dict(
      vit="",     # DeiT / timm / HF ViT state dict: .pth, .bin or .safetensors
      bert="",    # HF bert-base-uncased (BertForMaskedLM / BertForPreTraining naming)
  ))


def check_files(init_cfg: ml_collections.ConfigDict) -> None:
  """Fails early, naming the config key and path of any file that is not there."""
  for key in ("vit", "bert"):
    path = init_cfg.get(key, "")
    if path and not os.path.isfile(path):
      raise FileNotFoundError(f"config.init.{key}: {path} does not exist (set it to the "
                              f"{'DeiT-B/16' if key == 'vit' else 'bert-base-uncased'} "
                              f"weights, or to '' for a random init)")


def load_public_weights(init_cfg: ml_collections.ConfigDict,
                        model_cfg: ml_collections.ConfigDict) -> dict[Path, np.ndarray]:
  """{Flax path in the params tree: float32 array} from `init.vit` and `init.bert`."""
  check_files(init_cfg)
  leaves = {}
  if init_cfg.get("vit"):
    leaves.update(convert.vit_init_leaves(init_cfg.vit, model_cfg))
  if init_cfg.get("bert"):
    leaves.update(convert.bert_init_leaves(init_cfg.bert, model_cfg))
  # The converters name the per-layer layout; a scanned model stacks every layer's leaf.
  leaves = traverse_util.flatten_dict(
      convert.stack_layers(traverse_util.unflatten_dict(leaves), model_cfg)) if leaves else {}
  return {k: np.ascontiguousarray(v, np.float32) for k, v in leaves.items()}


def with_weights(params: Any, leaves: dict[Path, np.ndarray]) -> Any:
  """`params` (boxed or not, traced or not) with `leaves` replaced by the host arrays.

  Under jit the arrays arrive through one `jax.pure_callback`; the logical-axis boxes are
  kept, so the sharded init places the loaded values like the random ones.
  """
  if not leaves:
    return params
  flat = traverse_util.flatten_dict(params)
  missing = sorted("/".join(k) for k in leaves if k not in flat)
  if missing:
    raise KeyError(f"public weights for parameters the model does not have: {missing}")
  order = sorted(leaves)
  specs = [jax.ShapeDtypeStruct(leaves[k].shape, leaves[k].dtype) for k in order]
  for k, spec in zip(order, specs):
    want = flat[k].value if isinstance(flat[k], nn.meta.AxisMetadata) else flat[k]
    if tuple(want.shape) != spec.shape:
      raise ValueError(f"public weight {'/'.join(k)}: shape {spec.shape}, model {want.shape}")
  values = jax.pure_callback(lambda: [leaves[k] for k in order], specs)
  for k, value in zip(order, values):
    old = flat[k]
    value = value.astype(old.value.dtype if isinstance(old, nn.meta.AxisMetadata) else old.dtype)
    flat[k] = old.replace_boxed(value) if isinstance(old, nn.meta.AxisMetadata) else value
  return traverse_util.unflatten_dict(flat)
