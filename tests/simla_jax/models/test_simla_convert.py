"""Checkpoint conversion: the official SIMLA layout, Hugging Face BERT and DeiT / timm ViT.

The fake official checkpoint is built from HF modules' state dicts renamed to the
official names (timm `visual_encoder.blocks.i.attn.qkv.*`, med `text_encoder.bert.*`
with `crossattention`, ...), so the converter is checked against real naming and the
loaded model against the modules the weights came from. Every test runs with the layers
unrolled and scanned (`model.scan_layers`: the converters read and write stacked layers).
"""

import argparse

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


# --- fine-tuned layouts ----------------------------------------------------------------------

_PRETRAIN_ONLY = ("mim_head", "mim_head_m", "concept_head", "concept_head_m")


def _downstream(sd, momentum=True):
  """The official pretraining state dict as a downstream script's model holds it: `.bert.`
  stripped (BertModel), no MLM / MIM / concept heads, no mask token, no queues."""
  out = {}
  for k, v in sd.items():
    if (k.split(".")[0] in _PRETRAIN_ONLY or ".cls." in k or k.endswith("mask_token")
        or k in ("image_queue", "text_queue", "queue_ptr")):
      continue
    if not momentum and k.split(".")[0].endswith("_m"):
      continue
    out[k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.",
                                                                 "text_encoder_m.")] = v
  return out


def _retrieval(sd):
  """models/simla/retrieval.py's state dict: + queues and the (never updated) idx_queue."""
  out = {k: v for k, v in _downstream(sd).items() if not k.startswith("itm_head_m")}
  out.update({k: sd[k] for k in ("image_queue", "text_queue", "queue_ptr")})
  out["idx_queue"] = np.full((1, sd["image_queue"].shape[1]), -100, np.int64)
  return out


def _finetune_cfg(cfg):
  c = cfg.copy_and_resolve_references()
  c.use_mask_token = False          # fine-tuning configs set vit_mask_token: false
  return c


def _per_layer_cfg(cfg):
  """Loads that leave one layer partly filled exist only unrolled: `scan_layers` stacks
  every layer and refuses unequal ones (test_fine_tuned_layout_into_the_scanned_model)."""
  c = _finetune_cfg(cfg)
  c.scan_layers = False
  return c


def test_retrieval_layout_loads_and_reproduces_outputs(official):
  cfg, sd, mods, *_ = official
  cfg = _finetune_cfg(cfg)
  ck = convert.read_official_checkpoint(_retrieval(sd), cfg)
  assert (ck.layout, ck.albef) == ("retrieval", False)
  assert {"params/mim_head", "params/concept_head", "params/bert/mlm_head",
          "params_m/mim_head"} <= set(ck.absent)
  assert not any(a.endswith(("/vit", "/itm_head", "/vision_proj")) for a in ck.absent)
  assert ck.queues["idx_queue"].shape == (64,) and int(ck.queues["queue_ptr"]) == 16
  model = SIMLA(cfg)
  init = nn.meta.unbox(init_params(model, jax.random.key(3)))
  p = convert.merge_params(init, ck.params)
  pm = convert.merge_params({k: init[k] for k in MOMENTUM_MODULES}, ck.params_m)
  rng = np.random.default_rng(5)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.bert.vocab_size, (2, 6)).astype(np.int32)
  mask = np.ones_like(ids)
  errs = {}
  for name, tree in (("", p), ("_m", pm)):
    run = lambda method, *a, t=tree: model.apply({"params": t}, *a, method=method)
    image_seq = run("embed_image", images)
    fused = run("fuse", ids, mask, image_seq)
    ours = {"image_feat": run("image_feature", image_seq),
            "text_feat": run("text_feature", run("embed_text", ids, mask)), "fused": fused}
    with torch.no_grad():
      seq_ref = mods[f"vit{name}"](pixel_values=torch_images(images)).last_hidden_state
      text = mods[f"text{name}"]
      fused_ref = text(input_ids=torch.from_numpy(ids).long(), encoder_hidden_states=seq_ref,
                       encoder_attention_mask=torch.ones(seq_ref.shape[:2])).last_hidden_state
      text_ref = text(input_ids=torch.from_numpy(ids).long()).last_hidden_state
      refs = {"image_feat": torch.nn.functional.normalize(
                  mods[f"vision_proj{name}"](seq_ref[:, 0]), dim=-1),
              "text_feat": torch.nn.functional.normalize(
                  mods[f"text_proj{name}"](text_ref[:, 0]), dim=-1),
              "fused": fused_ref}
      if not name:
        ours["itm"] = run("itm_logits", fused)
        refs["itm"] = mods["itm_head"](fused_ref[:, 0])
    errs.update({k + name: rel_err(ours[k], refs[k].numpy()) for k in ours})
  print("retrieval-layout parity (max rel err): "
        + ", ".join(f"{k} {v:.1e}" for k, v in sorted(errs.items())))
  assert max(errs.values()) < TOL, errs


def _task_layout(sd, layout, width, rng):
  """VE / NLVR2 / VQA / NLVR-pretraining state dicts: encoders + the task's own head."""
  lin = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  if layout == "ve" or layout == "nlvr":
    out = {k: v for k, v in _downstream(sd).items()
           if k.split(".")[0] in ("visual_encoder", "text_encoder", "visual_encoder_m",
                                  "text_encoder_m")}
    n = 3 if layout == "ve" else 2
    for head in ("cls_head", "cls_head_m"):
      out.update({f"{head}.0.weight": lin(width, width), f"{head}.0.bias": lin(width),
                  f"{head}.2.weight": lin(n, width), f"{head}.2.bias": lin(n)})
    return out
  if layout == "vqa":
    out = {k: v for k, v in _downstream(sd, momentum=False).items()
           if k.split(".")[0] in ("visual_encoder", "text_encoder")}
    out["text_decoder.bert.encoder.layer.0.crossattention.self.query.weight"] = lin(width, width)
    out["text_decoder.cls.predictions.bias"] = lin(8)
    return out
  out = {k: v for k, v in _downstream(sd, momentum=False).items()
         if k.split(".")[0] in ("visual_encoder", "text_encoder", "vision_proj", "text_proj",
                                "temp")}
  out.update({"ta_head.weight": lin(3, width), "ta_head.bias": lin(3)})
  return out


@pytest.mark.parametrize("layout", ["ve", "nlvr", "vqa", "nlvr_pretrain"])
def test_task_layouts_load_their_encoders_and_keep_their_heads(official, layout):
  cfg, sd, _, params, *_ = official
  cfg = _finetune_cfg(cfg)
  state = _task_layout(sd, layout, cfg.bert.hidden, np.random.default_rng(0))
  ck = convert.read_official_checkpoint(state, cfg)
  assert ck.layout == layout
  assert (ck.params_m is not None) == (layout in ("ve", "nlvr"))
  assert sorted(ck.extras) == sorted(k for k in state if k.startswith(convert.EXTRA_PREFIXES))
  for tree in ("vit", "bert"):
    want = traverse_util.flatten_dict(params[tree])
    got = traverse_util.flatten_dict(ck.params[tree])
    assert set(got) == {k for k in want if k[0] not in ("mlm_head", "mask_token")}
    for k in got:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{tree}/{k}")
  assert ("vision_proj" in ck.params) == (layout == "nlvr_pretrain")


def test_missing_and_unknown_keys_are_listed_and_can_be_ignored(official):
  cfg, sd, *_ = official
  cfg = _per_layer_cfg(cfg)
  state = _retrieval(sd)
  gone = "text_encoder.encoder.layer.1.output.dense.weight"
  bad = {**{k: v for k, v in state.items() if k != gone},
         "foo_head.weight": np.zeros((2, 3), np.float32), "itm_head_m.bias": np.zeros(2)}
  message = str(pytest.raises(convert.CheckpointError, convert.read_official_checkpoint,
                              bad, cfg).value)
  for fragment in (f"missing key {gone}", "unexpected key foo_head.weight with shape (2, 3)",
                   "unexpected key itm_head_m.bias", "retrieval layout", "ignore_missing="):
    assert fragment in message, (fragment, message)
  ck = convert.read_official_checkpoint(bad, cfg, ignore_missing=(gone,),
                                        ignore_unexpected=("foo_head.*", "itm_head_m.*"))
  assert "kernel" not in ck.params["bert"]["layer_1"]["mlp"]["fc2"]
  # A pretraining checkpoint into a target without the pretraining heads.
  ck = convert.read_official_checkpoint(sd, cfg)
  assert ck.layout == "pretrain" and "mim_head" in ck.params and ck.absent == ()


def test_albef_naming_folds_token_types(official):
  cfg, sd, *_ = official
  cfg = _per_layer_cfg(cfg)
  state = _retrieval(sd)
  tt = np.random.default_rng(2).standard_normal((2, cfg.bert.hidden)).astype(np.float32)
  state["text_encoder.embeddings.token_type_embeddings.weight"] = tt
  ck = convert.read_official_checkpoint(state, cfg)
  assert ck.albef and ck.layout == "retrieval"
  np.testing.assert_allclose(
      ck.params["bert"]["embeddings"]["position_embeddings"]["embedding"],
      state["text_encoder.embeddings.position_embeddings.weight"] + tt[0])
  # ALBEF's fusion layout: no cross-attention below the fusion layer.
  fusion = {k: v for k, v in state.items() if not k.startswith("text_encoder.encoder.layer.0.cross")}
  with pytest.raises(convert.CheckpointError, match="fusion layer"):
    convert.read_official_checkpoint(fusion, cfg)
  ck = convert.read_official_checkpoint(
      fusion, cfg, ignore_missing=("text_encoder.encoder.layer.0.crossattention.*",))
  assert "crossattention" not in ck.params["bert"]["layer_0"]


def test_official_pth_with_its_config(official, tmp_path):
  cfg, sd, *_ = official
  path = tmp_path / "checkpoint_best.pth"
  torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in _retrieval(sd).items()},
              "config": argparse.Namespace(image_res=384, k_test=128), "epoch": 4}, path)
  ck = convert.read_official_checkpoint(str(path), _finetune_cfg(cfg))
  assert ck.layout == "retrieval" and ck.config == {"image_res": 384, "k_test": 128}


def test_fine_tuned_layout_into_the_scanned_model(official):
  """With model.scan_layers the loaded trees are stacked and run the same network."""
  cfg, sd, mods, *_ = official
  cfg = _finetune_cfg(cfg)
  scan = cfg.copy_and_resolve_references()
  scan.scan_layers = True
  ck = convert.read_official_checkpoint(_retrieval(sd), scan)
  assert "blocks" in ck.params["vit"] and "block_0" not in ck.params["vit"]
  model = SIMLA(scan)
  p = convert.merge_params(nn.meta.unbox(init_params(model, jax.random.key(3))), ck.params)
  rng = np.random.default_rng(5)
  images = rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = rng.integers(1, cfg.bert.vocab_size, (2, 6)).astype(np.int32)
  image_seq = model.apply({"params": p}, images, method="embed_image")
  fused = model.apply({"params": p}, ids, np.ones_like(ids), image_seq, method="fuse")
  with torch.no_grad():
    seq_ref = mods["vit"](pixel_values=torch_images(images)).last_hidden_state
    fused_ref = mods["text"](input_ids=torch.from_numpy(ids).long(),
                             encoder_hidden_states=seq_ref,
                             encoder_attention_mask=torch.ones(seq_ref.shape[:2])).last_hidden_state
  assert rel_err(fused, fused_ref.numpy()) < TOL
  # A layer left partly unloaded cannot be stacked: the error says why.
  gone = {k: v for k, v in _retrieval(sd).items()
          if not k.startswith("text_encoder.encoder.layer.0.crossattention")}
  with pytest.raises(convert.CheckpointError, match="scan_layers"):
    convert.read_official_checkpoint(
        gone, scan, ignore_missing=("text_encoder.encoder.layer.0.crossattention.*",))
