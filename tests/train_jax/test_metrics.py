"""train_jax/metrics.py: the JSON-lines sink and its reader."""

import pytest

from train_jax import metrics


def test_malformed_line_names_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "a": 0.5}\n{"step": 2, "a": \n{"step": 3, "a": 0.1}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2"):
    metrics.read_metrics(str(tmp_path))


def test_resume_drops_torn_last_line_and_later_steps(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  with open(writer.path, "a") as f:
    f.write('{"step": 4, "lo')                      # killed mid-write
  writer.truncate_after(2)
  assert metrics.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
