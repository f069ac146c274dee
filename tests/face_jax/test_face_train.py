"""The face task's entry point: the generic loop trains, evaluates and plots through it."""

import os

import pytest

from configs import mvcom as mvcom_config
from face_jax import train
from face_tiny import make_task, tiny_config


def test_generic_loop_end_to_end(tmp_path):
  """MvCoM with predicted attributes and a bilevel update every other step, through
  the generic loop on a (data 4, model 2) mesh."""
  from train_jax import loop
  from train_jax.metrics import read_metrics
  config = tiny_config("predicted")
  config.mvcom.meta_every = 2                   # the lax.cond path
  config.mesh.update(data=4, fsdp=1, model=2)   # class centres split over `model`
  workdir = str(tmp_path / "run")
  state = loop.train_and_evaluate(config, workdir, lambda c, mesh: make_task(c))
  centres = state.params["classifier"]["centres"]
  assert centres.sharding.spec[0] == "model"
  assert len({str(s.index) for s in centres.addressable_shards}) == 2
  rows = read_metrics(workdir)
  evals = [r for r in rows if "eval/acc_worst_group" in r]
  assert evals and 0 <= evals[-1]["eval/acc_worst_group"] <= evals[-1]["eval/acc_group0"] + 1
  assert {"eval/group_gap", "eval/acc_pose", "eval/acc_occlusion", "eval/acc_blur"} <= set(evals[-1])
  train_rows = [r for r in rows if "train/loss" in r]
  assert all("train/margin_group0" in r and "train/attr_loss" in r for r in train_rows)
  # Logged steps 2, 4, 6 ran with state.step 1, 3, 5: no bilevel update (odd steps).
  assert [r["train/meta_loss"] for r in train_rows] == [0.0, 0.0, 0.0]
  assert "attributes" in state.params
  for name in ("roc_groups.png", "roc_variations.png", "margins.png", "eval_table.txt"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0


def test_unknown_data_name_is_named():
  config = mvcom_config.get_config("cosface")
  config.data.name = "lfw"
  with pytest.raises(ValueError, match="data.name='lfw'"):
    train.make_task_with(config, None, None)
