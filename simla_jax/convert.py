"""PyTorch checkpoints <-> SIMLA Flax parameters.

Sources:
  * the official SIMLA pretraining checkpoint (`Pretrain.py` saves {"model": state_dict, ...}):
    `load_official_checkpoint` -> (params, momentum params, queues); `to_official_state_dict`
    writes the same layout back;
  * Hugging Face `bert-base-uncased` (BertForMaskedLM naming): `load_bert_checkpoint`;
    cross-attention is left as initialised, as the official code does;
  * DeiT / timm ViT checkpoints (e.g. deit_base_patch16_224-b5f2ef4d.pth): `load_vit_checkpoint`.

The rule tables name the per-layer layout (`vit/block_i`, `bert/layer_i`); a model with
`scan_layers` stacks them (`vit/blocks`, `bert/encoder/layer`, leading `layers` axis), and
`stack_layers` / `unstack_layers` convert at the boundary of every public loader and
writer, so a loader written for the per-layer layout serves both.

Every source key is consumed exactly once; a missing, unexpected or mis-shaped key
raises `CheckpointError` naming the key and both shapes. Keys the official code
drops on purpose are listed explicitly per source. Position embeddings of another
resolution are resized bicubically (`vit.interpolate_pos_embed`). Files are read
with `torch.load(..., weights_only=True)`; torch is imported only to read them.
"""

import dataclasses
import math
import os
from typing import Any, Iterable, Mapping

import flax.traverse_util as traverse_util
import jax
import ml_collections
import numpy as np

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

  A training checkpoint that wraps the state dict under "model" is unwrapped.
  """
  source = path_or_state_dict
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.exists(path):
      raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.endswith(".safetensors"):
      import safetensors.torch  # pylint: disable=import-outside-toplevel
      source = safetensors.torch.load_file(path)
    else:
      import torch  # pylint: disable=import-outside-toplevel
      try:
        source = torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:  # the unpickler refuses anything but tensors and containers
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
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

def load_official_checkpoint(path_or_state_dict: Any, cfg: ml_collections.ConfigDict):
  """Official SIMLA pretraining checkpoint -> (params, params_m, queues), numpy leaves.

  Args:
    path_or_state_dict: a `.pth` written by the official `Pretrain.py` (state dict under
      "model"), or the state dict itself (torch tensors or numpy arrays).
    cfg: the model config (configs/simla_model.py); the position embedding is resized
      when `cfg.image_size` differs from the checkpoint's.
  Returns:
    params: the online tree of `SIMLA(cfg)`; params_m: the momentum tree
    (`momentum.MOMENTUM_MODULES`); queues: {"image_queue", "text_queue": (queue_size,
    embed_dim), "queue_ptr": int32 ()} (the official buffers are (embed_dim, queue_size)).
    With `cfg.scan_layers` the layers are stacked (see `stack_layers`).
  """
  state = read_state_dict(path_or_state_dict)
  abstract = simla_lib.abstract_params(per_layer_config(cfg))
  expected = {**flat_shapes(abstract, ("params",)),
              **flat_shapes(momentum_lib.init_momentum(abstract), ("params_m",))}
  queue_keys = ("image_queue", "text_queue", "queue_ptr")
  queues, problems = {}, []
  for name in ("image_queue", "text_queue"):
    if name not in state:
      problems.append(f"missing key {name}: model expects shape ({cfg.embed_dim}, queue_size)")
    elif state[name].ndim != 2 or state[name].shape[0] != cfg.embed_dim:
      problems.append(f"{name}: checkpoint shape {state[name].shape}, model expects "
                      f"({cfg.embed_dim}, queue_size)")
    else:
      queues[name] = np.ascontiguousarray(state[name].T.astype(np.float32))
  if "queue_ptr" not in state:
    problems.append("missing key queue_ptr: model expects shape (1,)")
  elif state["queue_ptr"].size != 1:
    problems.append(f"queue_ptr: checkpoint shape {state['queue_ptr'].shape}, model expects (1,)")
  else:
    queues["queue_ptr"] = np.asarray(state["queue_ptr"]).reshape(()).astype(np.int32)
  if not problems and queues["image_queue"].shape != queues["text_queue"].shape:
    problems.append(f"image_queue {state['image_queue'].shape} and text_queue "
                    f"{state['text_queue'].shape} differ in shape")
  if problems:
    raise CheckpointError("official checkpoint queues:\n  " + "\n  ".join(problems))
  rest = {k: v for k, v in state.items() if k not in queue_keys}
  filled = apply_rules(rest, official_rules(cfg), expected, dropped=_official_dropped(cfg),
                       source="official SIMLA checkpoint")
  _check_covered(filled, expected, "official SIMLA checkpoint")
  trees = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in filled.items()})
  return stack_layers(trees["params"], cfg), stack_layers(trees["params_m"], cfg), queues


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


def load_bert_checkpoint(path_or_state_dict: Any, cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """Hugging Face BERT (BertForMaskedLM naming, e.g. bert-base-uncased) into `params["bert"]`.

  Embeddings, self-attention, FFN and the MLM head are replaced; the cross-attention
  of every layer keeps its values from `params` (freshly initialised), as in the
  official code. Token-type embeddings, pooler and NSP head are dropped.
  Returns a new params tree (numpy leaves where loaded).
  """
  state = _rename_hf_layer_norm(read_state_dict(path_or_state_dict))
  if not any(k.startswith("bert.") for k in state):
    raise CheckpointError("Hugging Face BERT checkpoint: expected BertForMaskedLM naming "
                          "('bert.*', 'cls.predictions.*'), found keys like "
                          f"{sorted(state)[:3]}")
  rules = bert_rules(cfg, "bert.", ("bert",), cross_attention=False) + mlm_rules("cls.", ("bert",))
  params = unstack_layers(params, cfg)
  filled = apply_rules(state, rules, flat_shapes(params), dropped=HF_BERT_DROPPED,
                       source="Hugging Face BERT checkpoint")
  return stack_layers(replace_leaves(params, filled, ()), cfg)


def load_vit_checkpoint(path_or_state_dict: Any, cfg: ml_collections.ConfigDict, params: Any) -> Any:
  """DeiT / timm ViT (state dict possibly under "model") into `params["vit"]`.

  The classifier head is dropped; the MIM `mask_token` keeps its value from `params`
  when the checkpoint has none (DeiT); the position embedding is resized to
  `cfg.image_size`. Returns a new params tree.
  """
  state = read_state_dict(path_or_state_dict)
  rules = vit_rules(cfg, "", ("vit",), cfg.use_mask_token)
  params = unstack_layers(params, cfg)
  filled = apply_rules(state, rules, flat_shapes(params), dropped=DEIT_DROPPED,
                       optional=("mask_token",), source="ViT checkpoint")
  return stack_layers(replace_leaves(params, filled, ()), cfg)
