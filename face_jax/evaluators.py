"""Evaluation of the face task: per-group / per-variation verification on the synthetic
test pairs, LFW-protocol accuracy on `.bin` packs, their tables, ROC and margin plots."""

import functools
import json
import os
from typing import Optional

import jax
import numpy as np

from face_jax import evaluate as evaluate_lib
from face_jax import mvcom as mvcom_lib
from face_jax import plots
from face_jax.data import pipeline
from face_jax.data import synthetic
from face_jax.steps import Steps
from train_jax import sharding


class SyntheticEvaluator:
  """Per-group / per-variation verification on the synthetic test pairs."""

  def __init__(self, config, faces: synthetic.SyntheticFaces, steps: Steps):
    self.config, self.faces, self.steps = config, faces, steps
    self.cells = faces.test_pairs()
    self.group_cells = [f"group{g}" for g in range(faces.num_groups)]
    self.last_results: Optional[dict] = None
    self.history: list[dict] = []   # learned margin offsets at each evaluation

  def embeddings(self, state) -> np.ndarray:
    fn = functools.partial(self.steps.embed_fn, state.params, state.extras["batch_stats"])
    return evaluate_lib.embed_images(lambda x: sharding.to_host(fn(x)), self.faces.test_set["image"],
                                     self.config.eval.batch_size, flip=self.config.eval.flip)

  def __call__(self, state) -> dict[str, float]:
    emb = self.embeddings(state)
    results = evaluate_lib.evaluate_cells(emb, self.cells, n_folds=self.config.eval.n_folds,
                                          far_targets=tuple(self.config.eval.far_targets))
    self.last_results = results
    scores = evaluate_lib.summarize(results, self.group_cells)
    if "margin" in state.extras:
      offsets = mvcom_lib.factor_offsets(jax.device_get(state.extras["margin"]),
                                         self.config.mvcom.bound, self.config.mvcom.class_bound)
      self.history.append({"step": int(jax.device_get(state.step)),
                           **{k: v.tolist() for k, v in offsets.items()}})
    return scores

  def finish(self, state, workdir: str) -> None:
    if self.last_results is None:
      self(state)
    if jax.process_index() != 0:   # every process evaluates; process 0 writes
      return
    results = self.last_results
    os.makedirs(workdir, exist_ok=True)
    plots.roc_curves({k: results[k] for k in self.group_cells},
                     os.path.join(workdir, "roc_groups.png"), title="ROC per group")
    plots.roc_curves({k: v for k, v in results.items() if k not in self.group_cells},
                     os.path.join(workdir, "roc_variations.png"), title="ROC per variation")
    history = margin_history(workdir) or self.history
    if history:
      plots.margin_history(history, os.path.join(workdir, "margins.png"))
    summary = evaluate_lib.summarize(results, self.group_cells)
    table = evaluate_lib.format_table(
        {name: {"acc": r["accuracy"], "std": r["accuracy_std"],
                **{k: v for k, v in r.items() if k.startswith("tar@")}}
         for name, r in results.items()},
        ["acc", "std"] + [f"tar@far={f:g}" for f in self.config.eval.far_targets])
    text = (f"{table}\nworst group {100 * summary['acc_worst_group']:.2f}  "
            f"gap {100 * summary['group_gap']:.2f}  (accuracy in %, {self.config.eval.n_folds}-fold)")
    print(text, flush=True)
    with open(os.path.join(workdir, "eval_table.txt"), "w") as f:
      f.write(text + "\n")
    with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)


def margin_history(workdir: str) -> list[dict]:
  """Learned margin offsets per logged step, from the loop's metrics.jsonl."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      vals = {k[len("train/margin_"):]: v for k, v in row.items()
              if k.startswith("train/margin_") and k != "train/margin_mean"}
      if vals:
        rows.append({"step": row["step"], **{k: [v] for k, v in vals.items()}})
  return rows



class BinEvaluator:
  """LFW-protocol accuracy on each verification pack; worst group over `group_bins`."""

  def __init__(self, config, steps):
    self.config, self.steps = config, steps
    self._packs = None
    self.last_results: Optional[dict] = None
    self.history: list[dict] = []

  @property
  def packs(self):
    if self._packs is None:   # loaded on first use, then kept (a few thousand pairs each)
      self._packs = {name: (pipeline.normalize(images), issame)
                     for name, (images, issame) in pipeline.load_val_bins(self.config.data).items()}
    return self._packs

  def __call__(self, state) -> dict[str, float]:
    fn = lambda x: sharding.to_host(self.steps.embed_fn(state.params, state.extras["batch_stats"], x))
    results = {}
    for name, (images, issame) in self.packs.items():
      emb = evaluate_lib.embed_images(fn, images, self.config.eval.batch_size, flip=self.config.eval.flip)
      results[name] = evaluate_lib.verification(emb[0::2], emb[1::2], issame,
                                                n_folds=self.config.eval.n_folds,
                                                far_targets=tuple(self.config.eval.far_targets))
    self.last_results = results
    groups = [g for g in self.config.data.group_bins if g in results]
    if "margin" in state.extras:
      offsets = mvcom_lib.factor_offsets(jax.device_get(state.extras["margin"]),
                                         self.config.mvcom.bound, self.config.mvcom.class_bound)
      self.history.append({"step": int(jax.device_get(state.step)),
                           **{k: v.tolist() for k, v in offsets.items()}})
    return evaluate_lib.summarize(results, groups)

  def finish(self, state, workdir: str) -> None:
    if self.last_results is None:
      self(state)
    if jax.process_index() != 0:   # every process evaluates; process 0 writes
      return
    results = self.last_results
    if results:
      plots.roc_curves(results, os.path.join(workdir, "roc_bins.png"), title="ROC per pack")
    history = margin_history(workdir) or self.history
    if history:
      plots.margin_history(history, os.path.join(workdir, "margins.png"))
    groups = [g for g in self.config.data.group_bins if g in results]
    summary = evaluate_lib.summarize(results, groups)
    table = evaluate_lib.format_table(
        {n: {"acc": r["accuracy"], "std": r["accuracy_std"],
             **{k: v for k, v in r.items() if k.startswith("tar@")}} for n, r in results.items()},
        ["acc", "std"] + [f"tar@far={f:g}" for f in self.config.eval.far_targets])
    if groups:
      table += (f"\nworst group {100 * summary['acc_worst_group']:.2f}  "
                f"gap {100 * summary['group_gap']:.2f}")
    print(table, flush=True)
    with open(os.path.join(workdir, "eval_table.txt"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)

