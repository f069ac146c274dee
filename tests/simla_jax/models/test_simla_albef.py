"""`model.architecture = "albef"`: the text / fusion layer split, against Hugging Face
BlipTextLayers run as ALBEF runs them (the first layers without cross-attention), with the
layers unrolled and scanned."""

import copy

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import numpy as np
import pytest
import torch

from simla_jax import convert
from simla_jax.models import SIMLA, init_params
from simla_jax.models import simla as simla_lib
from simla_torch_refs import cross_attention_mask, hf_text, np_state, ref_config, rel_err

TOL = 1e-5
LAYERS = 3        # odd: fusion_start -1 = 1 text layer + 2 fusion layers


def _albef_config(scan: bool, **bert):
  cfg = ref_config(bert_layers=LAYERS, scan_layers=scan, architecture="albef")
  cfg.bert.update(bert)
  return cfg


class _TextOnly(torch.nn.Module):
  """A BlipTextLayer that ignores the image: ALBEF's text-encoder layer."""

  def __init__(self, layer):
    super().__init__()
    self.layer = layer

  def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
    return self.layer(hidden_states, None, **kwargs)


def _albef_params(text, cfg, fusion_start: int):
  """Our ALBEF parameters from a BlipTextModel (cross-attention in every layer): the med
  layout's conversion, then the text layers' cross-attention dropped and, scanned, the text
  and the fusion layers stacked separately."""
  simla_cfg = ref_config(bert_layers=LAYERS)
  simla_params = nn.meta.unbox(init_params(SIMLA(simla_cfg), jax.random.key(0)))
  filled = convert.apply_rules(np_state(text), convert.bert_rules(simla_cfg, "", ("bert",)),
                               convert.flat_shapes(simla_params), source="BlipTextModel")
  params = convert.replace_leaves(simla_params, filled)
  bert = dict(params["bert"])
  for i in range(fusion_start):
    bert[f"layer_{i}"] = {k: v for k, v in bert[f"layer_{i}"].items()
                          if not k.startswith("crossattention")}
  if cfg.scan_layers:
    params["vit"] = convert.stack_layers({"vit": params["vit"]}, cfg)["vit"]
    stack = lambda names: jax.tree.map(lambda *a: np.stack(a), *[bert.pop(n) for n in names])
    bert["encoder"] = {"layer": stack([f"layer_{i}" for i in range(fusion_start)])}
    bert["fusion_encoder"] = {"layer": stack([f"layer_{i}" for i in range(fusion_start, LAYERS)])}
  params = {k: v for k, v in params.items() if k not in ("mim_head", "concept_head")}
  return dict(params, bert=bert)


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def albef_setup(request):
  cfg = _albef_config(request.param)
  model = SIMLA(cfg)
  text = hf_text(cfg, seed=5)
  params = _albef_params(text, cfg, fusion_start=1)
  ours_init = nn.meta.unbox(init_params(model, jax.random.key(1)))
  # The converted tree is exactly the model's: same paths, same shapes.
  shapes = lambda t: {k: np.shape(v) for k, v in traverse_util.flatten_dict(t).items()}
  assert shapes(params) == shapes(ours_init)
  rng = np.random.default_rng(1)
  lengths = np.array([7, 4, 1])
  mask = (np.arange(7)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, cfg.bert.vocab_size, (3, 7)).astype(np.int32) * mask
  image_seq = rng.standard_normal((3, 17, cfg.vit.width)).astype(np.float32)
  return cfg, model, text, params, ids, mask, image_seq


def _apply(model, method, **static):
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method, **static))


def _t(x):
  return torch.from_numpy(np.array(x))


def test_only_fusion_layers_have_cross_attention(albef_setup):
  cfg, model, *_ = albef_setup
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  assert "mim_head" not in params and "concept_head" not in params
  flat = traverse_util.flatten_dict(params["bert"])
  cross = lambda prefix: any(p[:len(prefix)] == prefix and "crossattention" in p for p in flat)
  if cfg.scan_layers:
    assert not cross(("encoder",)) and cross(("fusion_encoder",))
    assert flat[("encoder", "layer", "attention", "query", "kernel")].shape[0] == 1
    assert flat[("fusion_encoder", "layer", "crossattention", "query", "kernel")].shape[0] == 2
  else:
    assert [cross((f"layer_{i}",)) for i in range(LAYERS)] == [False, True, True]


def test_simla_has_no_albef_stacks():
  params = nn.meta.unbox(init_params(SIMLA(ref_config(bert_layers=LAYERS)), jax.random.key(0)))
  flat = traverse_util.flatten_dict(params["bert"])
  assert all(any(p[0] == f"layer_{i}" and p[1] == "crossattention" for p in flat)
             for i in range(LAYERS))
  assert "mim_head" in params and "concept_head" in params


def test_text_mode_is_the_text_layers_of_blip_text(albef_setup):
  _, model, text, params, ids, mask, _ = albef_setup
  ours = _apply(model, "embed_text")(params, ids, mask)
  cls = _apply(model, "embed_text", cls_only=True)(params, ids, mask)
  encoder = copy.deepcopy(text)
  encoder.encoder.layer = encoder.encoder.layer[:1]     # ALBEF's text encoder: layers [0, 1)
  with torch.no_grad():
    ref = encoder(input_ids=_t(ids).long(), attention_mask=_t(mask)).last_hidden_state.numpy()
  err = rel_err(ours, ref)
  print(f"ALBEF text mode parity: max rel err {err:.2e}")
  assert err < TOL
  np.testing.assert_allclose(cls[:, 0], np.asarray(ours)[:, 0], rtol=0, atol=1e-5)


def test_multimodal_mode_fuses_in_the_last_layers_only(albef_setup):
  cfg, model, text, params, ids, mask, image_seq = albef_setup
  image_mask = np.ones(image_seq.shape[:2], np.int32)
  image_mask[0, 10:] = 0
  fused = _apply(model, "fuse")(params, ids, mask, image_seq, image_mask)
  cls = _apply(model, "fuse", cls_only=True)(params, ids, mask, image_seq, image_mask)
  _, probs = _apply(model, "fuse_with_attention", layer=-1)(params, ids, mask, image_seq,
                                                            image_mask)
  albef = copy.deepcopy(text)
  with torch.no_grad(), cross_attention_mask(albef, image_mask):
    albef.encoder.layer[0] = _TextOnly(albef.encoder.layer[0])
    out = albef(input_ids=_t(ids).long(), attention_mask=_t(mask),
                encoder_hidden_states=_t(image_seq), encoder_attention_mask=_t(image_mask),
                output_attentions=True)
  ref = out.last_hidden_state.numpy()
  err = rel_err(fused, ref)
  print(f"ALBEF multimodal parity: max rel err {err:.2e}")
  assert err < TOL
  np.testing.assert_allclose(cls[:, 0], np.asarray(fused)[:, 0], rtol=0, atol=1e-5)
  assert probs.shape == (3, cfg.bert.heads, 7, 7)
  # The fusion layers over the text-mode output (ALBEF's ITM reuses its ITC pass's).
  text_seq = _apply(model, "embed_text")(params, ids, mask)
  reused = _apply(model, "fuse_text")(params, text_seq, mask, image_seq, image_mask)
  np.testing.assert_allclose(reused, fused, rtol=0, atol=1e-5)
  # The image matters.
  other = _apply(model, "fuse")(params, ids, mask, image_seq[::-1], image_mask[::-1])
  assert rel_err(other, fused) > 1e-3


def test_albef_has_no_mim_or_psl():
  cfg = _albef_config(False)
  model = SIMLA(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  with pytest.raises(ValueError, match="no image-query mode"):
    model.apply({"params": params}, np.zeros((1, 2, cfg.vit.width), np.float32),
                np.ones((1, 3), np.int32), np.ones((1, 3), np.int32),
                method="fuse_image_query")
  with pytest.raises(ValueError, match="no PSL concept head"):
    model.apply({"params": params}, np.zeros((1, cfg.embed_dim), np.float32),
                method="concept_logits")


@pytest.mark.parametrize("start", [0, LAYERS])
def test_fusion_start_must_split_the_layers(start):
  with pytest.raises(ValueError, match="fusion_start"):
    simla_lib.fusion_start(_albef_config(False, fusion_start=start))


def test_architecture_is_checked():
  with pytest.raises(ValueError, match="model.architecture 'blip'"):
    simla_lib.fusion_start(ref_config(architecture="blip"))
