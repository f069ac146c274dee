"""Generated sections of a Markdown file: the text between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` belongs to a script (a study's table), the rest to people."""


def markers(name: str) -> tuple[str, str]:
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace(text: str, name: str, body: str) -> str:
  """`text` with what lies between the `name` markers replaced by `body`."""
  begin, end = markers(name)
  if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
    raise ValueError(f"the file needs exactly one {begin} ... {end} section")
  head, rest = text.split(begin)
  _, tail = rest.split(end)
  return f"{head}{begin}\n{body}{end}{tail}"


def update_file(path: str, name: str, body: str) -> None:
  """Rewrites the `name` section of the file at `path` (the file is read whole first, so a
  missing section leaves it untouched)."""
  with open(path) as f:
    text = replace(f.read(), name, body)
  with open(path, "w") as f:
    f.write(text)
