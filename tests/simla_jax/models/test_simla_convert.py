"""Checkpoint conversion: the official SIMLA layout, Hugging Face BERT and DeiT / timm ViT.

The fake official checkpoint is built from HF modules' state dicts renamed to the
official names (timm `visual_encoder.blocks.i.attn.qkv.*`, med `text_encoder.bert.*`
with `crossattention`, ...), so the converter is checked against real naming and the
loaded model against the modules the weights came from. Every test runs with the layers
unrolled and scanned (`model.scan_layers`: the converters read and write stacked layers).
"""

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import numpy as np
import pytest
import torch

from simla_jax import convert
from simla_jax.models import MOMENTUM_MODULES, SIMLA, init_params
from simla_jax.models import vit as vit_lib
from simla_torch_refs import official_state_dict, ref_config, rel_err, torch_images

TOL = 1e-5


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def official(request):
  cfg = ref_config(scan_layers=request.param)
  sd, mods = official_state_dict(cfg, seed=11)
  params, params_m, queues = convert.load_official_checkpoint(sd, cfg)
  return cfg, sd, mods, params, params_m, queues


def test_official_checkpoint_round_trips(official):
  cfg, sd, _, params, params_m, queues = official
  init = nn.meta.unbox(init_params(SIMLA(cfg), jax.random.key(0)))
  shapes = lambda t: jax.tree.map(np.shape, t)
  assert shapes(params) == shapes(init)
  assert sorted(params_m) == sorted(MOMENTUM_MODULES)
  assert shapes(params_m) == shapes({k: init[k] for k in MOMENTUM_MODULES})
  back = convert.to_official_state_dict(params, params_m, queues, cfg)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  np.testing.assert_array_equal(queues["image_queue"], sd["image_queue"].T)
  assert int(queues["queue_ptr"]) == 16 and float(params["temp"]) == pytest.approx(0.07)


def test_every_key_is_used_exactly_once(official):
  """Each source tensor lands in its own Flax leaves: no two keys fill the same leaf and
  every leaf is filled (load_official_checkpoint checks both; this counts them)."""
  cfg, sd, *_ = official
  rules = convert.official_rules(cfg)
  keys = [r.key for r in rules]
  paths = [p for r in rules if r.kind != "tied" for p in r.paths]
  assert len(keys) == len(set(keys)) and len(paths) == len(set(paths))
  dropped = {k for k in sd if k.endswith("position_ids")}
  queues = {"image_queue", "text_queue", "queue_ptr"}
  assert set(keys) | dropped | queues == set(sd)


def test_loaded_model_matches_the_torch_modules(official):
  cfg, sd, mods, params, params_m, _ = official
  model = SIMLA(cfg)
  rng = np.random.default_rng(4)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.bert.vocab_size, (2, 6)).astype(np.int32)
  mask = np.ones_like(ids)

  @jax.jit
  def run(p, pm):
    out = {}
    for name, tree in (("", p), ("_m", pm)):
      apply = lambda *a, method, t=tree: model.apply({"params": t}, *a, method=method)
      image_seq = apply(images, method="embed_image")
      fused = apply(ids, mask, image_seq, method="fuse")
      image_feat = apply(image_seq, method="image_feature")
      out.update({f"image_seq{name}": image_seq, f"fused{name}": fused,
                  f"mlm{name}": apply(fused, method="mlm_logits"),
                  f"mim{name}": apply(fused, method="mim_logits"),
                  f"image_feat{name}": image_feat,
                  f"concept{name}": apply(image_feat, method="concept_logits")})
    out["itm"] = model.apply({"params": p}, out["fused"], method="itm_logits")
    return out
  ours = run(params, params_m)
  errs = {}
  with torch.no_grad():
    for name in ("", "_m"):
      vit, text, mlm = mods[f"vit{name}"], mods[f"text{name}"], mods[f"mlm{name}"]
      image_seq = vit(pixel_values=torch_images(images)).last_hidden_state
      fused = text(input_ids=torch.from_numpy(ids).long(), encoder_hidden_states=image_seq,
                   encoder_attention_mask=torch.ones(image_seq.shape[:2])).last_hidden_state
      # The official decoder is tied to this BERT's word embeddings.
      mlm_ref = (mlm.cls.predictions.transform(fused) @ text.embeddings.word_embeddings.weight.T
                 + mlm.cls.predictions.bias)
      feat = torch.nn.functional.normalize(mods[f"vision_proj{name}"](image_seq[:, 0]), dim=-1)
      refs = {"image_seq": image_seq, "fused": fused, "mlm": mlm_ref,
              "mim": mods[f"mim_head{name}"](fused[:, 1:]), "image_feat": feat,
              "concept": mods[f"concept_head{name}"](feat)}
      if not name:
        refs["itm"] = mods["itm_head"](fused[:, 0])
      for k, ref in refs.items():
        errs[k + name] = rel_err(ours[k + name], ref.numpy())
  print("converted-model parity (max rel err): "
        + ", ".join(f"{k} {v:.1e}" for k, v in sorted(errs.items())))
  assert max(errs.values()) < TOL, errs


def _raises(sd, cfg, *fragments):
  with pytest.raises(convert.CheckpointError) as info:
    convert.load_official_checkpoint(sd, cfg)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def test_bad_checkpoints_raise_naming_the_key(official):
  cfg, sd, *_ = official
  key = "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight"
  _raises({**sd, key: np.zeros((64, 32), np.float32)}, cfg,
          key, "checkpoint shape (64, 32)", "model expects (64, 64)")
  qkv = "visual_encoder_m.blocks.0.attn.qkv.weight"
  _raises({**sd, qkv: np.zeros((190, 64), np.float32)}, cfg, qkv, "(190, 64)", "(192, 64)")
  missing = "mim_head_m.bias"
  _raises({k: v for k, v in sd.items() if k != missing}, cfg,
          f"missing key {missing}: model expects shape ({cfg.codebook_size},)")
  _raises({**sd, "itm_head_m.weight": np.zeros((2, 64), np.float32)}, cfg,
          "unexpected key itm_head_m.weight with shape (2, 64)")
  tied = "text_encoder.cls.predictions.decoder.weight"
  _raises({**sd, tied: sd[tied] + 1.0}, cfg, tied, "tied")
  _raises({k: v for k, v in sd.items() if k != "queue_ptr"}, cfg, "missing key queue_ptr")


def test_pth_file_and_other_resolution(official, tmp_path):
  cfg, sd, _, params, params_m, _ = official
  path = tmp_path / "checkpoint_00.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3,
              "config": {"lr": 1e-4, "image_res": cfg.image_size}}, path)
  big = cfg.copy_and_resolve_references()
  big.image_size = 48                                   # 6x6 patches instead of 4x4
  p2, pm2, _ = convert.load_official_checkpoint(str(path), big)
  for tree, prefix in ((p2, "visual_encoder."), (pm2, "visual_encoder_m.")):
    want = vit_lib.interpolate_pos_embed(sd[prefix + "pos_embed"], 36)
    np.testing.assert_array_equal(tree["vit"]["pos_embed"], want)
    assert want.shape == (1, 37, cfg.vit.width)
  flat, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(p2)
  for k in flat:
    if k[-1] != "pos_embed":
      np.testing.assert_array_equal(flat[k], flat2[k])
  # The interpolated model runs at the new resolution.
  seq = SIMLA(big).apply({"params": p2}, np.zeros((1, 48, 48, 3), np.float32),
                         method="embed_image")
  assert seq.shape == (1, 37, cfg.vit.width)


def test_deit_checkpoint_into_the_vit(official):
  cfg, sd, _, params, *_ = official
  init = nn.meta.unbox(init_params(SIMLA(cfg), jax.random.key(1)))
  prefix = "visual_encoder."
  deit = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and "mask_token" not in k}
  deit["head.weight"] = np.zeros((1000, cfg.vit.width), np.float32)   # classifier: dropped
  deit["head.bias"] = np.zeros((1000,), np.float32)
  loaded = convert.load_vit_checkpoint({"model": deit}, cfg, init)
  for k, v in traverse_util.flatten_dict(loaded["vit"]).items():
    if k == ("mask_token",):
      np.testing.assert_array_equal(v, init["vit"]["mask_token"])   # DeiT has none
    else:
      np.testing.assert_array_equal(v, traverse_util.flatten_dict(params["vit"])[k])
  np.testing.assert_array_equal(loaded["bert"]["embeddings"]["word_embeddings"]["embedding"],
                                init["bert"]["embeddings"]["word_embeddings"]["embedding"])
  with pytest.raises(convert.CheckpointError, match="unexpected key dist_token"):
    convert.load_vit_checkpoint({**deit, "dist_token": np.zeros((1, 1, 64), np.float32)},
                                cfg, init)
