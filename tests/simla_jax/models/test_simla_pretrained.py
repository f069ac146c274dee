"""Initialisation from public weights: DeiT (timm / HF files) and bert-base-uncased (HF
files) into the sharded train state, cross-attention left as the official code leaves it."""

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import numpy as np
import pytest
import torch

from configs import simla as simla_config
from simla_jax import convert
from simla_jax import pretrained
from simla_jax import train as simla_train
from simla_jax.data import pipeline
from simla_jax.models import MOMENTUM_MODULES, SIMLA, init_params
from simla_jax.models import vit as vit_lib
from simla_torch_refs import hf_mlm, hf_vit, ref_config, rel_err, torch_images, vit_to_timm
from train_jax import sharding

TOL = 1e-5


def _hf_bert(cfg, vocab_size, seed):
  """A random BertForMaskedLM; token types zeroed, as SIMLA's BERT has none (the official
  model drops them, so outputs agree only where they add nothing)."""
  c = cfg.copy_and_resolve_references()
  c.bert.vocab_size = vocab_size
  bert = hf_mlm(c, seed)
  with torch.no_grad():
    bert.bert.embeddings.token_type_embeddings.weight.zero_()
  return bert


def test_public_weights_initialise_the_sharded_state(tmp_path):
  c = simla_config.get_config("tiny")
  vocab = pipeline.make_tokenizer(c.data).vocab_size
  model_cfg = c.model.copy_and_resolve_references()
  model_cfg.bert.vocab_size, model_cfg.codebook_size = vocab, c.data.mim.codebook_size
  # DeiT at 64 px (4x4 patches) into the 32 px model (2x2): positions interpolated.
  deit_cfg = model_cfg.copy_and_resolve_references()
  deit_cfg.image_size = 64
  deit = {k: torch.from_numpy(v) for k, v in vit_to_timm(hf_vit(deit_cfg, 1)).items()
          if k != "mask_token"}
  deit["head.weight"], deit["head.bias"] = torch.zeros(1000, 64), torch.zeros(1000)
  torch.save({"model": deit}, tmp_path / "deit.pth")
  bert = _hf_bert(model_cfg, vocab, 2)
  bert.save_pretrained(tmp_path / "bert")
  c.init.vit, c.init.bert = str(tmp_path / "deit.pth"), str(tmp_path / "bert/model.safetensors")

  mesh = sharding.make_mesh(c.mesh)
  assert mesh.size == 8
  task = simla_train.make_task(c, mesh)
  state, _ = sharding.sharded_init(task.init, mesh, c.axis_rules, jax.random.key(c.seed))
  params = jax.device_get(state.params)

  vit = params["vit"]
  np.testing.assert_allclose(vit["pos_embed"],
                             vit_lib.interpolate_pos_embed(deit["pos_embed"].numpy(), 4),
                             rtol=1e-6)
  np.testing.assert_array_equal(vit["block_1"]["mlp"]["fc1"]["kernel"],
                                deit["blocks.1.mlp.fc1.weight"].numpy().T)
  # Everything the files do not hold keeps the random init of the same key: every
  # cross-attention (N(0, 0.02), LayerNorm 1 / 0, bias 0), the mask token, the heads.
  k_params = jax.random.split(jax.random.key(c.seed), 3)[0]
  random = nn.meta.unbox(init_params(SIMLA(model_cfg), k_params))
  loaded = {**convert.vit_init_leaves(c.init.vit, model_cfg),
            **convert.bert_init_leaves(c.init.bert, model_cfg)}
  flat, flat_random = traverse_util.flatten_dict(params), traverse_util.flatten_dict(random)
  kept = [k for k in flat if k not in loaded]
  assert any("crossattention" in k for k in kept) and ("vit", "mask_token") in kept
  assert not any("crossattention" in k for k in loaded)
  for k in kept:
    np.testing.assert_allclose(flat[k], flat_random[k], rtol=1e-6, atol=1e-7, err_msg=str(k))
  cross = flat[("bert", "layer_0", "crossattention", "query", "kernel")]
  assert abs(cross.std() - model_cfg.init_std) < 0.1 * model_cfg.init_std
  # Momentum copies are taken after loading: momentum = online.
  for name in MOMENTUM_MODULES:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extras["momentum"][name]),
                 params[name])

  # The loaded BERT in text mode is the HF BERT; the MLM head too.
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  model = SIMLA(model_cfg)
  text = model.apply({"params": params}, ids, mask, method="embed_text")
  mlm = model.apply({"params": params}, text, method="mlm_logits")
  with torch.no_grad():
    ref = bert(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
  errs = {"text": rel_err(text, ref.hidden_states[-1].numpy()),
          "mlm": rel_err(mlm, ref.logits.numpy())}
  print("bert-base-style init parity (max rel err):", errs)
  assert max(errs.values()) < TOL, errs


def test_hugging_face_vit_file_is_the_torch_vit(tmp_path):
  cfg = ref_config()
  vit = hf_vit(cfg, 5)
  vit.save_pretrained(tmp_path / "vit")   # the hub layout (encoder.layer.i.attention.attention.*)
  leaves = convert.vit_init_leaves(str(tmp_path / "vit/model.safetensors"), cfg)
  model = SIMLA(cfg)
  params = convert.replace_leaves(nn.meta.unbox(init_params(model, jax.random.key(0))),
                                  {k: v for k, v in leaves.items()})
  images = np.random.default_rng(1).standard_normal(
      (2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ours = model.apply({"params": params}, images, method="embed_image")
  with torch.no_grad():
    ref = vit(pixel_values=torch_images(images)).last_hidden_state.numpy()
  assert rel_err(ours, ref) < TOL
  # Same leaves as the timm naming of the same weights.
  timm = convert.vit_init_leaves(vit_to_timm(vit), cfg)
  assert sorted(timm) == sorted(leaves)
  for k in timm:
    np.testing.assert_array_equal(timm[k], leaves[k], err_msg=str(k))


def test_paper_config_names_a_missing_weights_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = simla_config.get_config("paper")
  assert c.init.vit and c.init.bert and c.data.tokenizer.vocab_file
  with pytest.raises(FileNotFoundError, match=r"config\.init\.vit: weights/deit_base"):
    simla_train.make_task(c, None)
  c.init.vit = ""
  with pytest.raises(FileNotFoundError, match=r"config\.init\.bert: .*pytorch_model\.bin"):
    pretrained.check_files(c.init)


def test_public_weights_into_the_scanned_model(tmp_path):
  """model.scan_layers: the per-layer weights are stacked; the BERT is still the HF one."""
  cfg = ref_config()
  cfg.scan_layers = True
  bert = _hf_bert(cfg, cfg.bert.vocab_size, 4)
  bert.save_pretrained(tmp_path / "bert")
  init_cfg = pretrained.init_config()
  init_cfg.bert = str(tmp_path / "bert/model.safetensors")
  leaves = pretrained.load_public_weights(init_cfg, cfg)
  assert ("bert", "encoder", "layer", "attention", "query", "kernel") in leaves
  model = SIMLA(cfg)
  params = nn.meta.unbox(pretrained.with_weights(init_params(model, jax.random.key(0)), leaves))
  ids = np.random.default_rng(0).integers(1, cfg.bert.vocab_size, (2, 5)).astype(np.int32)
  text = model.apply({"params": params}, ids, np.ones_like(ids), method="embed_text")
  with torch.no_grad():
    ref = bert(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
  assert rel_err(text, ref.hidden_states[-1].numpy()) < TOL
