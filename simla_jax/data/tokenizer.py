"""Caption normalisation and WordPiece tokenisation (Hugging Face `tokenizers`).

`pre_caption` is the official caption cleaning of SIMLA / ALBEF: lower-case; delete
, . ' ! ? " ( ) * # : ; ~; replace - and / by a space; "<person>" -> "person";
collapse runs of whitespace; strip; keep the first `max_words` words.

`Tokenizer` turns cleaned captions into fixed-length id arrays. A single caption
becomes `[CLS] w1 .. wn` with no `[SEP]` (the official tokenizer's single-sentence
format), or `[CLS] w1 .. wn [SEP]` with `add_sep=True`; then it is truncated and
padded with [PAD] to `max_len`:

  tok = Tokenizer.from_vocab_file("bert-base-uncased/vocab.txt", max_len=30)
  tok = Tokenizer.from_words(shapes.vocabulary(cfg), max_len=30)   # built-in data
  ids, mask = tok(["a red circle", "two shapes"])   # (2, 30) int32 each
  tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id, tok.vocab_size
"""

import re
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's relative order

_DELETE = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
  """Official caption normalisation (see module docstring)."""
  caption = _DELETE.sub("", caption.lower())
  caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
  caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
  words = caption.split(" ")
  if len(words) > max_words:
    caption = " ".join(words[:max_words])
  return caption


def vocab_from_words(words: Iterable[str]) -> list[str]:
  """Deterministic vocabulary: the 5 special tokens (ids 0-4), then the sorted words."""
  words = sorted(set(words) - set(SPECIAL_TOKENS))
  return list(SPECIAL_TOKENS) + words


def read_vocab_file(path: str) -> list[str]:
  """One token per line (BERT `vocab.txt`); the line number is the id."""
  try:
    with open(path, encoding="utf-8") as f:
      tokens = [line.rstrip("\n") for line in f]
  except OSError as e:
    raise FileNotFoundError(f"tokenizer: cannot read vocab file {path}: {e}") from e
  while tokens and not tokens[-1]:
    tokens.pop()
  seen = {}
  for i, t in enumerate(tokens):
    if t in seen:
      raise ValueError(f"{path}: token {t!r} on line {i + 1} repeats line {seen[t] + 1}")
    seen[t] = i
  missing = [t for t in SPECIAL_TOKENS if t not in seen]
  if missing:
    raise ValueError(f"{path}: vocabulary lacks special tokens {missing}")
  return tokens


class Tokenizer:
  """WordPiece tokenizer producing fixed-length int32 arrays.

  vocab: tokens in id order; must contain [PAD] [UNK] [CLS] [SEP] [MASK].
  max_len: output length L, including [CLS] (and [SEP] if `add_sep`).
  add_sep: append [SEP] (the official pretraining captions have none).
  lowercase: BERT-uncased normalisation (accents stripped too).
  pad_to_max: pad every batch to `max_len` (fixed shapes for jit); False pads to
    the longest caption of the call (the official "longest" padding).
  """

  def __init__(self, vocab: Sequence[str], *, max_len: int = 30, add_sep: bool = False,
               lowercase: bool = True, pad_to_max: bool = True):
    self.vocab = list(vocab)
    index = {t: i for i, t in enumerate(self.vocab)}
    missing = [t for t in SPECIAL_TOKENS if t not in index]
    if missing:
      raise ValueError(f"tokenizer: vocabulary lacks special tokens {missing}")
    min_len = 2 + int(add_sep)
    if max_len < min_len:
      raise ValueError(f"tokenizer: max_len {max_len} < {min_len}")
    self.max_len = int(max_len)
    self.add_sep = bool(add_sep)
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        index[t] for t in SPECIAL_TOKENS)
    tok = tokenizers.Tokenizer(models.WordPiece(vocab=index, unk_token="[UNK]",
                                                max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    single = "[CLS] $A [SEP]" if add_sep else "[CLS] $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # never split; dropped by `decode`
    tok.enable_truncation(max_length=self.max_len)
    tok.enable_padding(pad_id=self.pad_id, pad_token="[PAD]",
                       length=self.max_len if pad_to_max else None)
    self._tok = tok

  @classmethod
  def from_vocab_file(cls, path: str, **kwargs) -> "Tokenizer":
    return cls(read_vocab_file(path), **kwargs)

  @classmethod
  def from_words(cls, words: Iterable[str], **kwargs) -> "Tokenizer":
    return cls(vocab_from_words(words), **kwargs)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids and attention mask, each (B, L) int32 ((L,) for one string)."""
    single = isinstance(texts, str)
    encodings = self._tok.encode_batch([texts] if single else list(texts))
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)
    return (ids[0], mask[0]) if single else (ids, mask)

  def tokens(self, text: str) -> list[str]:
    """Word pieces of one text, without special tokens or padding."""
    enc = self._tok.encode(text)
    return [t for t, s in zip(enc.tokens, enc.special_tokens_mask) if not s]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of the ids, special tokens dropped."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
