"""PyTorch checkpoints <-> SIMLA Flax parameters.

Sources:
  * official SIMLA checkpoints of every layout (`Pretrain.py`, `Retrieval.py`, `Grounding.py`,
    `VE.py`, `NLVR.py`, `VQA.py`, `Pretrain_NLVR.py` save {"model": state_dict, "config", ...}),
    and ALBEF's where only names differ: `read_official_checkpoint` -> `OfficialCheckpoint`
    (params, momentum params, queues, task heads, config), `load_official_checkpoint` ->
    (params, momentum params, queues); `to_official_state_dict` writes the pretraining layout;
  * Hugging Face `bert-base-uncased` (BertForMaskedLM naming): `bert_init_leaves`;
    cross-attention is left as initialised, as the official code does;
  * DeiT / timm or Hugging Face ViT checkpoints (e.g. deit_base_patch16_224-b5f2ef4d.pth):
    `vit_init_leaves`.

The rule tables name the per-layer layout (`vit/block_i`, `bert/layer_i`); a model with
`scan_layers` stacks them (`vit/blocks`, `bert/encoder/layer`, leading `layers` axis), and
`stack_layers` / `unstack_layers` convert at the boundary of every public loader and
writer, so a loader written for the per-layer layout serves both.

Every source key is consumed exactly once; a missing, unexpected or mis-shaped key
raises `CheckpointError` naming the key and both shapes. Keys the official code
drops on purpose are listed explicitly per source. Position embeddings of another
resolution are resized bicubically (`vit.interpolate_pos_embed`). Files are read by
`checkpoint_io.load_file` (torch's weights-only unpickler; configs as inert data).
"""

import dataclasses
import fnmatch
import math
import os
import re
from typing import Any, Iterable, Mapping

import flax.traverse_util as traverse_util
import jax
import ml_collections
import numpy as np

from simla_jax import checkpoint_io
from simla_jax.models import momentum as momentum_lib
from simla_jax.models import simla as simla_lib
from simla_jax.models import vit as vit_lib

Path = tuple[str, ...]
StateDict = dict[str, np.ndarray]


class CheckpointError(ValueError):
  """A checkpoint does not fit the model; the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One PyTorch tensor `key` <-> Flax leaves `paths`, related by `kind`:

  copy       same shape (embeddings, tokens, scalars)
  flat       a torch vector <-> any Flax shape of the same size (biases, LayerNorm)
  linear     torch (out, in) weight <-> Flax kernel (*in_axes, *out_axes), `n_in` in-axes
  qkv        fused timm qkv weight (3*d, d) <-> query/key/value kernels (d, heads, head_dim)
  qkv_bias   fused qkv bias (3*d,) <-> query/key/value biases (heads, head_dim)
  conv       torch (out, in, kh, kw) <-> Flax (kh, kw, in, out)
  pos_embed  copy, resized bicubically when the patch grid differs
  tied       a duplicate of a tensor another rule loads (the MLM decoder is tied to the
             word embeddings); checked for equality, optional in the source
  """
  key: str
  paths: tuple[Path, ...]
  kind: str
  n_in: int = 1


def _torch_shapes(rule: Rule, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
  s = shapes[0]
  if rule.kind in ("copy", "pos_embed", "tied"):
    return [tuple(s)]
  if rule.kind == "flat":
    return [(math.prod(s),)]
  if rule.kind == "linear":
    return [(math.prod(s[rule.n_in:]), math.prod(s[:rule.n_in]))]
  if rule.kind == "qkv":
    return [(sum(math.prod(x[1:]) for x in shapes), s[0])]
  if rule.kind == "qkv_bias":
    return [(sum(math.prod(x) for x in shapes),)]
  if rule.kind == "conv":
    return [(s[3], s[2], s[0], s[1])]
  raise ValueError(f"unknown rule kind {rule.kind}")


def _to_flax(rule: Rule, tensors: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
  t = tensors[0]
  if rule.kind in ("copy", "flat", "pos_embed", "tied"):
    return [t.reshape(shapes[0])]
  if rule.kind == "linear":
    return [t.T.reshape(shapes[0])]
  if rule.kind in ("qkv", "qkv_bias"):
    parts = np.split(t, 3, axis=0)
    return [(p.T if rule.kind == "qkv" else p).reshape(s) for p, s in zip(parts, shapes)]
  if rule.kind == "conv":
    return [t.transpose(2, 3, 1, 0)]
  raise ValueError(f"unknown rule kind {rule.kind}")


def _to_torch(rule: Rule, leaves: list[np.ndarray]) -> list[np.ndarray]:
  x = leaves[0]
  if rule.kind in ("copy", "pos_embed", "tied"):
    return [x]
  if rule.kind == "flat":
    return [x.reshape(-1)]
  if rule.kind == "linear":
    return [x.reshape(math.prod(x.shape[:rule.n_in]), -1).T]
  if rule.kind == "qkv":
    return [np.concatenate([k.reshape(k.shape[0], -1).T for k in leaves], axis=0)]
  if rule.kind == "qkv_bias":
    return [np.concatenate([b.reshape(-1) for b in leaves], axis=0)]
  if rule.kind == "conv":
    return [x.transpose(3, 2, 0, 1)]
  raise ValueError(f"unknown rule kind {rule.kind}")


# --- rule tables -------------------------------------------------------------------------------

def _linear(key: str, path: Path, n_in: int = 1) -> list[Rule]:
  return [Rule(f"{key}.weight", (path + ("kernel",),), "linear", n_in),
          Rule(f"{key}.bias", (path + ("bias",),), "flat")]


def _norm(key: str, path: Path) -> list[Rule]:
  return [Rule(f"{key}.weight", (path + ("scale",),), "flat"),
          Rule(f"{key}.bias", (path + ("bias",),), "flat")]


def vit_rules(cfg: ml_collections.ConfigDict, prefix: str, root: Path,
              mask_token: bool = True) -> list[Rule]:
  """timm / official `models/vit.py` naming."""
  rules = [Rule(f"{prefix}cls_token", (root + ("cls_token",),), "copy"),
           Rule(f"{prefix}pos_embed", (root + ("pos_embed",),), "pos_embed"),
           Rule(f"{prefix}patch_embed.proj.weight", (root + ("patch_embed", "kernel"),), "conv"),
           Rule(f"{prefix}patch_embed.proj.bias", (root + ("patch_embed", "bias"),), "flat")]
  if mask_token:
    rules.append(Rule(f"{prefix}mask_token", (root + ("mask_token",),), "copy"))
  for i in range(cfg.vit.depth):
    k, p = f"{prefix}blocks.{i}", root + (f"block_{i}",)
    attn = p + ("attn",)
    rules += _norm(f"{k}.norm1", p + ("norm1",))
    rules.append(Rule(f"{k}.attn.qkv.weight",
                      tuple(attn + (n, "kernel") for n in ("query", "key", "value")), "qkv"))
    rules.append(Rule(f"{k}.attn.qkv.bias",
                      tuple(attn + (n, "bias") for n in ("query", "key", "value")), "qkv_bias"))
    rules += _linear(f"{k}.attn.proj", attn + ("out",), n_in=2)
    rules += _norm(f"{k}.norm2", p + ("norm2",))
    rules += _linear(f"{k}.mlp.fc1", p + ("mlp", "fc1"))
    rules += _linear(f"{k}.mlp.fc2", p + ("mlp", "fc2"))
  rules += _norm(f"{prefix}norm", root + ("norm",))
  return rules


def _attention(key: str, path: Path) -> list[Rule]:
  rules = []
  for name in ("query", "key", "value"):
    rules += _linear(f"{key}.self.{name}", path + (name,))
  return rules + _linear(f"{key}.output.dense", path + ("out",), n_in=2)


def bert_rules(cfg: ml_collections.ConfigDict, prefix: str, root: Path,
               cross_attention: bool = True) -> list[Rule]:
  """BERT naming (`{prefix}embeddings.*`, `{prefix}encoder.layer.i.*`), BLIP med layout."""
  emb = root + ("embeddings",)
  rules = [Rule(f"{prefix}embeddings.word_embeddings.weight",
                (emb + ("word_embeddings", "embedding"),), "copy"),
           Rule(f"{prefix}embeddings.position_embeddings.weight",
                (emb + ("position_embeddings", "embedding"),), "copy")]
  rules += _norm(f"{prefix}embeddings.LayerNorm", emb + ("layer_norm",))
  for i in range(cfg.bert.layers):
    k, p = f"{prefix}encoder.layer.{i}", root + (f"layer_{i}",)
    rules += _attention(f"{k}.attention", p + ("attention",))
    rules += _norm(f"{k}.attention.output.LayerNorm", p + ("attention_norm",))
    if cross_attention:
      rules += _attention(f"{k}.crossattention", p + ("crossattention",))
      rules += _norm(f"{k}.crossattention.output.LayerNorm", p + ("crossattention_norm",))
    rules += _linear(f"{k}.intermediate.dense", p + ("mlp", "fc1"))
    rules += _linear(f"{k}.output.dense", p + ("mlp", "fc2"))
    rules += _norm(f"{k}.output.LayerNorm", p + ("output_norm",))
  return rules


def mlm_rules(prefix: str, root: Path) -> list[Rule]:
  """`{prefix}predictions.*` of BertOnlyMLMHead; `root` is the Bert module's path."""
  head = root + ("mlm_head",)
  rules = _linear(f"{prefix}predictions.transform.dense", head + ("transform",))
  rules += _norm(f"{prefix}predictions.transform.LayerNorm", head + ("layer_norm",))
  rules.append(Rule(f"{prefix}predictions.bias", (head + ("bias",),), "flat"))
  rules.append(Rule(f"{prefix}predictions.decoder.weight",
                    (root + ("embeddings", "word_embeddings", "embedding"),), "tied"))
  rules.append(Rule(f"{prefix}predictions.decoder.bias", (head + ("bias",),), "tied"))
  return rules


# Official module name -> Flax top-level key, for the linear heads.
_HEADS = {"vision_proj": "vision_proj", "text_proj": "text_proj", "itm_head": "itm_head",
          "mim_head": "mim_head", "concept_head": "concept_head"}


def official_rules(cfg: ml_collections.ConfigDict) -> list[Rule]:
  """The full official pretraining state dict (online and `*_m` momentum copies)."""
  rules = []
  for suffix, tree in (("", "params"), ("_m", "params_m")):
    online = not suffix

    def wanted(flax_key):
      return online or flax_key in momentum_lib.MOMENTUM_MODULES
    rules += vit_rules(cfg, f"visual_encoder{suffix}.", (tree, "vit"), cfg.use_mask_token)
    rules += bert_rules(cfg, f"text_encoder{suffix}.bert.", (tree, "bert"))
    rules += mlm_rules(f"text_encoder{suffix}.cls.", (tree, "bert"))
    for name, flax_key in _HEADS.items():
      if wanted(flax_key):
        rules += _linear(f"{name}{suffix}", (tree, flax_key))
    if online:
      rules.append(Rule("temp", ((tree, "temp"),), "copy"))
  return rules


def _official_dropped(cfg: ml_collections.ConfigDict) -> set[str]:
  """Keys of the official checkpoint that the model drops on purpose."""
  dropped = set()
  for suffix in ("", "_m"):
    # A persistent buffer of med.py's BertEmbeddings (arange), not a parameter.
    dropped.add(f"text_encoder{suffix}.bert.embeddings.position_ids")
    if not cfg.use_mask_token:   # fine-tuning models drop the MIM mask token
      dropped.add(f"visual_encoder{suffix}.mask_token")
  return dropped


# Hugging Face BERT keys bert-base-uncased has and the SIMLA BERT does not:
# no token types (BLIP embeddings), no pooler, no next-sentence head.
HF_BERT_DROPPED = ("bert.embeddings.token_type_embeddings.weight", "bert.embeddings.position_ids",
                   "bert.pooler.dense.weight", "bert.pooler.dense.bias",
                   "cls.seq_relationship.weight", "cls.seq_relationship.bias")
# DeiT's ImageNet classifier.
DEIT_DROPPED = ("head.weight", "head.bias")


# --- reading -----------------------------------------------------------------------------------

def _to_numpy(key: str, value: Any) -> np.ndarray:
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    value = value.float() if value.is_floating_point() else value
    return value.numpy()
  if isinstance(value, (np.ndarray, np.generic, int, float)) or hasattr(value, "__array__"):
    return np.asarray(value)
  raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")


def read_state_dict(path_or_state_dict: Any) -> StateDict:
  """A state dict as numpy arrays, from a `.pth`/`.bin`/`.safetensors` file or a mapping.

  A training checkpoint that wraps the state dict under "model" is unwrapped; the other
  entries (optimizer, config) are not converted. Files go through `checkpoint_io.load_file`.
  """
  source = path_or_state_dict
  if isinstance(source, (str, os.PathLike)):
    try:
      source = checkpoint_io.load_file(source)
    except (OSError, ValueError) as e:
      raise CheckpointError(str(e)) from e
  if not isinstance(source, Mapping):
    raise CheckpointError(f"checkpoint is a {type(source).__name__}, not a state dict")
  if "model" in source and isinstance(source["model"], Mapping):
    source = source["model"]
  return {k: _to_numpy(k, v) for k, v in source.items()}


def _rename_hf_layer_norm(state: StateDict) -> StateDict:
  """Old BERT checkpoints (bert-base-uncased's pytorch_model.bin) name LayerNorm gamma / beta."""
  out = {}
  for k, v in state.items():
    if "LayerNorm" in k and k.endswith(".gamma"):
      k = k[:-len("gamma")] + "weight"
    elif "LayerNorm" in k and k.endswith(".beta"):
      k = k[:-len("beta")] + "bias"
    out[k] = v
  return out


# --- the mapping engine ------------------------------------------------------------------------

def apply_rules(state: StateDict, rules: Iterable[Rule], expected: Mapping[Path, tuple[int, ...]],
                dropped: Iterable[str] = (), optional: Iterable[str] = (),
                source: str = "checkpoint") -> dict[Path, np.ndarray]:
  """Maps `state` onto Flax leaves of the `expected` shapes; strict both ways.

  Args:
    state: torch-named arrays.
    rules: the mapping; every Flax path of a non-tied rule must be in `expected`.
    expected: Flax path -> shape, for the leaves the rules fill.
    dropped: source keys the model does not use on purpose (consumed, ignored).
    optional: source keys that may be absent (their Flax leaves are then not returned).
    source: a name for error messages.
  Returns:
    Flax path -> float32 / int array, one entry per filled leaf.
  Raises:
    CheckpointError listing every missing, unexpected, mis-shaped or inconsistent key.
  """
  rules = list(rules)
  dropped, optional = set(dropped), set(optional)
  problems, out, used = [], {}, set()
  for rule in (r for r in rules if r.kind != "tied"):
    shapes = [tuple(expected[p]) for p in rule.paths]
    (want,) = _torch_shapes(rule, shapes)
    key = rule.key
    if key not in state:
      if key not in optional:
        problems.append(f"missing key {key}: model expects shape {want}")
      continue
    used.add(key)
    value = state[key]
    if rule.kind == "pos_embed" and value.shape != want and value.ndim == 3 \
        and value.shape[0] == want[0] and value.shape[2] == want[2]:
      try:
        value = vit_lib.interpolate_pos_embed(value, want[1] - 1)
      except ValueError as e:
        problems.append(f"{key}: checkpoint shape {value.shape}, model expects {want} ({e})")
        continue
    if tuple(value.shape) != want:
      problems.append(f"{key}: checkpoint shape {tuple(value.shape)}, model expects {want}")
      continue
    for path, leaf in zip(rule.paths, _to_flax(rule, [value], shapes)):
      if path in out:
        problems.append(f"{key}: Flax leaf {'/'.join(path)} is filled twice")
      out[path] = leaf
  for rule in (r for r in rules if r.kind == "tied"):
    key, (path,) = rule.key, rule.paths
    if key not in state:
      continue   # a tie is implied; checkpoints may or may not store the duplicate
    used.add(key)
    if path not in out:
      problems.append(f"{key}: tied to {'/'.join(path)}, which the checkpoint does not provide")
      continue
    value, target = state[key], out[path]
    if value.size != target.size:
      problems.append(f"{key}: checkpoint shape {tuple(value.shape)}, tied tensor "
                      f"{'/'.join(path)} has shape {target.shape}")
    elif not np.array_equal(value.reshape(target.shape), target):
      diff = float(np.max(np.abs(value.reshape(target.shape) - target)))
      problems.append(f"{key}: should equal its tied tensor {'/'.join(path)} "
                      f"(max |difference| {diff:.3g})")
  for key in sorted(set(state) - used - dropped):
    problems.append(f"unexpected key {key} with shape {tuple(state[key].shape)}")
  if problems:
    raise CheckpointError(f"{source} does not fit the model ({len(problems)} problems):\n  "
                          + "\n  ".join(problems))
  return out


def flat_shapes(tree: Any, root: Path = ()) -> dict[Path, tuple[int, ...]]:
  """Flax path (prefixed by `root`) -> shape, for every leaf of an unboxed tree."""
  return {root + k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree).items()}


def _check_covered(filled: Mapping[Path, Any], expected: Mapping[Path, Any], source: str) -> None:
  missing = sorted(set(expected) - set(filled))
  if missing:
    raise CheckpointError(f"{source}: no checkpoint tensor for Flax parameters "
                          + ", ".join("/".join(p) for p in missing))


def replace_leaves(params: Any, filled: Mapping[Path, np.ndarray], root: Path = ()) -> Any:
  """A copy of `params` with the leaves `filled` (paths prefixed by `root`) replaced."""
  flat = traverse_util.flatten_dict(params)
  for path, value in filled.items():
    rel = path[len(root):]
    if rel not in flat:
      raise CheckpointError(f"model has no parameter {'/'.join(rel)}")
    flat[rel] = value.astype(flat[rel].dtype)
  return traverse_util.unflatten_dict(flat)


# --- stacked (scanned) layers ------------------------------------------------------------------

# module -> (per-layer child name prefix, path of the stacked subtree in the module,
# config key of the depth): the layers `model.scan_layers` runs as one nn.scan.
_STACKED = {"vit": ("block_", ("blocks",), ("vit", "depth")),
            "bert": ("layer_", ("encoder", "layer"), ("bert", "layers"))}


def _scanned(cfg: ml_collections.ConfigDict) -> bool:
  return bool(cfg.get("scan_layers", False))


def per_layer_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` with `scan_layers` off: the model whose parameter tree the rule tables name."""
  cfg = cfg.copy_and_resolve_references()
  if "scan_layers" in cfg:
    cfg.scan_layers = False
  return cfg


def _depth(cfg: ml_collections.ConfigDict, key: tuple[str, str]) -> int:
  return int(cfg[key[0]][key[1]])


def stack_layers(tree: Any, cfg: ml_collections.ConfigDict) -> Any:
  """A params (or momentum) tree in the per-layer layout -> the layout of `SIMLA(cfg)`.

  With `cfg.scan_layers`, `vit/block_i` become `vit/blocks` and `bert/layer_i` become
  `bert/encoder/layer`, each leaf stacked on a new leading axis i; without, `tree` is
  returned as is. Top-level keys other than vit / bert pass through.
  """
  if not _scanned(cfg):
    return tree
  out = dict(tree)
  for module, (prefix, stacked, depth_key) in _STACKED.items():
    if module not in out:
      continue
    sub = dict(out[module])
    names = [f"{prefix}{i}" for i in range(_depth(cfg, depth_key))]
    missing = [n for n in names if n not in sub]
    if missing:
      raise CheckpointError(f"stack_layers: {module} has no {', '.join(missing)} "
                            f"(config {'.'.join(depth_key)} = {len(names)})")
    extra = sorted(k for k in sub if k.startswith(prefix) and k[len(prefix):].isdigit()
                   and k not in names)
    if extra:
      raise CheckpointError(f"stack_layers: {module} has {', '.join(extra)} beyond config "
                            f"{'.'.join(depth_key)} = {len(names)}")
    layers = [sub.pop(n) for n in names]
    node = sub
    for key in stacked[:-1]:
      node = node.setdefault(key, {})
    node[stacked[-1]] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    out[module] = sub
  return out


def unstack_layers(tree: Any, cfg: ml_collections.ConfigDict) -> Any:
  """The inverse of `stack_layers`: the layout of `SIMLA(cfg)` -> the per-layer layout."""
  if not _scanned(cfg):
    return tree
  out = dict(tree)
  for module, (prefix, stacked, depth_key) in _STACKED.items():
    if module not in out:
      continue
    sub = dict(out[module])
    depth = _depth(cfg, depth_key)
    node, parents = sub, []
    for key in stacked[:-1]:
      if key not in node:
        raise CheckpointError(f"unstack_layers: {module} has no {'/'.join(stacked)}")
      parents.append((node, key))
      node[key] = dict(node[key])
      node = node[key]
    if stacked[-1] not in node:
      raise CheckpointError(f"unstack_layers: {module} has no {'/'.join(stacked)}")
    layer = node.pop(stacked[-1])
    for leaf_path, leaf in traverse_util.flatten_dict(layer).items():
      if np.shape(leaf)[:1] != (depth,):
        raise CheckpointError(f"unstack_layers: {module}/{'/'.join(stacked + leaf_path)} has "
                              f"shape {np.shape(leaf)}, expected a leading axis of "
                              f"{'.'.join(depth_key)} = {depth}")
    for node_, key in reversed(parents):   # drop containers the stack leaves empty
      if not node_[key]:
        del node_[key]
    for i in range(depth):
      sub[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], layer)
    out[module] = sub
  return out


# --- public loaders ----------------------------------------------------------------------------

def load_official_checkpoint(path_or_state_dict: Any, cfg: ml_collections.ConfigDict, *,
                             ignore_missing: Iterable[str] = (),
                             ignore_unexpected: Iterable[str] = ()):
  """An official SIMLA (or ALBEF-named) checkpoint of any layout -> (params, params_m,
  queues), numpy leaves; `read_official_checkpoint` says what each layout holds.

  Args:
    path_or_state_dict: a `.pth` written by an official script (state dict under "model";
      configs beside it read as inert data), or the state dict itself.
    cfg: the model config (configs/simla_model.py); the position embedding is resized
      when `cfg.image_size` differs from the checkpoint's.
    ignore_missing / ignore_unexpected: fnmatch patterns over the file's key names of
      tensors the target may lack / does not use.
  Returns:
    params: the online tree of `SIMLA(cfg)` (pretraining layout: complete; fine-tuned
    layouts: the modules they hold); params_m: the momentum tree or None; queues:
    {"image_queue", "text_queue": (queue_size, embed_dim), "queue_ptr": int32 (),
    "idx_queue": int (queue_size,)} as far as the file has them (the official buffers
    are (embed_dim, queue_size)).
  """
  ck = read_official_checkpoint(path_or_state_dict, cfg, ignore_missing=ignore_missing,
                                ignore_unexpected=ignore_unexpected)
  return ck.params, ck.params_m, ck.queues


# --- every official layout ---------------------------------------------------------------------

@dataclasses.dataclass
class OfficialCheckpoint:
  """An official checkpoint, converted (numpy leaves).

  layout     which official model saved it (see LAYOUT_MODULES)
  albef      ALBEF's BERT naming (xbert, with token-type embeddings)
  params     online Flax tree, restricted to the modules the layout holds
  params_m   momentum tree (same restriction), None when the file has no momentum copies
  queues     "image_queue", "text_queue" (Q, E), "queue_ptr" (), "idx_queue" (Q,) as present
  extras     tensors of task heads SIMLA(cfg) has no place for (`cls_head.*`, `text_decoder.*`,
             `ta_head.*`), under their official names
  absent     "params/<module>" / "params_m/<module>" of SIMLA(cfg) the file does not hold
             (fill them from an init with `merge_params`)
  config     the config saved beside the weights, as plain data (None if none)
  """
  layout: str
  albef: bool
  params: Any
  params_m: Any
  queues: dict[str, np.ndarray]
  extras: StateDict
  absent: tuple[str, ...]
  config: Any = None


# Online modules each official model class holds (its momentum copies hold the same minus
# itm_head and temp). Module names: the Flax top-level keys, plus "mask_token" (the ViT's
# MIM token) and "mlm_head" (the BERT's MLM head, official `text_encoder.cls.*`).
LAYOUT_MODULES = {
    # models/simla/pretrain.py (Pretrain.py)
    "pretrain": ("vit", "mask_token", "bert", "mlm_head", "vision_proj", "text_proj",
                 "itm_head", "mim_head", "concept_head", "temp"),
    # ALBEF's pretraining model: no MIM / PSL heads
    "albef_pretrain": ("vit", "bert", "mlm_head", "vision_proj", "text_proj", "itm_head", "temp"),
    # models/simla/retrieval.py (Retrieval.py, Grounding.py, zero_shot_retrieval.py)
    "retrieval": ("vit", "bert", "vision_proj", "text_proj", "itm_head", "temp"),
    # models/simla/ve.py, nlvr.py, vqa.py: encoders + a task head kept in `extras`
    "ve": ("vit", "bert"),
    "nlvr": ("vit", "bert"),
    "vqa": ("vit", "bert"),
    # models/simla/pretrain_nlvr.py: + ta_head in `extras`
    "nlvr_pretrain": ("vit", "bert", "vision_proj", "text_proj", "temp"),
}
EXTRA_PREFIXES = ("cls_head.", "cls_head_m.", "text_decoder.", "text_decoder_m.", "ta_head.")
_QUEUES = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


def canonical_key(key: str) -> str:
  """Downstream scripts strip `.bert.` from the text encoder's keys: one name for both."""
  for enc in ("text_encoder.", "text_encoder_m."):
    if key.startswith(enc + "bert."):
      return enc + key[len(enc) + len("bert."):]
  return key


def _module(rule: Rule) -> tuple[str, str]:
  """(tree, module) a rule fills."""
  path = rule.paths[0]
  if path[1] == "vit" and path[-1] == "mask_token":
    return path[0], "mask_token"
  if path[1] == "bert" and ".cls." in rule.key:
    return path[0], "mlm_head"
  return path[0], path[1]


def _group(path: Path) -> Path:
  """A Flax leaf's module for `OfficialCheckpoint.absent`: ("params", "vit"),
  ("params", "bert", "mlm_head"), ("params", "vit", "mask_token"), ..."""
  if path[1:3] in (("bert", "mlm_head"), ("vit", "mask_token")):
    return path[:3]
  return path[:2]


def detect_layout(state: StateDict) -> tuple[str, bool]:
  """(layout, albef) of a canonical-named state dict."""
  keys = set(state)
  albef = any(k.startswith("text_encoder") and k.endswith("embeddings.token_type_embeddings.weight")
              for k in keys)
  if any(k.startswith("text_decoder.") for k in keys):
    return "vqa", albef
  if "ta_head.weight" in keys:
    return "nlvr_pretrain", albef
  if "cls_head.2.weight" in keys:
    return ("ve" if state["cls_head.2.weight"].shape[0] == 3 else "nlvr"), albef
  if {"mim_head.weight", "concept_head.weight"} & keys:
    return "pretrain", albef
  if any(k.startswith("text_encoder.cls.") for k in keys):
    return ("albef_pretrain" if albef else "pretrain"), albef
  if "itm_head.weight" in keys:
    return "retrieval", albef
  raise CheckpointError("cannot tell which official model saved this checkpoint: no MIM / "
                        "MLM / ITM / task head among keys like " + ", ".join(sorted(keys)[:5]))


def _fold_token_types(state: StateDict, name) -> StateDict:
  """ALBEF's BERT adds token-type embedding 0 to every token; SIMLA's has no token types.
  Folding it into the position embeddings gives the same embeddings for every text.
  `name` maps an official `text_encoder.bert.*` key to the file's naming."""
  out = dict(state)
  for enc in ("text_encoder", "text_encoder_m"):
    tt = name(f"{enc}.bert.embeddings.token_type_embeddings.weight")
    pos = name(f"{enc}.bert.embeddings.position_embeddings.weight")
    if tt in out and pos in out:
      out[pos] = out[pos] + out.pop(tt)[0][None]
  return out


def _read_queues(state: StateDict, cfg: ml_collections.ConfigDict, required: bool,
                 problems: list[str]) -> dict[str, np.ndarray]:
  queues = {}
  for name in ("image_queue", "text_queue"):
    if name not in state:
      if required:
        problems.append(f"missing key {name}: model expects shape ({cfg.embed_dim}, queue_size)")
    elif state[name].ndim != 2 or state[name].shape[0] != cfg.embed_dim:
      problems.append(f"{name}: checkpoint shape {state[name].shape}, model expects "
                      f"({cfg.embed_dim}, queue_size)")
    else:
      queues[name] = np.ascontiguousarray(state[name].T.astype(np.float32))
  if "queue_ptr" not in state:
    if required:
      problems.append("missing key queue_ptr: model expects shape (1,)")
  elif state["queue_ptr"].size != 1:
    problems.append(f"queue_ptr: checkpoint shape {state['queue_ptr'].shape}, model expects (1,)")
  else:
    queues["queue_ptr"] = np.asarray(state["queue_ptr"]).reshape(()).astype(np.int32)
  if "idx_queue" in state:   # retrieval: the image id of each queue entry, (1, Q)
    queues["idx_queue"] = np.asarray(state["idx_queue"]).reshape(-1).astype(np.int64)
  sizes = {k: v.shape[0] for k, v in queues.items() if k != "queue_ptr"}
  if len(set(sizes.values())) > 1:
    problems.append(f"queues differ in length: {sizes}")
  return queues


def _matching(patterns: Iterable[str], names: Iterable[str]) -> set[str]:
  patterns = tuple(patterns)
  return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def read_official_checkpoint(path_or_state_dict: Any, cfg: ml_collections.ConfigDict, *,
                             ignore_missing: Iterable[str] = (),
                             ignore_unexpected: Iterable[str] = ()) -> OfficialCheckpoint:
  """Any official SIMLA checkpoint (pretraining, retrieval / grounding, VE, NLVR2, VQA,
  NLVR pretraining), or ALBEF's where it differs only in names -> OfficialCheckpoint.

  The layout is read from the keys. Within every module the layout holds, each tensor
  must be there with the right shape; tensors no rule or task head takes are errors.
  Every problem is listed by name. `ignore_missing` / `ignore_unexpected` (fnmatch
  patterns over the file's key names) accept what the target does not need,
  e.g. `ignore_unexpected=("mim_head*", "concept_head*", "text_encoder*.cls.*")`.
  """
  config = None
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    try:
      top = checkpoint_io.load_file(path_or_state_dict)
    except (OSError, ValueError) as e:
      raise CheckpointError(str(e)) from e
    if isinstance(top, Mapping) and "config" in top:
      config = checkpoint_io.to_plain(top["config"])
    path_or_state_dict = top
  state = read_state_dict(path_or_state_dict)
  canonical = {canonical_key(k): v for k, v in state.items()}
  if len(canonical) != len(state):
    raise CheckpointError("checkpoint holds text encoder keys both with and without `.bert.`")
  layout, albef = detect_layout(canonical)
  # Rules and messages use the file's own naming: with `.bert.` (pretraining) or without.
  with_bert = any(k.startswith(("text_encoder.bert.", "text_encoder_m.bert.")) for k in state)
  name = (lambda k: k) if with_bert else canonical_key
  state = _fold_token_types(state, name)
  extras = {k: v for k, v in state.items() if k.startswith(EXTRA_PREFIXES)}
  has_momentum = any(k.startswith(("visual_encoder_m.", "text_encoder_m.")) for k in state)
  problems = []
  queues = _read_queues(state, cfg, layout in ("pretrain", "albef_pretrain", "retrieval"),
                        problems)

  rules = [dataclasses.replace(r, key=name(r.key)) for r in official_rules(cfg)]
  modules = set(LAYOUT_MODULES[layout])
  if not cfg.use_mask_token:
    modules.discard("mask_token")
  required = {("params", m) for m in modules}
  if has_momentum:
    required |= {("params_m", m) for m in modules - {"itm_head", "temp"}}
  present = {_module(r) for r in rules if r.kind != "tied" and r.key in state}
  rules = [r for r in rules if _module(r) in required | present]

  abstract = simla_lib.abstract_params(per_layer_config(cfg))   # the rules' layout
  expected = {**flat_shapes(abstract, ("params",)),
              **flat_shapes(momentum_lib.init_momentum(abstract), ("params_m",))}
  dropped = {name(k) for k in _official_dropped(cfg)}
  dropped |= set(extras) | set(_QUEUES)
  dropped |= {"visual_encoder.mask_token", "visual_encoder_m.mask_token"} & set(state)
  dropped |= _matching(ignore_unexpected, state)
  optional = _matching(ignore_missing, [r.key for r in rules])
  try:
    filled = apply_rules(state, rules, expected, dropped=dropped, optional=optional,
                         source=f"official SIMLA checkpoint ({layout} layout)")
  except CheckpointError as e:
    problems.append(str(e))
  if problems:
    hint = ("\nPass ignore_missing= / ignore_unexpected= (fnmatch patterns over these names) "
            "to accept tensors the target task does not use.")
    if albef and any("crossattention" in p for p in problems):
      hint += ("\nALBEF's BERT has cross-attention only from its fusion layer on; SIMLA's "
               "has it in every layer (ignore_missing=('text_encoder*.crossattention.*',) "
               "keeps those layers' initial values: an initialisation, not ALBEF itself).")
    raise CheckpointError("\n".join(problems) + hint)
  if layout == "pretrain" and not optional:
    _check_covered(filled, expected, "official SIMLA checkpoint")
  trees = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in filled.items()})
  absent = tuple(sorted({"/".join(_group(p)) for p in set(expected) - set(filled)
                         if p[0] == "params" or has_momentum}))
  params = _stack(trees.get("params", {}), cfg)
  params_m = _stack(trees.get("params_m", {}), cfg) if has_momentum else None
  return OfficialCheckpoint(layout=layout, albef=albef, params=params, params_m=params_m,
                            queues=queues, extras=extras, absent=absent, config=config)


def _stack(tree: Any, cfg: ml_collections.ConfigDict) -> Any:
  """`stack_layers`, with a clear error for layers a partial load left unequal."""
  try:
    return stack_layers(tree, cfg)
  except ValueError as e:   # CheckpointError, or layers holding different tensors
    raise CheckpointError(f"model.scan_layers stacks every layer, so each layer must hold the "
                          f"same tensors; this load leaves them unequal ({e}). Load with "
                          f"scan_layers=False or ignore whole tensors of every layer.") from e


def merge_params(target: Any, loaded: Any) -> Any:
  """`target` (a full, unboxed tree in the model's layout, e.g. a fresh init) with every
  leaf `loaded` has (`read_official_checkpoint`'s trees are in the same layout)."""
  return replace_leaves(target, {k: np.asarray(v) for k, v in
                                 traverse_util.flatten_dict(loaded).items()}, ())


def to_official_state_dict(params: Any, params_m: Any, queues: Mapping[str, Any],
                           cfg: ml_collections.ConfigDict) -> StateDict:
  """The inverse of `load_official_checkpoint`: numpy arrays under the official key names
  (`torch.from_numpy` each to `load_state_dict` into the official PyTorch model)."""
  flat = {}
  params, params_m = unstack_layers(params, cfg), unstack_layers(params_m, cfg)
  for tree, name in ((params, "params"), (params_m, "params_m")):
    flat.update({(name,) + k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()})
  out = {}
  for rule in official_rules(cfg):
    (out[rule.key],) = _to_torch(rule, [flat[p] for p in rule.paths])
  positions = np.arange(cfg.bert.max_position, dtype=np.int64)[None]
  for suffix in ("", "_m"):
    out[f"text_encoder{suffix}.bert.embeddings.position_ids"] = positions
  out["image_queue"] = np.asarray(queues["image_queue"]).T
  out["text_queue"] = np.asarray(queues["text_queue"]).T
  out["queue_ptr"] = np.asarray(queues["queue_ptr"]).reshape(1).astype(np.int64)
  return {k: np.array(v, order="C") for k, v in out.items()}


def hf_vit_to_timm(state: StateDict) -> StateDict:
  """Hugging Face ViT / DeiT file naming (`[vit.|deit.]encoder.layer.i.attention.attention.query`,
  as `save_pretrained` writes it) -> timm naming with fused qkv. Other layouts pass through."""
  prefix = next((p for p in ("vit.", "deit.", "") if f"{p}embeddings.cls_token" in state), None)
  if prefix is None:
    return state
  simple = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
  layer = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1",
           "layernorm_after": "norm2", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
  out, qkv = {}, {}
  for key, value in state.items():
    rel = key[len(prefix):] if key.startswith(prefix) else key
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", rel)
    if rel in simple:
      out[simple[rel]] = value
    elif m and m.group(2) in layer:
      out[f"blocks.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"] = value
    elif m and m.group(2).startswith("attention.attention."):
      name = m.group(2).rsplit(".", 1)[-1]
      qkv.setdefault(f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}", {})[name] = value
    else:
      out[key] = value   # classifier, pooler, distillation token: reported or dropped
  for key, parts in qkv.items():
    names = ("query", "key", "value")
    missing = [n for n in names if n not in parts]
    if missing:
      raise CheckpointError(f"HF ViT checkpoint: {key} lacks attention {missing}")
    out[key] = np.concatenate([parts[n] for n in names], axis=0)
  return out


# Hugging Face ViT heads and timm/DeiT classifiers: not part of the SIMLA ViT.
VIT_DROPPED = DEIT_DROPPED + ("classifier.weight", "classifier.bias", "pooler.dense.weight",
                              "pooler.dense.bias", "vit.pooler.dense.weight",
                              "vit.pooler.dense.bias", "fc_norm.weight", "fc_norm.bias")


def vit_init_leaves(path_or_state_dict: Any, cfg: ml_collections.ConfigDict) -> dict[Path, np.ndarray]:
  """DeiT / timm (state dict possibly under "model") or Hugging Face ViT weights ->
  {Flax path under the params root, per-layer layout (`stack_layers` for a scanned model):
  array} for the ViT; the position embedding resized to `cfg.image_size`. The MIM `mask_token` is absent unless the checkpoint has one (DeiT has
  none: the official model keeps its initial zeros)."""
  state = hf_vit_to_timm(read_state_dict(path_or_state_dict))
  rules = vit_rules(cfg, "", ("vit",), cfg.use_mask_token)
  return apply_rules(state, rules, flat_shapes(simla_lib.abstract_params(per_layer_config(cfg))),
                     dropped=VIT_DROPPED, optional=("mask_token",), source="ViT checkpoint")


def bert_init_leaves(path_or_state_dict: Any, cfg: ml_collections.ConfigDict) -> dict[Path, np.ndarray]:
  """Hugging Face BERT (BertForMaskedLM / BertForPreTraining naming, e.g. bert-base-uncased)
  -> {Flax path (per-layer layout): array} for the embeddings, self-attention, FFN and MLM
  head of every layer.

  No cross-attention leaf is returned: the official code (`BertForMaskedLM.from_pretrained`
  with `add_cross_attention`) leaves every `crossattention.*` weight at its fresh
  N(0, 0.02) / LayerNorm 1, 0 / bias 0 init. Token types, pooler and NSP head are dropped
  (BLIP's embeddings have no token types).
  """
  state = _rename_hf_layer_norm(read_state_dict(path_or_state_dict))
  if not any(k.startswith("bert.") for k in state):
    raise CheckpointError("Hugging Face BERT checkpoint: expected BertForMaskedLM naming "
                          "('bert.*', 'cls.predictions.*'), found keys like "
                          f"{sorted(state)[:3]}")
  rules = bert_rules(cfg, "bert.", ("bert",), cross_attention=False) + mlm_rules("cls.", ("bert",))
  return apply_rules(state, rules, flat_shapes(simla_lib.abstract_params(per_layer_config(cfg))),
                     dropped=HF_BERT_DROPPED, source="Hugging Face BERT checkpoint")


def load_bert_checkpoint(path_or_state_dict: Any, cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """`bert_init_leaves` written into a copy of `params` (unboxed; cross-attention kept)."""
  params = unstack_layers(params, cfg)
  return stack_layers(replace_leaves(params, bert_init_leaves(path_or_state_dict, cfg), ()), cfg)


def load_vit_checkpoint(path_or_state_dict: Any, cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """`vit_init_leaves` written into a copy of `params` (unboxed; `mask_token` kept when
  the checkpoint has none)."""
  params = unstack_layers(params, cfg)
  return stack_layers(replace_leaves(params, vit_init_leaves(path_or_state_dict, cfg), ()), cfg)
