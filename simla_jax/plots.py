"""PNGs a person would rather look at: loss curves and a retrieval grid."""

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train_jax import metrics as metrics_lib  # noqa: E402


def loss_curves(workdir: str, names: Sequence[str], path: str) -> None:
  rows = [r for r in metrics_lib.read_metrics(workdir) if "train/loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4))
  for name in ("loss", *names):
    pts = [(r["step"], r[f"train/{name}"]) for r in rows if f"train/{name}" in r]
    if pts:
      ax.plot(*zip(*pts), label=name, lw=2 if name == "loss" else 1)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _unnormalize(image: np.ndarray, transform) -> np.ndarray:
  return np.clip(image * np.asarray(transform.std) + np.asarray(transform.mean), 0, 1)


def retrieval_grid(evaluator, params, path: str | None, split: str | None = None,
                   queries: int = 4, top: int = 5) -> None:
  """Text-to-image retrieval: a row per query caption, its top images (green = correct).
  `path` None: score only (a process other than 0 of a multi-process run)."""
  split = split or next(iter(evaluator.data))
  data = evaluator.data[split]
  _, _, score_t2i = evaluator.scores(params, data)
  if path is None:
    return
  texts = np.linspace(0, data.num_texts - 1, queries).astype(int)
  fig, axes = plt.subplots(queries, top, figsize=(2 * top, 2.3 * queries), squeeze=False)
  for row, t in enumerate(texts):
    ranked = np.argsort(-score_t2i[t])[:top]
    for col, i in enumerate(ranked):
      ax = axes[row, col]
      ax.imshow(_unnormalize(data.image(int(i)), data.image_tf))
      ok = i == data.txt2img[t]
      for spine in ax.spines.values():
        spine.set_edgecolor("green" if ok else "red")
        spine.set_linewidth(3 if ok else 1)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[row, 0].set_title(data.captions[t][:60], loc="left", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
