"""SIMLA network sizes: `model_config(size)` is nested as `config.model` by the run config.

Sizes:
  tiny   the CPU test size of the reference measurements in specs/simla.md §7
         (32 px, 4 patches; ViT 2x64; BERT 4x64; vocab 128; 1,003,267 parameters).
  small  the §7 "small" size: 64 px, ViT 6x384, BERT 6x384, full WordPiece vocab
         (48,442,615 parameters).
  base   the official model: ViT-B/16 at 256 px + BERT-base with cross-attention in
         all 12 layers (238,264,183 parameters, 224.1M without the MIM/concept heads).
"""

import ml_collections

_SIZES = {
    # image, patch, (vit width, depth, heads), (bert hidden, layers, heads), vocab, embed
    "tiny": dict(image_size=32, patch_size=16, vit=(64, 2, 4), bert=(64, 4, 4),
                 vocab_size=128, embed_dim=32),
    "small": dict(image_size=64, patch_size=16, vit=(384, 6, 6), bert=(384, 6, 6),
                  vocab_size=30522, embed_dim=256),
    "base": dict(image_size=256, patch_size=16, vit=(768, 12, 12), bert=(768, 12, 12),
                 vocab_size=30522, embed_dim=256),
}


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """The SIMLA network of the given size ("tiny" | "small" | "base")."""
  if size not in _SIZES:
    raise ValueError(f"model_config: unknown size {size!r}; choose one of {sorted(_SIZES)}")
  s = _SIZES[size]
  vit_width, vit_depth, vit_heads = s["vit"]
  hidden, layers, heads = s["bert"]
  c = ml_collections.ConfigDict()
  c.size = size
  # "simla": one BERT whose every layer cross-attends in multimodal mode (text mode runs all
  # layers without it). "albef": the ALBEF baseline, a text stack then a fusion stack
  # (bert.fusion_start), trained with ITC + ITM + MLM only (simla_jax/models/simla.py).
  c.architecture = "simla"
  c.image_size = s["image_size"]          # square input, pixels
  c.patch_size = s["patch_size"]
  c.vit = ml_collections.ConfigDict(dict(
      width=vit_width, depth=vit_depth, heads=vit_heads,
      mlp_dim=4 * vit_width,               # DeiT mlp_ratio 4
      drop_path=0.0,                       # stochastic depth at the last block (linear ramp)
      layer_norm_eps=1e-6,
  ))
  c.bert = ml_collections.ConfigDict(dict(
      hidden=hidden, layers=layers, heads=heads,
      ffn=4 * hidden,
      max_position=512,
      dropout=0.1,                         # embeddings and every residual branch
      attention_dropout=0.1,               # attention probabilities
      vocab_size=s["vocab_size"],
      layer_norm_eps=1e-12,
      # architecture "albef" only: layers [0, fusion_start) text-only, the rest fusion
      # (-1 = layers // 2; ALBEF-base: 6 of 12).
      fusion_start=-1,
  ))
  c.embed_dim = s["embed_dim"]            # ITC projection size (vision_proj / text_proj)
  c.codebook_size = 8192                  # DALL-E dVAE codes, MIM targets
  c.temp_init = 0.07
  c.temp_min = 0.001                      # ITC temperature clamp
  c.temp_max = 0.5
  c.momentum = 0.995                      # EMA of the momentum copies
  c.init_std = 0.02                       # BERT normal / ViT truncated-normal init
  c.use_mask_token = True                 # fine-tuning models of the official code drop it
  c.remat = False                         # nn.remat around every ViT block and BERT layer
  c.remat_policy = "nothing_saveable"     # what remat keeps (simla_jax.models.layers.REMAT_POLICIES)
  # ViT blocks and BERT layers as one nn.scan each (parameters stacked on a leading
  # `layers` axis): compile time no longer grows with depth. On for the accelerator size.
  c.scan_layers = size == "base"
  c.dtype = "float32"                     # compute dtype; parameters stay float32
  # "einsum" computes attention explicitly; "xla" / "cudnn" use jax.nn.dot_product_attention
  # wherever attention probabilities and attention dropout are not needed.
  c.attention_impl = "einsum"
  return c


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  return model_config(arg)
