"""Evaluation of the face task: per-group / per-variation verification on the synthetic
test pairs, LFW-protocol accuracy on `.bin` packs, their tables, ROC and margin plots.

With `eval.all_pairs`, both evaluators also score every pair of each group's distinct
test images (`face_jax/group_verification.py`): TAR at `eval.group_fars` per group and,
at one global threshold set at FMR `eval.global_fmr` over all groups' impostors, each
group's FNMR / FMR with their STD and skewed error ratio, as metric keys `allpairs_...`.
The `.bin` evaluator does so for the `data.group_bins` packs that carry a sidecar
(`<pack>.json` from `python -m face_jax.data.pack_bin`) naming each image's identity."""

import functools
import json
import os
from typing import Optional

import jax
import numpy as np

from face_jax import evaluate as evaluate_lib
from face_jax import group_verification
from face_jax import mvcom as mvcom_lib
from face_jax import plots
from face_jax.data import pack_bin
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
    self.last_all_pairs: dict[str, float] = {}
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
    test = self.faces.test_set
    self.last_all_pairs = all_pairs_metrics(self.config, emb, test["label"], test["group"])
    scores.update(self.last_all_pairs)
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
    text += all_pairs_table(self.config, self.last_all_pairs)
    summary.update(self.last_all_pairs)
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


def all_pairs_metrics(config, embeddings, identities, groups) -> dict[str, float]:
  """`group_verification.report` with the config's FARs ({} when eval.all_pairs is off)."""
  e = config.eval
  if not e.all_pairs or len(embeddings) == 0:
    return {}
  return group_verification.report(embeddings, identities, groups, fars=tuple(e.group_fars),
                                   fmr=float(e.global_fmr))


def all_pairs_table(config, metrics: dict[str, float]) -> str:
  """Text lines for eval_table.txt: per group TAR at each FAR and FNMR at the global threshold."""
  if not metrics:
    return ""
  fars = [f"tar@far={f:g}" for f in config.eval.group_fars]
  names = sorted({k[len("allpairs_fnmr_group"):] for k in metrics
                  if k.startswith("allpairs_fnmr_group")})
  rows = {f"group{g}": {**{f: metrics[f"allpairs_{f}_group{g}"] for f in fars},
                        "fnmr@global": metrics[f"allpairs_fnmr_group{g}"]} for g in names}
  table = evaluate_lib.format_table(rows, fars + ["fnmr@global"])
  return (f"\nevery pair of each group's test images; global threshold at FMR "
          f"{config.eval.global_fmr:g}: FNMR std {100 * metrics['allpairs_fnmr_std']:.2f}, "
          f"SER {metrics['allpairs_fnmr_ser']:.2f}\n{table}")



class BinEvaluator:
  """LFW-protocol accuracy on each verification pack; worst group over `group_bins`."""

  def __init__(self, config, steps):
    self.config, self.steps = config, steps
    self._packs = None
    self._sidecars = None
    self.last_results: Optional[dict] = None
    self.last_all_pairs: dict[str, float] = {}
    self.history: list[dict] = []

  @property
  def packs(self):
    if self._packs is None:   # loaded on first use, then kept (a few thousand pairs each)
      self._packs = {name: (pipeline.normalize(images), issame)
                     for name, (images, issame) in pipeline.load_val_bins(self.config.data).items()}
    return self._packs

  @property
  def sidecars(self) -> dict[str, dict]:
    """{group pack name: its sidecar} for the `group_bins` packs that have one."""
    if self._sidecars is None:
      self._sidecars = {}
      if self.config.data.get("source", "direct") != "tfds":   # sidecars sit by .bin files
        for path in self.config.data.get("val_bins", ()):
          name = os.path.splitext(os.path.basename(path))[0]
          if name in self.config.data.group_bins and name in self.packs:
            side = pack_bin.read_sidecar(path, len(self.packs[name][0]))
            if side is not None:
              self._sidecars[name] = side
    return self._sidecars

  def group_images(self, embeddings: dict[str, np.ndarray]):
    """(embeddings, identities, groups) of the distinct images of the packs with sidecars."""
    emb, ids, groups = [], [], []
    for name, side in self.sidecars.items():
      _, first = np.unique(np.asarray(side["images"]), return_index=True)
      emb.append(embeddings[name][first])
      ids += [f"{name}/{side['identities'][k]}" for k in first]
      groups += [name] * len(first)
    if not emb:
      return np.zeros((0, 1)), np.array([]), np.array([])
    return np.concatenate(emb), np.array(ids), np.array(groups)

  def __call__(self, state) -> dict[str, float]:
    fn = lambda x: sharding.to_host(self.steps.embed_fn(state.params, state.extras["batch_stats"], x))
    results, embeddings = {}, {}
    for name, (images, issame) in self.packs.items():
      emb = evaluate_lib.embed_images(fn, images, self.config.eval.batch_size, flip=self.config.eval.flip)
      embeddings[name] = emb
      results[name] = evaluate_lib.verification(emb[0::2], emb[1::2], issame,
                                                n_folds=self.config.eval.n_folds,
                                                far_targets=tuple(self.config.eval.far_targets))
    self.last_results = results
    self.last_all_pairs = all_pairs_metrics(self.config, *self.group_images(embeddings))
    groups = [g for g in self.config.data.group_bins if g in results]
    if "margin" in state.extras:
      offsets = mvcom_lib.factor_offsets(jax.device_get(state.extras["margin"]),
                                         self.config.mvcom.bound, self.config.mvcom.class_bound)
      self.history.append({"step": int(jax.device_get(state.step)),
                           **{k: v.tolist() for k, v in offsets.items()}})
    return {**evaluate_lib.summarize(results, groups), **self.last_all_pairs}

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
    table += all_pairs_table(self.config, self.last_all_pairs)
    summary.update(self.last_all_pairs)
    print(table, flush=True)
    with open(os.path.join(workdir, "eval_table.txt"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)

