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
    with open(self.path) as f:
      keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(keep)

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


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
