"""The evaluators' all-pairs metrics: per-group TAR@FAR and global-threshold FNMR / STD / SER
on the synthetic test set and on RFW-style packs with sidecars, on a tiny model."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from face_jax import evaluate as evaluate_lib
from face_jax import evaluators
from face_jax import group_verification as gv
from face_jax.data import pack_bin
from face_tiny import make_task, tiny_config

_TASK = {}


def _tiny():
  """(config, task, initial state), built once for the module."""
  if not _TASK:
    config = tiny_config("cosface")
    task = make_task(config)
    state = jax.jit(lambda r: nn.meta.unbox(task.init(r)))(jax.random.key(0))
    _TASK.update(config=config, task=task, state=state)
  return _TASK["config"], _TASK["task"], _TASK["state"]


def test_synthetic_evaluator_reports_every_pair_per_group(tmp_path):
  config, task, state = _tiny()
  evaluator = task.evaluate
  scores = evaluator(state)
  test = evaluator.faces.test_set
  want = gv.report(evaluator.embeddings(state), test["label"], test["group"], fars=(1e-4, 1e-3),
                   fmr=1e-3)
  assert {f"allpairs_tar@far=0.0001_group{g}" for g in range(3)} <= set(scores)
  assert {"allpairs_fnmr_std", "allpairs_fnmr_ser", "allpairs_threshold"} <= set(scores)
  assert {k: scores[k] for k in want} == pytest.approx(want)
  # 4 identities x 5 images per group: 40 genuine, 150 impostor pairs per group.
  assert scores["allpairs_threshold"] > 0
  evaluator.finish(state, str(tmp_path))
  table = (tmp_path / "eval_table.txt").read_text()
  assert "every pair of each group's test images" in table and "fnmr@global" in table
  config.eval.all_pairs = False
  try:
    assert not any(k.startswith("allpairs_") for k in evaluator(state))
  finally:
    config.eval.all_pairs = True


def _rfw_packs(tmp_path, size):
  """Two groups in the RFW layout, packed with sidecars; Asian without a sidecar too."""
  rng = np.random.default_rng(0)
  root = tmp_path / "rfw"
  pairs = {"African": ["a1 1 2", "a1 1 a2 1", "a2 1 2", "a2 2 a3 1", "a3 1 2", "a3 2 a1 2"],
           "Asian": ["b1 1 2", "b1 2 b2 1", "b2 1 2", "b2 2 b3 2", "b3 1 2", "b3 1 b1 1"]}
  for group, lines in pairs.items():
    centres = {}
    for line in lines:
      f = line.split()
      for identity, n in ((f[0], f[1]), (f[2], f[3])) if len(f) == 4 else ((f[0], f[1]), (f[0], f[2])):
        centre = centres.setdefault(identity, rng.integers(0, 255, (size, size, 3)))
        path = root / group / identity / f"{identity}_{int(n):04d}.jpg"
        if not path.exists():
          os.makedirs(path.parent, exist_ok=True)
          noisy = np.clip(centre + rng.integers(-30, 30, centre.shape), 0, 255).astype(np.uint8)
          Image.fromarray(noisy).save(path, quality=98)
    (root / f"{group}_pairs.txt").write_text("\n".join(lines) + "\n")
  return pack_bin.main(["--root", str(root), "--out", str(tmp_path / "packs"),
                        "--image_size", str(size)])


def test_bin_evaluator_scores_distinct_images_of_packs_with_sidecars(tmp_path):
  config, task, state = _tiny()
  paths = _rfw_packs(tmp_path, config.data.image_size)
  bin_config = config.copy_and_resolve_references()
  bin_config.data.update(val_bins=tuple(paths), group_bins=("African", "Asian"))
  evaluator = evaluators.BinEvaluator(bin_config, task.train_step.__self__)
  scores = evaluator(state)
  assert {"acc_African", "acc_Asian", "allpairs_tar@far=0.001_groupAfrican",
          "allpairs_fnmr_groupAsian", "allpairs_fnmr_ser"} <= set(scores)
  # The same numbers from the distinct images, embedded and labelled here.
  emb, ids, groups = [], [], []
  fn = lambda x: task.train_step.__self__.embed_fn(state.params, state.extras["batch_stats"], x)
  for path in paths:
    name = os.path.splitext(os.path.basename(path))[0]
    side = pack_bin.read_sidecar(path, 12)
    images, _ = evaluator.packs[name]
    _, first = np.unique(side["images"], return_index=True)
    assert len(first) == 6                     # 12 pair slots, 3 identities x 2 images
    emb.append(evaluate_lib.embed_images(lambda x: np.asarray(fn(x)), images[first],
                                         config.eval.batch_size, flip=config.eval.flip))
    ids += [f"{name}/{side['identities'][k]}" for k in first]
    groups += [name] * len(first)
  want = gv.report(np.concatenate(emb), np.array(ids), np.array(groups), fars=(1e-4, 1e-3), fmr=1e-3)
  assert {k: scores[k] for k in want} == pytest.approx(want)
  # Without a sidecar the pack gives its LFW-protocol accuracy only.
  os.remove(tmp_path / "packs" / "Asian.json")
  scores = evaluators.BinEvaluator(bin_config, task.train_step.__self__)(state)
  assert "acc_Asian" in scores and "allpairs_fnmr_groupAfrican" in scores
  assert "allpairs_fnmr_groupAsian" not in scores
