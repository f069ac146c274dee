"""Caption normalisation and the WordPiece tokenizer."""

import numpy as np
import pytest

from simla_jax.data import default_data_config, shapes
from simla_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, pre_caption, read_vocab_file


@pytest.mark.parametrize("raw, expected", [
    ("A Man, riding a horse!", "a man riding a horse"),
    ("  two   dogs (brown) ; on: the grass... ", "two dogs brown on the grass"),
    ("well-known black/white cat", "well known black white cat"),
    ("<person> holding a \"sign\" #1 *~?", "person holding a sign 1"),
    ("it's a dog's life", "its a dogs life"),
])
def test_pre_caption_cases(raw, expected):
  assert pre_caption(raw) == expected


def test_pre_caption_word_cap():
  assert pre_caption(" ".join(f"w{i}" for i in range(40)), max_words=30).split() == [
      f"w{i}" for i in range(30)]


def _shapes_tokenizer(**kw):
  return Tokenizer.from_words(shapes.vocabulary(default_data_config()), **kw)


def test_special_ids_in_bert_order():
  tok = _shapes_tokenizer()
  assert tok.vocab[:5] == list(SPECIAL_TOKENS)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size == len(shapes.vocabulary(None)) + 5


def test_cls_without_sep_padding_truncation_and_round_trip():
  tok = _shapes_tokenizer(max_len=8)
  ids, mask = tok(["a red circle", "a small red circle left of a blue square"])
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 8)
  assert ids[0, 0] == tok.cls_id and tok.sep_id not in ids
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(ids[0, 4:], tok.pad_id)
  assert mask[1].all()  # truncated to 8 = [CLS] + 7 words
  assert tok.decode(ids[0]) == "a red circle"
  assert tok.decode(ids[1]) == "a small red circle left of a"
  with_sep = _shapes_tokenizer(max_len=8, add_sep=True)
  ids, mask = with_sep("a small red circle left of a blue square")
  assert ids[0] == with_sep.cls_id and ids[-1] == with_sep.sep_id and ids.shape == (8,)


def test_shapes_captions_tokenise_without_unknowns():
  cfg = default_data_config()
  tok = _shapes_tokenizer(max_len=30)
  src = shapes.ShapesSource(cfg, "train")
  caps = [pre_caption(c) for i in range(100) for c in src[i]["captions"]]
  ids, mask = tok(caps)
  assert not (ids == tok.unk_id).any()
  # Nothing was truncated: every word survives with [CLS] in front.
  np.testing.assert_array_equal(mask.sum(1), [len(c.split()) + 1 for c in caps])
  assert [tok.decode(r) for r in ids[:20]] == caps[:20]


def test_matches_transformers_bert_tokenizer(tmp_path):
  transformers = pytest.importorskip("transformers")
  vocab = list(SPECIAL_TOKENS) + ["a", "red", "circle", "##s", "zeb", "##ra", "on", "grass", "é"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n")
  ref = transformers.BertTokenizer(str(path), do_lower_case=True)
  ours = Tokenizer.from_vocab_file(str(path), max_len=10, add_sep=True)
  for text in ["A red Circles, on grass!", "zebra zebras unknownword", "a " * 20]:
    expected = ref(text, padding="max_length", max_length=10, truncation=True)
    ids, mask = ours(text)
    assert ids.tolist() == expected["input_ids"], text
    assert mask.tolist() == expected["attention_mask"], text


def test_vocab_file_errors_name_the_file(tmp_path):
  missing = tmp_path / "nope.txt"
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    read_vocab_file(str(missing))
  bad = tmp_path / "bad.txt"
  bad.write_text("[PAD]\n[UNK]\nhello\n")
  with pytest.raises(ValueError, match=r"bad.txt.*\[CLS\]"):
    read_vocab_file(str(bad))
  dup = tmp_path / "dup.txt"
  dup.write_text("\n".join(SPECIAL_TOKENS) + "\nx\nx\n")
  with pytest.raises(ValueError, match="dup.txt.*line 7"):
    read_vocab_file(str(dup))
