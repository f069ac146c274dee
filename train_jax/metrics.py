"""Metric sinks: `<workdir>/metrics.jsonl` (tests read it) and TensorBoard."""

import json
import os
from typing import Mapping

import numpy as np


class MetricWriter:
  """One JSON object per line: {"step": int, "<prefix>/<name>": float, ...}."""

  def __init__(self, workdir: str, tensorboard: bool = True, is_main: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._is_main = is_main
    self._tb = None
    if tensorboard and is_main:
      from tensorboardX import SummaryWriter  # lazy: heavy import
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Drops lines past `step`: a resumed run rewrites them identically."""
    if not (self._is_main and os.path.exists(self.path)):
      return
    # A run killed mid-write leaves a torn last line; resuming drops it with the rest.
    rows = read_jsonl(self.path, torn_tail_ok=True)
    write_jsonl(self.path, [r for r in rows if r["step"] <= step])

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._is_main:
      return
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str, torn_tail_ok: bool = False) -> list[dict]:
  """The objects of a JSON-lines file; a malformed line raises naming the file and line.

  torn_tail_ok: a malformed *last* line (a writer killed mid-line) is dropped instead.
  """
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  rows = []
  for i, line in lines:
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if torn_tail_ok and i == lines[-1][0]:
        break
      raise ValueError(f"{path}, line {i}: not a JSON object ({e.msg})") from None
  return rows


def write_jsonl(path: str, rows) -> None:
  """Rewrites `path` with one JSON object per line (what read_jsonl reads back)."""
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def read_metrics(workdir: str) -> list[dict]:
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))
