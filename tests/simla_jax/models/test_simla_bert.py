"""The three-mode BERT against Hugging Face BlipTextModel, the MLM head against BertForMaskedLM,
with the layers unrolled and scanned (`model.scan_layers`)."""

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from simla_jax import convert
from simla_jax.models import SIMLA, init_params
from simla_torch_refs import cross_attention_mask, hf_mlm, hf_text, np_state, ref_config, rel_err

TOL = 1e-5


def _inputs(cfg, rng):
  lengths = np.array([7, 4, 1])              # padding in two rows, one row of only [CLS]
  ids = rng.integers(1, cfg.bert.vocab_size, (3, 7)).astype(np.int32)
  mask = (np.arange(7)[None] < lengths[:, None]).astype(np.int32)
  ids = ids * mask                            # [PAD] = 0
  image_seq = rng.standard_normal((3, 17, cfg.vit.width)).astype(np.float32)
  return ids, mask, image_seq


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scan"])
def bert_setup(request):
  cfg = ref_config(scan_layers=request.param)
  model = SIMLA(cfg)
  text = hf_text(cfg, seed=5)
  params = convert.unstack_layers(nn.meta.unbox(init_params(model, jax.random.key(0))), cfg)
  filled = convert.apply_rules(np_state(text), convert.bert_rules(cfg, "", ("bert",)),
                               convert.flat_shapes(params), source="BlipTextModel")
  params = convert.stack_layers(convert.replace_leaves(params, filled), cfg)
  ids, mask, image_seq = _inputs(cfg, np.random.default_rng(1))
  return cfg, model, text, params, ids, mask, image_seq


def _t(x):
  # A copy: BlipTextEmbeddings adds the positions to `inputs_embeds` in place.
  return torch.from_numpy(np.array(x))


def _apply(model, method, **static):
  """A jitted `model.apply(..., method=method)`; eager op-by-op dispatch is slower on CPU."""
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=method, **static))


def test_text_mode_matches_blip_text(bert_setup):
  _, model, text, params, ids, mask, _ = bert_setup
  ours = _apply(model, "embed_text")(params, ids, mask)
  with torch.no_grad():
    ref = text(input_ids=_t(ids).long(), attention_mask=_t(mask)).last_hidden_state.numpy()
  err = rel_err(ours, ref)
  print(f"BERT text mode parity: max rel err {err:.2e}")
  assert err < TOL


@pytest.mark.parametrize("mask_image", [False, True])
def test_multimodal_mode_and_attention_match_blip_text(bert_setup, mask_image):
  cfg, model, text, params, ids, mask, image_seq = bert_setup
  image_mask = np.ones(image_seq.shape[:2], np.int32)
  if mask_image:
    image_mask[0, 10:] = 0
    image_mask[2, 3:] = 0
  fused, probs = _apply(model, "fuse_with_attention", layer=-1)(params, ids, mask, image_seq,
                                                                image_mask)
  plain = _apply(model, "fuse")(params, ids, mask, image_seq, image_mask)
  with torch.no_grad(), cross_attention_mask(text, image_mask):
    out = text(input_ids=_t(ids).long(), attention_mask=_t(mask),
               encoder_hidden_states=_t(image_seq), encoder_attention_mask=_t(image_mask),
               output_attentions=True)
  ref = out.last_hidden_state.numpy()
  err = rel_err(fused, ref)
  err_attn = rel_err(probs, out.attentions[-1].numpy())
  print(f"BERT multimodal parity (image mask {mask_image}): max rel err {err:.2e}, "
        f"last-layer self-attention {err_attn:.2e}")
  assert err < TOL and err_attn < TOL
  assert probs.shape == (3, cfg.bert.heads, 7, 7)
  np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-6)
  _, probs0 = _apply(model, "fuse_with_attention", layer=0)(params, ids, mask, image_seq,
                                                           image_mask)
  assert rel_err(probs0, out.attentions[0].numpy()) < TOL
  # Padded keys get no attention.
  assert np.all(np.asarray(probs)[1, :, :, 4:] < 1e-6)


def test_image_query_mode_matches_blip_text_inputs_embeds(bert_setup):
  _, model, text, params, ids, mask, image_seq = bert_setup
  ours = _apply(model, "fuse_image_query")(params, image_seq, ids, mask)
  with torch.no_grad(), cross_attention_mask(text, mask):
    token_embeds = text.embeddings(input_ids=_t(ids).long())
    ref = text(inputs_embeds=_t(image_seq), attention_mask=torch.ones(image_seq.shape[:2]),
               encoder_hidden_states=token_embeds,
               encoder_attention_mask=_t(mask)).last_hidden_state.numpy()
  err = rel_err(ours, ref)
  print(f"BERT image-query parity: max rel err {err:.2e}")
  assert err < TOL
  ours_tokens = _apply(model, "token_embeddings")(params, ids)
  assert rel_err(ours_tokens, token_embeds.numpy()) < TOL
  # Precomputed token embeddings (the official momentum branch uses the online ones).
  again = jax.jit(lambda p, x, m, t: model.apply({"params": p}, x, None, m, token_embeds=t,
                                                 method="fuse_image_query"))(
      params, image_seq, mask, ours_tokens)
  np.testing.assert_allclose(again, ours, rtol=0, atol=1e-6)


def test_mlm_head_and_hf_bert_import_match_bert_for_masked_lm(bert_setup):
  cfg, model, _, params, ids, mask, _ = bert_setup
  mlm = hf_mlm(cfg, seed=9)
  with torch.no_grad():
    # BLIP embeddings have no token types: zero them so HF BERT computes the same function.
    mlm.bert.embeddings.token_type_embeddings.weight.zero_()
  state = np_state(mlm)
  # Old-style LayerNorm names, as in bert-base-uncased's pytorch_model.bin.
  ln = "bert.embeddings.LayerNorm"
  state[f"{ln}.gamma"], state[f"{ln}.beta"] = state.pop(f"{ln}.weight"), state.pop(f"{ln}.bias")
  loaded = convert.load_bert_checkpoint(state, cfg, params)
  flat_old, flat_new = (traverse_util.flatten_dict(t) for t in (params, loaded))
  for path, value in flat_old.items():
    if any(p.startswith("crossattention") for p in path) or path[0] != "bert":
      np.testing.assert_array_equal(flat_new[path], value)   # left as initialised
    else:
      assert not np.array_equal(flat_new[path], value), path
  logits = jax.jit(lambda p, i, m: model.apply(
      {"params": p}, model.apply({"params": p}, i, m, method="embed_text"),
      method="mlm_logits"))(loaded, ids, mask)
  hidden = np.random.default_rng(2).standard_normal((2, 5, cfg.bert.hidden)).astype(np.float32)
  head = _apply(model, "mlm_logits")(loaded, hidden)
  with torch.no_grad():
    ref_logits = mlm(input_ids=_t(ids).long(), attention_mask=_t(mask)).logits.numpy()
    ref_head = mlm.cls(_t(hidden)).numpy()
  err_head, err_full = rel_err(head, ref_head), rel_err(logits, ref_logits)
  print(f"MLM head parity: max rel err {err_head:.2e}; BERT-import + text mode + MLM head "
        f"{err_full:.2e}")
  assert logits.shape == (3, 7, cfg.bert.vocab_size)
  assert err_head < TOL and err_full < TOL


def test_dropout_uses_the_dropout_rng(bert_setup):
  _, model, _, params, ids, mask, image_seq = bert_setup

  @jax.jit
  def fuse(rng):
    return model.apply({"params": params}, ids, mask, image_seq, method="fuse",
                       deterministic=False, rngs={"dropout": rng})
  a, b, c = fuse(jax.random.key(1)), fuse(jax.random.key(1)), fuse(jax.random.key(2))
  clean = _apply(model, "fuse")(params, ids, mask, image_seq)
  np.testing.assert_array_equal(a, b)
  assert rel_err(a, c) > 1e-3 and rel_err(a, clean) > 1e-3


def test_remat_and_fused_attention_give_the_same_function(bert_setup):
  cfg, _, _, params, ids, mask, image_seq = bert_setup

  def loss(model, p):
    fused = model.apply({"params": p}, ids, mask, image_seq, method="fuse")
    return jnp.sum(model.apply({"params": p}, fused, method="itm_logits") ** 2)
  variants = {}
  for name, change in (("base", {}), ("remat", dict(remat=True)),
                       ("xla", dict(attention_impl="xla"))):
    c = cfg.copy_and_resolve_references()
    c.update(change)
    variants[name] = SIMLA(c)
  base = jax.jit(jax.value_and_grad(lambda p: loss(variants["base"], p)))(params)
  remat = jax.jit(jax.value_and_grad(lambda p: loss(variants["remat"], p)))(params)
  assert abs(float(remat[0]) - float(base[0])) <= 1e-5 * abs(float(base[0]))
  for g1, g2 in zip(jax.tree.leaves(base[1]), jax.tree.leaves(remat[1])):
    np.testing.assert_allclose(g2, g1, rtol=1e-4, atol=1e-6)
  xla = jax.jit(lambda p: loss(variants["xla"], p))(params)
  assert abs(float(xla) - float(base[0])) <= 1e-5 * abs(float(base[0]))
