"""The VQA answer decoder: initialised from encoder layers exactly as the official key
remap does, causal, the same function with scan_layers on and off."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simla_jax.models import answer_decoder
from simla_jax.models import bert as bert_lib

VOCAB, HIDDEN, HEADS, FFN = 13, 16, 2, 32


def _bert(layers, scan):
  return bert_lib.Bert(vocab_size=VOCAB, hidden=HIDDEN, num_layers=layers, heads=HEADS, ffn=FFN,
                       max_position=16, scan_layers=scan)


def _decoder(layers, scan):
  return answer_decoder.AnswerDecoder(vocab_size=VOCAB, hidden=HIDDEN, num_layers=layers,
                                      heads=HEADS, ffn=FFN, max_position=16, scan_layers=scan)


def _encoder_params(layers, scan, seed=0):
  ids = jnp.ones((1, 3), jnp.int32)
  kv = jnp.zeros((1, 2, HIDDEN))
  variables = _bert(layers, scan).init(jax.random.key(seed), ids, ids, kv)
  tree = nn.meta.unbox(variables["params"])
  # Bert.__call__ skips the MLM head; create it as the pretraining model does.
  head = bert_lib.MlmHead(HIDDEN, VOCAB, 1e-12).init(jax.random.key(seed + 1),
                                                     jnp.zeros((1, 1, HIDDEN)),
                                                     jnp.zeros((VOCAB, HIDDEN)))
  tree["mlm_head"] = nn.meta.unbox(head["params"])
  return jax.tree.map(np.asarray, tree)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, (3, 5)).astype(np.int32)
  mask = np.array([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int32)
  states = rng.standard_normal((2, 4, HIDDEN)).astype(np.float32)
  states_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)
  index = np.array([0, 1, 1], np.int32)
  return ids * mask, mask, states, states_mask, index


def test_decoder_from_encoder_layers_has_exactly_those_weights():
  enc = _encoder_params(layers=4, scan=False)
  dec = answer_decoder.from_encoder(enc, first_layer=2, num_layers=2)
  assert sorted(dec) == ["embeddings", "layer_0", "layer_1", "mlm_head"]
  for i in range(2):
    jax.tree.map(np.testing.assert_array_equal, dec[f"layer_{i}"], enc[f"layer_{2 + i}"])
  jax.tree.map(np.testing.assert_array_equal, dec["embeddings"], enc["embeddings"])
  jax.tree.map(np.testing.assert_array_equal, dec["mlm_head"], enc["mlm_head"])
  # The tree is exactly what the decoder module declares (nothing missing or extra).
  want = jax.tree.map(np.shape, nn.meta.unbox(_decoder(2, False).init(
      jax.random.key(0), *_inputs()[:4], states_index_b=_inputs()[4])["params"]))
  assert jax.tree.map(np.shape, dec) == want
  # Copies: training the decoder leaves the encoder's arrays alone.
  dec["layer_0"]["mlp"]["fc1"]["kernel"][...] = 0.0
  assert np.any(enc["layer_2"]["mlp"]["fc1"]["kernel"] != 0.0)


def test_from_encoder_rejects_layers_outside_the_encoder():
  enc = _encoder_params(layers=2, scan=False)
  with pytest.raises(ValueError, match=r"layers \[1, 3\) out of range for a 2-layer"):
    answer_decoder.from_encoder(enc, first_layer=1, num_layers=2)
  with pytest.raises(ValueError, match="MLM head"):
    answer_decoder.from_encoder({k: v for k, v in enc.items() if k != "mlm_head"}, 0, 1)


def test_scanned_decoder_from_stacked_encoder_matches_the_unrolled_one():
  enc = _encoder_params(layers=3, scan=False)
  stacked = dict(enc, encoder={"layer": jax.tree.map(
      lambda *a: np.stack(a), *[enc[f"layer_{i}"] for i in range(3)])})
  for i in range(3):
    del stacked[f"layer_{i}"]
  dec = answer_decoder.from_encoder(enc, 1, 2)
  dec_scan = answer_decoder.from_encoder(stacked, 1, 2)
  np.testing.assert_array_equal(dec_scan["encoder"]["layer"]["mlp"]["fc1"]["kernel"][1],
                                enc["layer_2"]["mlp"]["fc1"]["kernel"])
  ids, mask, states, states_mask, index = _inputs()
  run = lambda scan, p: _decoder(2, scan).apply({"params": p}, ids, mask, states, states_mask,
                                               states_index_b=index)
  np.testing.assert_allclose(run(True, dec_scan), run(False, dec), rtol=2e-5, atol=2e-5)


def test_decoder_is_causal_and_reads_its_own_question_states():
  enc = _encoder_params(layers=2, scan=False)
  params = answer_decoder.from_encoder(enc, 0, 2)
  ids, mask, states, states_mask, index = _inputs()
  apply = jax.jit(lambda i, s, x: _decoder(2, False).apply(
      {"params": params}, i, mask, s, states_mask, states_index_b=x))
  logits = np.asarray(apply(ids, states, index))
  assert logits.shape == (3, 5, VOCAB)
  later = ids.copy()
  later[0, 3:] = (later[0, 3:] % (VOCAB - 1)) + 1     # change tokens 3, 4 of row 0
  changed = np.asarray(apply(later, states, index))
  np.testing.assert_allclose(changed[0, :3], logits[0, :3], rtol=1e-5, atol=1e-5)
  assert not np.allclose(changed[0, 3:], logits[0, 3:])
  # Row 2 reads question 1: the same as giving it its own copy of those states.
  own = np.asarray(apply(ids, states[index], np.arange(3, dtype=np.int32)))
  np.testing.assert_allclose(own, logits, rtol=1e-5, atol=1e-5)
  other = np.asarray(apply(ids, states, np.array([0, 0, 1], np.int32)))
  assert not np.allclose(other[1], logits[1])


def test_causal_bias_masks_future_and_padding():
  bias = np.asarray(answer_decoder.causal_bias(jnp.array([[1, 1, 0]])))
  assert bias.shape == (1, 1, 3, 3)
  attend = bias[0, 0] == 0
  np.testing.assert_array_equal(attend, [[1, 0, 0], [1, 1, 0], [1, 1, 0]])
  assert np.all(bias[0, 0][~attend] == -10000.0)
