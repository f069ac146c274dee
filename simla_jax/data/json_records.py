"""Records of a JSON list or JSON-lines file, each with the line it starts on (for errors)."""

import json
from typing import Any


def read_text(path: str, what: str) -> str:
  """The UTF-8 contents of `path`; an unreadable file is a FileNotFoundError that starts
  with `what` and names it."""
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise FileNotFoundError(f"{what}: cannot read {path}: {e}") from e


def line_of(text: str, pos: int) -> int:
  return text.count("\n", 0, pos) + 1


def raw_records(path: str, text: str, what: str, error: type[Exception] = ValueError,
                skipped: list[str] | None = None) -> list[tuple[int, Any]]:
  """(line, value) of every record of `text` (the contents of `path`): a JSON list, or
  one JSON value per line. Errors (`error`) start with `what` and name the file and line.

  `skipped` given: a malformed JSON line's message is appended to it instead of raised
  (a malformed JSON list cannot be resynchronised and always raises).
  """
  decoder = json.JSONDecoder()
  stripped = text.lstrip()
  out = []
  if stripped.startswith("["):
    pos = len(text) - len(stripped) + 1
    while True:
      while pos < len(text) and text[pos].isspace():
        pos += 1
      if pos < len(text) and text[pos] == "]" and not out:
        pos += 1
        break
      try:
        value, end = decoder.raw_decode(text, pos)
      except json.JSONDecodeError as e:
        raise error(f"{what}: {path} line {e.lineno} column {e.colno}: malformed JSON "
                         f"({e.msg})") from e
      out.append((line_of(text, pos), value))
      pos = end
      while pos < len(text) and text[pos].isspace():
        pos += 1
      if pos < len(text) and text[pos] == ",":
        pos += 1
        continue
      if pos < len(text) and text[pos] == "]":
        pos += 1
        break
      raise error(f"{what}: {path} line {line_of(text, pos)}: expected ',' or ']' after "
                       f"the record starting on line {out[-1][0]}")
    if text[pos:].strip():
      raise error(f"{what}: {path} line {line_of(text, pos)}: text after the JSON list")
    return out
  for n, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      out.append((n, json.loads(line)))
    except json.JSONDecodeError as e:
      message = f"{what}: {path} line {n} column {e.colno}: malformed JSON ({e.msg})"
      if skipped is None:
        raise error(message) from e
      skipped.append(message)
  return out
