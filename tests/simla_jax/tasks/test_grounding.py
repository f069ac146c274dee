"""Grounding task: baselines on hand boxes, config errors, run.py end to end."""

import os

import numpy as np
import pytest

import run_py
import tiny_checkpoint
from configs import simla_grounding
from simla_jax.tasks import grounding
from train_jax import metrics as metrics_lib

def test_box_baselines_on_hand_boxes():
  proposals = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 6], [40, 0, 5, 5]], float)
  truth = np.array([0, 0, 10, 10], float)
  assert grounding.largest_box(proposals) == 1
  assert not grounding.proposal_accuracy(proposals, truth, 1)
  assert grounding.proposal_accuracy(proposals, truth, 2)        # IoU 0.6
  assert grounding.random_box_hit_rate(proposals, truth) == pytest.approx(2 / 4)


def test_config_variants_and_unknown_mode():
  assert simla_grounding.get_config().grounding.layer == -1
  refcoco = simla_grounding.get_config("refcoco")
  assert (refcoco.grounding.layer, refcoco.data.image_size, refcoco.optimizer.lr) == (8, 384, 1e-5)
  with pytest.raises(ValueError, match="unknown variant"):
    simla_grounding.get_config("flickr")


def _eval_only_config(checkpoint: str):
  c = simla_grounding.get_config()
  c.init.checkpoint = checkpoint
  c.data.image_size, c.data.max_len = 32, 16
  c.data.shapes.update(val_size=2, test_size=2)
  c.grounding.update(layer=-1, heatmaps=1)
  c.eval.batch_size = 8
  return c


def test_eval_only_scores_the_checkpoint_as_it_is(pretrained, tmp_path):
  c = _eval_only_config(pretrained[0])
  scores = grounding.evaluate_checkpoint(c, str(tmp_path))
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert rows[-1]["step"] == tiny_checkpoint.STEP
  assert rows[-1]["eval/test_acc"] == pytest.approx(scores["test_acc"])
  # Every BERT layer and ViT block of the tiny model is scored; the headline is the last.
  assert scores["val_acc"] == scores["val_itm1_acc"] and "val_itc1_acc" in scores
  assert os.listdir(tmp_path / "heatmaps") == ["test_0000.png"]


def test_eval_only_scores_an_albef_checkpoints_fusion_layers_only(tmp_path):
  workdir = str(tmp_path / "albef")
  tiny_checkpoint.write_tiny_pretraining(workdir, albef=True)
  c = _eval_only_config(workdir)
  c.grounding.heatmaps = 0
  scores = grounding.evaluate_checkpoint(c, str(tmp_path))
  # BERT layer 0 is ALBEF's text encoder (no cross-attention): only fusion layer 1 is scored.
  assert {k for k in scores if k.startswith("test_itm")} == {"test_itm1_acc"}
  assert scores["test_acc"] == scores["test_itm1_acc"] and "test_itc1_acc" in scores
  c.grounding.layer = 0
  with pytest.raises(ValueError, match="layer 0 .* has no cross-attention"):
    grounding.evaluate_checkpoint(c, str(tmp_path))


@pytest.mark.slow
def test_run_py_fine_tunes_and_writes_grounding_accuracy(pretrained, tmp_path):
  out = tmp_path / "grounding"
  rows, _ = run_py.run([
      "--config=configs/simla_grounding.py", f"--config.init.checkpoint={pretrained[0]}",
      "--config.data.image_size=32", "--config.data.max_len=16", "--config.grounding.layer=-1",
      "--config.grounding.heatmaps=2", "--config.data.shapes.val_size=3",
      "--config.data.shapes.test_size=3", "--config.train_images=8", "--config.batch_size=16",
      "--config.queue_size=32", "--config.eval.batch_size=8", "--config.total_steps=2",
      "--config.eval_every_steps=1", "--config.log_every_steps=1"], out)
  evals = [r for r in rows if "eval/val_acc" in r]
  assert [r["step"] for r in evals] == [1, 2]
  assert "eval/test_acc" not in evals[0]          # the test split is scored once, at the end
  final = evals[-1]
  for split in ("val", "test"):
    for name in ("acc", "itc_acc", "largest_acc", "random_acc"):
      assert 0.0 <= final[f"eval/{split}_{name}"] <= 100.0
  # 1-4 objects + 4 distractors, one of them correct.
  assert 100 / 8 <= final["eval/test_random_acc"] <= 100 / 5
  pngs = sorted(os.listdir(out / "heatmaps"))
  assert len(pngs) == 2 and pngs[0].startswith("test_")
