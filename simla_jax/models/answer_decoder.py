"""The VQA answer decoder: a causal BERT over answer tokens (official `BertLMHeadModel`).

Each layer is the encoder's BertLayer: self-attention under a causal mask (position t
reads positions <= t that are not padding), cross-attention to the question-image
multimodal states, FFN; then the MLM head tied to the decoder's own word embeddings
gives next-token logits. The parameter tree mirrors `Bert`'s (`embeddings`,
`layer_i` | `encoder/layer`, `mlm_head`), so `from_encoder` can initialise it from a
pretrained BERT the way the official VQA.py key remap does: word / position
embeddings and MLM head copied, decoder layer i = encoder layer `first_layer + i`
(official: 6 layers from encoder layers 6-11).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from simla_jax.models import bert as bert_lib
from simla_jax.models import layers


def causal_bias(mask_b_l: jax.Array) -> jax.Array:
  """(b, l) padding mask -> additive (b, 1, l, l) bias: query t sees valid keys <= t
  (the official decoder's causal mask times the key padding mask, (1 - m) * -10000)."""
  length = mask_b_l.shape[1]
  causal_l_l = jnp.tril(jnp.ones((length, length), jnp.float32))
  keep_b_l_l = causal_l_l[None] * mask_b_l.astype(jnp.float32)[:, None, :]
  return ((1.0 - keep_b_l_l) * layers.MASK_BIAS)[:, None]


class AnswerDecoder(bert_lib.Bert):
  """Causal BERT decoder with cross-attention and an LM head; see the module doc. The
  fields, layers and parameter tree are `Bert`'s (SIMLA, no `fusion_start`)."""

  def layer_attention_impl(self) -> str:
    # cudnn attention takes only a key padding bias; the causal one needs the xla kernel.
    return "xla" if self.attention_impl == "cudnn" else self.attention_impl

  def __call__(self, ids_b_l: jax.Array, mask_b_l: jax.Array, states_n_k_d: jax.Array,
               states_mask_n_k: jax.Array | None = None, *,
               states_index_b: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    """Next-token logits (b, l, vocab): position t predicts token t + 1.

    states_n_k_d: multimodal question states the answers cross-attend to; with
      `states_index_b` (b,) answer row i reads states row states_index_b[i] (n < b:
      several answers per question, keys/values projected once per question),
      without it n = b.
    states_mask_n_k: their padding mask (question tokens), None = all valid.
    """
    if self.fusion_start is not None:
      raise ValueError("AnswerDecoder: every layer cross-attends (fusion_start must be None)")
    x = self.embed(ids_b_l, deterministic=deterministic)
    bias = causal_bias(mask_b_l)
    kv_bias = None if states_mask_n_k is None else layers.mask_to_bias(states_mask_n_k)
    if kv_bias is not None and states_index_b is not None:
      kv_bias = jnp.asarray(kv_bias)[states_index_b]
    if self.scan_layers:
      x, _ = self.encoder(x, bias, states_n_k_d, kv_bias, states_index_b, start=0,
                          stop=self.num_layers, deterministic=deterministic)
    else:
      for layer in self.layer:
        x, _ = layer(x, bias, states_n_k_d, kv_bias, states_index_b, deterministic, False, None)
    return self.mlm_logits(x).astype(jnp.float32)


def from_config(bert_cfg, decoder_cfg, *, init_std: float, scan_layers: bool, remat: bool,
                remat_policy: str, dtype, attention_impl: str) -> AnswerDecoder:
  """A decoder of `decoder_cfg.layers` layers shaped like the encoder `bert_cfg`."""
  return AnswerDecoder(
      vocab_size=int(bert_cfg.vocab_size), hidden=int(bert_cfg.hidden),
      num_layers=int(decoder_cfg.layers), heads=int(bert_cfg.heads), ffn=int(bert_cfg.ffn),
      max_position=int(bert_cfg.max_position), dropout=float(bert_cfg.dropout),
      attention_dropout=float(bert_cfg.attention_dropout),
      layer_norm_eps=float(bert_cfg.layer_norm_eps), init_std=float(init_std), remat=remat,
      remat_policy=remat_policy, scan_layers=scan_layers, dtype=dtype,
      attention_impl=attention_impl)


def from_encoder(bert_params: Mapping[str, Any], first_layer: int,
                 num_layers: int) -> dict[str, Any]:
  """Decoder parameters from a pretrained BERT tree (official VQA.py key remap).

  `bert_params` holds `embeddings`, `mlm_head` and either `layer_0..layer_{n-1}` or
  the stacked `encoder/layer` (leading `layers` axis); the result has the same layout
  with layers [first_layer, first_layer + num_layers) renumbered from 0. Arrays are
  copied (numpy), so the decoder and encoder train apart, as in the official model.
  """
  missing = [k for k in ("embeddings", "mlm_head") if k not in bert_params]
  if missing:
    raise ValueError(f"answer decoder init: the BERT parameters lack {missing} (the MLM head "
                     f"must be kept when loading the checkpoint)")
  copy = lambda tree: jax.tree.map(lambda a: np.array(a), tree)
  out = {"embeddings": copy(bert_params["embeddings"]), "mlm_head": copy(bert_params["mlm_head"])}
  stop = first_layer + num_layers
  if "encoder" in bert_params:
    stacked = bert_params["encoder"]["layer"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    if not 0 <= first_layer < stop <= depth:
      raise ValueError(f"answer decoder init: encoder layers [{first_layer}, {stop}) out of "
                       f"range for a {depth}-layer BERT")
    out["encoder"] = {"layer": jax.tree.map(lambda a: np.array(a[first_layer:stop]), stacked)}
    return out
  depth = sum(1 for k in bert_params if k.startswith("layer_"))
  if not 0 <= first_layer < stop <= depth:
    raise ValueError(f"answer decoder init: encoder layers [{first_layer}, {stop}) out of "
                     f"range for a {depth}-layer BERT")
  for i in range(num_layers):
    out[f"layer_{i}"] = copy(bert_params[f"layer_{first_layer + i}"])
  return out
