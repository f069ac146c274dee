"""simla_jax.tasks.finetune: split batches, padded prediction, the evaluation schedule."""

import ml_collections
import numpy as np
import pytest

from simla_jax.tasks import finetune
from train_jax import metrics as metrics_lib


def _config(**kw):
  c = ml_collections.ConfigDict(dict(batch_size=8, total_steps=100, alpha=0.4,
                                     eval=dict(splits=("val",), final_splits=("val", "test"))))
  c.update(kw)
  return c


def test_batches_keep_source_order_and_a_short_last_batch():
  source = [{"x": np.float32(i)} for i in range(7)]
  got = list(finetune.batches(source, lambda k, ex: {"x": ex["x"], "k": np.int32(k)}, 3, 1))
  assert [len(b["k"]) for b in got] == [3, 3, 1]
  np.testing.assert_array_equal(np.concatenate([b["k"] for b in got]), np.arange(7))


def test_padded_repeats_the_last_row_of_the_named_keys():
  batch = {"a": np.array([[1, 2], [3, 4]]), "b": np.array([5, 6]), "skip": np.array([0, 0])}
  x, n = finetune.padded(batch, 4, ("a", "b"))
  assert n == 2 and set(x) == {"a", "b"}
  np.testing.assert_array_equal(x["a"], [[1, 2], [3, 4], [3, 4], [3, 4]])
  np.testing.assert_array_equal(x["b"], [5, 6, 6, 6])


def test_predict_calls_with_full_batches_and_cuts_the_padding():
  sizes = []

  def fn(a, b):
    sizes.append(len(a))
    return {"sum": a + b, "a": a}

  split = iter([{"a": np.arange(4), "b": np.ones(4)}, {"a": np.arange(4, 5), "b": np.ones(1)}])
  got = list(finetune.predict(fn, split, 4, ("a", "b")))
  assert sizes == [4, 4]
  np.testing.assert_array_equal(got[0][1]["sum"], np.arange(4) + 1)
  np.testing.assert_array_equal(got[1][1]["sum"], [5.0])
  assert got[1][0]["a"].tolist() == [4]


def test_final_splits_are_scored_only_at_the_end():
  c = _config()
  assert finetune.schedule(c) == (("val",), ("test",))
  assert finetune.splits_at(c, 99) == ("val",)
  assert finetune.splits_at(c, np.int32(100)) == ("val", "test")


@pytest.mark.parametrize("bad, match", [(dict(alpha=1.5), "alpha 1.5"),
                                        (dict(batch_size=9), "batch_size 9")])
def test_check_config_names_the_bad_key(bad, match, monkeypatch):
  monkeypatch.setattr(finetune.jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=match):
    finetune.check_config(_config(**bad))


def test_accuracies_overall_per_kind_and_of_the_majority_answer():
  pred, label = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
  kind = np.array([0, 0, 1, -1])
  got = finetune.accuracies("val", pred, label, kind, ("count", "colour", "absent"), majority=2)
  assert got == {"val_acc": 75.0, "val_acc_count": 100.0, "val_acc_colour": 0.0,
                 "val_majority_acc": 50.0}


def test_write_scores_puts_them_under_eval_at_the_step(tmp_path):
  path = finetune.write_scores(str(tmp_path), 7, {"val_acc": 50.0, "val_acc_count": 25.0})
  (row,) = metrics_lib.read_metrics(str(tmp_path))
  assert path.startswith(str(tmp_path))
  assert row == {"step": 7, "eval/val_acc": 50.0, "eval/val_acc_count": 25.0}
