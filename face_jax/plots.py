"""PNG figures: ROC curves per group / variation and learned margins over training."""

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from face_jax import evaluate  # noqa: E402


def roc_curves(results: Mapping[str, dict], path: str, title: str = "ROC") -> None:
  """One ROC (TAR vs FAR, log FAR axis) per cell of `evaluate.verification` results."""
  fig, ax = plt.subplots(figsize=(5, 4))
  for name, r in results.items():
    far, tar = evaluate.roc_curve(r["dist"], r["issame"])
    keep = far > 0
    ax.plot(far[keep], tar[keep], label=f"{name} ({100 * r['accuracy']:.1f}%)")
  ax.set_xscale("log")
  ax.set_xlabel("false accept rate")
  ax.set_ylabel("true accept rate")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def margin_history(history: Sequence[Mapping], path: str) -> None:
  """Learned margin offset per factor category against the training step.

  history: [{"step": int, "<factor>": [offset per category], ...}, ...].
  """
  steps = np.array([h["step"] for h in history])
  names = [k for k in history[-1] if k != "step"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in names:
    values = np.array([h.get(name, [np.nan] * len(history[-1][name])) for h in history], float)
    for j in range(values.shape[1]):
      label = name if values.shape[1] == 1 else f"{name}{j}"
      ax.plot(steps, values[:, j], marker="." if len(steps) < 30 else None, label=label)
  ax.axhline(0.0, color="k", lw=0.5)
  ax.set_xlabel("step")
  ax.set_ylabel("margin offset (before batch centring)")
  ax.set_title("learned MvCoM margin per factor")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
