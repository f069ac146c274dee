"""The NLVR2 two-image BERT (official models/simla/{pretrain_nlvr,nlvr}.py, xbert.py).

The official code rebuilds the pretrained 12-layer BERT as 18 layers with cross-attention
in every layer (`fusion_layer = 0`): layers 0-5 are the pretrained 0-5, and each upper
layer j = 6..11 is copied twice, into layers 6 + 2 (j - 6) and 7 + 2 (j - 6) (the key remap
of Pretrain_NLVR.py). Layer i cross-attends image i mod 2 (xbert's
`(layer_num - fusion_layer) % 2`). Within each copied pair the cross-attention key and
value projections are ONE set of weights (`share_cross_attention`: `crossattention.self.
key` / `.value` of the two layers are the same torch Parameter); queries, outputs and
every other weight of the two copies train apart.

Here `duplicate_from` (d) generalises the rule to any depth L: layers 0..d-1 are kept,
layers d..L-1 are duplicated, 2L - d layers in all. The official model is L = 12, d = 6;
the CPU model (3 layers) uses d = L // 2 = 1: layers (0, 1, 1, 2, 2) of the pretrained
stack, attending images (0, 1, 0, 1, 0).

Parameters (one layout, whether the layers run unrolled or scanned):
  embeddings   the pretrained BERT embeddings;
  layer        every NLVR layer's BertLayer parameters except the cross-attention key /
               value, stacked on a leading `layers` axis of length 2L - d;
  cross_kv     {key, value} stacked on a leading axis of length L: entry j is pretrained
               layer j's, used by every NLVR layer copied from j (so a shared projection is
               one array, whose gradient sums both layers').
`scan_layers` runs the layers as one `jax.lax.scan` (one layer body in the program),
otherwise unrolled; both compute the same function of the same parameters.

Not reproduced: xbert's token-type embeddings (the SIMLA checkpoint has none, so the
official model adds bert-base-uncased's token-type-0 vector, untouched by pretraining);
this encoder keeps the pretrained embeddings as they are.
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simla_jax.models import bert as bert_lib
from simla_jax.models import layers

KV = ("key", "value")   # the cross-attention projections a duplicated pair shares


def layer_sources(num_layers: int, duplicate_from: int) -> tuple[int, ...]:
  """Pretrained layer each NLVR layer is copied from: 0..d-1, then d, d, d+1, d+1, ..."""
  if not 0 <= duplicate_from <= num_layers:
    raise ValueError(f"nlvr duplicate_from {duplicate_from} must be in [0, {num_layers}]")
  kept = tuple(range(duplicate_from))
  return kept + tuple(j for j in range(duplicate_from, num_layers) for _ in range(2))


def image_of_layer(i: int) -> int:
  """Which of the two images layer i cross-attends (xbert, fusion_layer 0)."""
  return i % 2


def default_duplicate_from(num_layers: int) -> int:
  """The official 6 of 12; the upper half (rounded up) of other depths."""
  return num_layers // 2


@dataclasses.dataclass(frozen=True)
class NlvrBert:
  """Two-image BERT; `init` / `apply` are pure functions of an explicit params tree."""
  vocab_size: int
  hidden: int
  num_layers: int          # of the pretrained BERT
  heads: int
  ffn: int
  duplicate_from: int
  max_position: int = 512
  dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  init_std: float = 0.02
  scan_layers: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = "einsum"

  @classmethod
  def from_model_config(cls, model_cfg, duplicate_from: int) -> "NlvrBert":
    """From a SIMLA model config (configs/simla_model.py); -1 = default_duplicate_from."""
    b = model_cfg.bert
    d = default_duplicate_from(b.layers) if duplicate_from < 0 else int(duplicate_from)
    return cls(vocab_size=int(b.vocab_size), hidden=int(b.hidden), num_layers=int(b.layers),
               heads=int(b.heads), ffn=int(b.ffn), duplicate_from=d,
               max_position=int(b.max_position), dropout=float(b.dropout),
               attention_dropout=float(b.attention_dropout),
               layer_norm_eps=float(b.layer_norm_eps), init_std=float(model_cfg.init_std),
               scan_layers=bool(model_cfg.get("scan_layers", False)),
               dtype=jnp.dtype(model_cfg.dtype), attention_impl=model_cfg.attention_impl)

  @property
  def sources(self) -> tuple[int, ...]:
    return layer_sources(self.num_layers, self.duplicate_from)

  @property
  def depth(self) -> int:
    return len(self.sources)

  def embeddings(self) -> bert_lib.BertEmbeddings:
    return bert_lib.BertEmbeddings(self.vocab_size, self.hidden, self.max_position,
                                   self.layer_norm_eps, self.dropout, self.init_std, self.dtype)

  def layer(self) -> bert_lib.BertLayer:
    return bert_lib.BertLayer(self.hidden, self.heads, self.ffn, self.dropout,
                              self.attention_dropout, self.layer_norm_eps, self.init_std,
                              self.dtype, self.attention_impl)

  # --- parameters -----------------------------------------------------------------------------

  def init(self, rng: jax.Array, image_width: int) -> dict:
    """Fresh parameters (BERT init), boxed with logical axis names."""
    k_emb, *k_layers = jax.random.split(rng, 1 + self.num_layers)
    ids = jnp.zeros((1, 2), jnp.int32)
    x = jnp.zeros((1, 2, self.hidden), jnp.float32)
    kv = jnp.zeros((1, 2, image_width), jnp.float32)
    emb = self.embeddings().init(k_emb, ids)["params"]
    pretrained = {f"layer_{j}": self.layer().init(k, x, None, kv)["params"]
                  for j, k in enumerate(k_layers)}
    return from_pretrained_bert(dict(embeddings=emb, **pretrained), self.num_layers,
                                self.duplicate_from)

  # --- forward --------------------------------------------------------------------------------

  def apply(self, params: Mapping[str, Any], ids: jax.Array, mask: jax.Array,
            image0_seq: jax.Array, image1_seq: jax.Array, *, deterministic: bool = True,
            rng: jax.Array | None = None) -> jax.Array:
    """ids, mask (b, l); image sequences (b, k, width) -> (b, l, hidden).

    `rng` (with deterministic=False) draws dropout, folded in per layer."""
    if not deterministic and rng is None:
      raise ValueError("NlvrBert.apply: dropout (deterministic=False) needs an rng")
    kw = lambda i: ({} if deterministic else {"rngs": {"dropout": jax.random.fold_in(rng, i)}})
    x = self.embeddings().apply({"params": params["embeddings"]}, ids,
                                deterministic=deterministic, **kw(self.depth))
    bias = layers.mask_to_bias(mask)
    images = jnp.stack([image0_seq, image1_seq]).astype(self.dtype)   # (2, b, k, width)
    layer = self.layer()
    sources = np.asarray(self.sources)

    def run(x, p, i):
      p = dict(p, crossattention=dict(p["crossattention"], **p.pop("_kv")))
      out, _ = layer.apply({"params": p}, x, bias, images[i % 2], None, None, deterministic,
                           False, None, **kw(i))
      return out

    if self.scan_layers:
      stacked = dict(params["layer"], _kv=jax.tree.map(lambda a: a[sources], params["cross_kv"]))

      def body(x, xs):
        p, i = xs
        return run(x, dict(p), i), None
      x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(self.depth)))
      return x
    for i, s in enumerate(self.sources):
      p = jax.tree.map(lambda a: a[i], params["layer"])
      p["_kv"] = jax.tree.map(lambda a: a[s], params["cross_kv"])
      x = run(x, p, i)
    return x


# --------------------------------------------------------------------------- conversion
def _stack(trees, boxed: bool):
  """Stacks trees on a new leading axis; a boxed leaf gets the logical name `layers`."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

  def stack(*leaves):
    if is_box(leaves[0]):
      value = jnp.stack([l.value for l in leaves]) if boxed else np.stack(
          [np.asarray(l.value) for l in leaves])
      return leaves[0].replace(value=value, names=("layers",) + tuple(leaves[0].names))
    return np.stack([np.asarray(l) for l in leaves])
  return jax.tree.map(stack, *trees, is_leaf=is_box)


def from_pretrained_bert(bert: Mapping[str, Any], num_layers: int,
                         duplicate_from: int) -> dict:
  """The NLVR encoder's params from a pretrained SIMLA BERT in the per-layer layout
  (`embeddings`, `layer_0..layer_{L-1}`; `convert.unstack_layers` makes it from a scanned
  tree; the MLM head is dropped): the official key remap plus the shared key / value.
  Works on numpy trees and on boxed (logically partitioned) ones."""
  missing = [f"layer_{j}" for j in range(num_layers) if f"layer_{j}" not in bert]
  if "embeddings" not in bert or missing:
    raise ValueError(f"nlvr: the pretrained BERT lacks {['embeddings'] * ('embeddings' not in bert) + missing}")
  boxed = any(isinstance(x, nn.meta.AxisMetadata) for x in jax.tree.leaves(
      bert, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))
  rest, kv = [], []
  for j in range(num_layers):
    layer = dict(bert[f"layer_{j}"])
    cross = dict(layer["crossattention"])
    kv.append({k: cross.pop(k) for k in KV})
    layer["crossattention"] = cross
    rest.append(layer)
  sources = layer_sources(num_layers, duplicate_from)
  return {"embeddings": bert["embeddings"],
          "layer": _stack([rest[s] for s in sources], boxed),
          "cross_kv": _stack(kv, boxed)}
