"""PyTorch references for the SIMLA model tests: HF modules with random weights and the
official checkpoint layout built from their state dicts (imported by the test files here)."""

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np
import torch
from transformers import BertConfig, BertForMaskedLM, BlipTextConfig, ViTConfig, ViTModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from configs.simla_model import model_config
from simla_jax.models import SIMLA, init_params


def ref_config(bert_layers: int = 2, patch_size: int = 8, **overrides):
  """The tiny model with 2 BERT layers and 16 patches (32 px / 8): cheap but not degenerate."""
  cfg = model_config("tiny")
  cfg.bert.layers = bert_layers
  cfg.patch_size = patch_size
  cfg.codebook_size = 64
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def ref_model(cfg, seed: int = 0):
  """(SIMLA(cfg), its unboxed random parameters)."""
  model = SIMLA(cfg)
  return model, nn.meta.unbox(init_params(model, jax.random.key(seed)))


def xla_flops(lowered) -> float:
  """FLOPs of a lowered computation from XLA's cost analysis (which counts the body of a
  scan once: compare FLOPs of unrolled layers)."""
  cost = lowered.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random (biases, LayerNorms and tokens too), so no mapping error hides
  behind a zero or one."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "LayerNorm" in name or "layernorm" in name:
        p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
      else:
        p.copy_(0.05 * noise)
  return module.eval()


def hf_text(cfg, seed: int = 0) -> BlipTextModel:
  """BlipTextModel = the med-style BERT with cross-attention in every layer."""
  c = BlipTextConfig(vocab_size=cfg.bert.vocab_size, hidden_size=cfg.bert.hidden,
                     encoder_hidden_size=cfg.vit.width, intermediate_size=cfg.bert.ffn,
                     num_hidden_layers=cfg.bert.layers, num_attention_heads=cfg.bert.heads,
                     max_position_embeddings=cfg.bert.max_position, hidden_act="gelu",
                     layer_norm_eps=cfg.bert.layer_norm_eps, is_decoder=True,
                     bos_token_id=None, attn_implementation="eager")
  return randomize(BlipTextModel(c, add_pooling_layer=False), seed)


def hf_vit(cfg, seed: int = 0) -> ViTModel:
  c = ViTConfig(hidden_size=cfg.vit.width, num_hidden_layers=cfg.vit.depth,
                num_attention_heads=cfg.vit.heads, intermediate_size=cfg.vit.mlp_dim,
                image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                layer_norm_eps=cfg.vit.layer_norm_eps, qkv_bias=True, hidden_act="gelu",
                attn_implementation="eager")
  return randomize(ViTModel(c, add_pooling_layer=False, use_mask_token=True), seed)


def hf_mlm(cfg, seed: int = 0) -> BertForMaskedLM:
  c = BertConfig(vocab_size=cfg.bert.vocab_size, hidden_size=cfg.bert.hidden,
                 num_hidden_layers=cfg.bert.layers, num_attention_heads=cfg.bert.heads,
                 intermediate_size=cfg.bert.ffn, max_position_embeddings=cfg.bert.max_position,
                 hidden_act="gelu", layer_norm_eps=cfg.bert.layer_norm_eps,
                 attn_implementation="eager")
  return randomize(BertForMaskedLM(c), seed)


def linear(n_in: int, n_out: int, seed: int) -> torch.nn.Linear:
  return randomize(torch.nn.Linear(n_in, n_out), seed)


def np_state(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
  return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def vit_to_timm(vit: ViTModel, prefix: str = "") -> dict[str, np.ndarray]:
  """HF ViTModel weights under timm / official `models/vit.py` names (fused qkv)."""
  s = np_state(vit)
  out = {f"{prefix}cls_token": s["embeddings.cls_token"],
         f"{prefix}mask_token": s["embeddings.mask_token"],
         f"{prefix}pos_embed": s["embeddings.position_embeddings"],
         f"{prefix}patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
         f"{prefix}patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
         f"{prefix}norm.weight": s["layernorm.weight"], f"{prefix}norm.bias": s["layernorm.bias"]}
  depth = vit.config.num_hidden_layers
  for i in range(depth):
    h, b = f"layers.{i}.", f"{prefix}blocks.{i}."
    for t in ("weight", "bias"):
      out[b + f"attn.qkv.{t}"] = np.concatenate(
          [s[h + f"attention.{n}_proj.{t}"] for n in ("q", "k", "v")], axis=0)
      out[b + f"attn.proj.{t}"] = s[h + f"attention.o_proj.{t}"]
      out[b + f"norm1.{t}"] = s[h + f"layernorm_before.{t}"]
      out[b + f"norm2.{t}"] = s[h + f"layernorm_after.{t}"]
      out[b + f"mlp.fc1.{t}"] = s[h + f"mlp.fc1.{t}"]
      out[b + f"mlp.fc2.{t}"] = s[h + f"mlp.fc2.{t}"]
  assert len(out) == len(s) - 4 * depth   # every HF tensor used once (q, k, v fused)
  return out


def official_state_dict(cfg, seed: int):
  """A state dict laid out like the official SIMLA pretraining checkpoint.

  Online and momentum halves come from different random HF modules. Returns the
  state dict and the torch modules {name: module} it was built from.
  """
  mods = {}
  sd = {}
  hidden, width, embed = cfg.bert.hidden, cfg.vit.width, cfg.embed_dim
  for suffix, s in (("", seed), ("_m", seed + 100)):
    vit, text, mlm = hf_vit(cfg, s), hf_text(cfg, s + 1), hf_mlm(cfg, s + 2)
    heads = dict(vision_proj=linear(width, embed, s + 3), text_proj=linear(hidden, embed, s + 4),
                 mim_head=linear(hidden, cfg.codebook_size, s + 5),
                 concept_head=linear(embed, cfg.bert.vocab_size, s + 6))
    if not suffix:
      heads["itm_head"] = linear(hidden, 2, s + 7)
    sd.update(vit_to_timm(vit, f"visual_encoder{suffix}."))
    sd.update(np_state(text, f"text_encoder{suffix}.bert."))
    # med.py registers position_ids as a persistent buffer.
    sd[f"text_encoder{suffix}.bert.embeddings.position_ids"] = (
        np.arange(cfg.bert.max_position, dtype=np.int64)[None])
    cls = {k: v for k, v in np_state(mlm).items() if k.startswith("cls.")}
    # Tie the decoder to this BERT's word embeddings, as the official model does.
    cls["cls.predictions.decoder.weight"] = sd[
        f"text_encoder{suffix}.bert.embeddings.word_embeddings.weight"].copy()
    cls["cls.predictions.decoder.bias"] = cls["cls.predictions.bias"].copy()
    sd.update({f"text_encoder{suffix}.{k}": v for k, v in cls.items()})
    for name, m in heads.items():
      sd.update(np_state(m, f"{name}{suffix}."))
    mods.update({f"vit{suffix}": vit, f"text{suffix}": text, f"mlm{suffix}": mlm,
                 **{f"{n}{suffix}": m for n, m in heads.items()}})
  sd["temp"] = np.asarray(0.07, np.float32)
  rng = np.random.default_rng(seed)
  for name in ("image_queue", "text_queue"):
    q = rng.standard_normal((embed, 64)).astype(np.float32)
    sd[name] = q / np.linalg.norm(q, axis=0, keepdims=True)
  sd["queue_ptr"] = np.asarray([16], np.int64)
  return sd, mods


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def torch_images(images: np.ndarray) -> torch.Tensor:
  """NHWC numpy -> NCHW torch."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@contextlib.contextmanager
def cross_attention_mask(text: BlipTextModel, mask: np.ndarray):
  """Makes BlipTextModel apply a cross-attention key mask, as the official med.py does.

  transformers 5.24's BlipTextAttention does not pass `encoder_attention_mask` on to its
  attention (the mask is silently ignored), so it is injected here in med.py's additive
  form, (1 - mask) * -10000, broadcast over heads and queries.
  """
  bias = (1.0 - torch.from_numpy(np.asarray(mask, np.float32)))[:, None, None, :] * -10000.0
  originals = []
  for layer in text.encoder.layer:
    attn = layer.crossattention.self
    originals.append((attn, attn.forward))
    attn.forward = functools.partial(
        lambda *a, _f, **kw: _f(*a, **{**kw, "encoder_attention_mask": bias}), _f=attn.forward)
  try:
    yield
  finally:
    for attn, forward in originals:
      attn.forward = forward
