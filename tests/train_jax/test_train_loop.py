"""The generic loop on a tiny regression task: metrics, resume, preemption, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train_jax import loop
from train_jax import metrics as metrics_lib

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import tiny_task  # noqa: E402


def _run(workdir, *overrides, **popen):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.Popen([sys.executable, os.path.join(HERE, "run_tiny.py"), str(workdir),
                           *overrides], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **popen)


def _params(workdir):
  with np.load(os.path.join(workdir, "params.npz")) as f:
    return {k: f[k] for k in f.files}


def _without_compile_rows(workdir):
  return [r for r in metrics_lib.read_metrics(str(workdir))
          if not any(k.startswith("compile/") for k in r)]


def _checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_metrics_file_has_train_and_eval_lines(tmp_path):
  config = tiny_task.get_config()
  loop.train_and_evaluate(config, str(tmp_path), tiny_task.make_task)
  rows = metrics_lib.read_metrics(str(tmp_path))
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/mse" in r]
  assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
  assert [r["step"] for r in evals] == [6, 12]
  assert all(set(r) == {"step", "train/loss", "train/mse", "train/lr"} for r in train)
  assert evals[-1]["eval/mse"] < evals[0]["eval/mse"]  # it learns
  assert _checkpoint_steps(tmp_path)[-1] == 12
  assert os.listdir(tmp_path / "tensorboard")


def test_rerun_of_finished_run_resumes_without_new_lines(tmp_path):
  config = tiny_task.get_config()
  loop.train_and_evaluate(config, str(tmp_path), tiny_task.make_task)
  before = (tmp_path / "metrics.jsonl").read_text()
  loop.train_and_evaluate(config, str(tmp_path), tiny_task.make_task)
  assert (tmp_path / "metrics.jsonl").read_text() == before


def test_step_compiled_during_start_up_trains_exactly_as_compiled_after(tmp_path):
  runs = {}
  for ahead in (True, False):
    config = tiny_task.get_config()
    config.update(compile_ahead=ahead, total_steps=3, log_every_steps=1, eval_every_steps=3,
                  checkpoint_every_steps=3)
    state = loop.train_and_evaluate(config, str(tmp_path / str(ahead)), tiny_task.make_task)
    compile_row = next(r for r in metrics_lib.read_metrics(str(tmp_path / str(ahead)))
                       if "compile/first_step_s" in r)
    runs[ahead] = state, _without_compile_rows(tmp_path / str(ahead)), compile_row
  (state_a, rows_a, timed_a), (state_s, rows_s, timed_s) = runs[True], runs[False]
  assert rows_a == rows_s
  for a, s in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_s.params)):
    np.testing.assert_array_equal(a, s)
  # Only the compile ahead waits for a thread; both report start-up before the first step.
  assert "compile/wait_s" in timed_a and "compile/wait_s" not in timed_s
  for timed in (timed_a, timed_s):
    assert 0 < timed["compile/startup_s"] < timed["compile/first_step_s"]


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
  args = ["total_steps=40", "checkpoint_every_steps=5", "data_delay_s=0.01"]
  straight = _run(tmp_path / "straight", *args)
  out, _ = straight.communicate(timeout=300)
  assert straight.returncode == 0, out

  killed = _run(tmp_path / "killed", *args)
  deadline = time.time() + 240
  while not [s for s in _checkpoint_steps(tmp_path / "killed") if s >= 10]:
    assert killed.poll() is None and time.time() < deadline, killed.communicate()[0]
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert _checkpoint_steps(tmp_path / "killed")[-1] < 40   # it really was interrupted

  resumed = _run(tmp_path / "killed", *args)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert "Resumed from step" in out
  a, b = _params(tmp_path / "straight"), _params(tmp_path / "killed")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Identical but for the compile-time rows (one per run, timings differ).
  assert (_without_compile_rows(tmp_path / "straight")
          == _without_compile_rows(tmp_path / "killed"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  proc = _run(tmp_path, "total_steps=100000", "checkpoint_every_steps=100000",
              "data_delay_s=0.01")
  deadline = time.time() + 240
  while not (tmp_path / "metrics.jsonl").exists():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "Received SIGTERM: saved a checkpoint at step" in out
  saved = _checkpoint_steps(tmp_path)
  assert len(saved) == 1 and 0 < saved[0] < 100000


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
  config = tiny_task.get_config()
  config.nan_at_step = 7
  with pytest.raises(loop.NonFiniteLossError, match=r"step 7 \(loss\).*mse="):
    loop.train_and_evaluate(config, str(tmp_path), tiny_task.make_task)
  assert _checkpoint_steps(tmp_path) == [4]
  # The run resumes from the last good state (and, with the poison gone, finishes).
  config.nan_at_step = -1
  state = loop.train_and_evaluate(config, str(tmp_path), tiny_task.make_task)
  assert int(state.step) == 12
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert all(np.isfinite(v) for r in rows for v in r.values())


def test_zero_steps_is_refused_before_anything_is_written(tmp_path):
  config = tiny_task.get_config()
  config.total_steps = 0
  with pytest.raises(ValueError, match="total_steps must be at least 1, got 0"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), tiny_task.make_task)
  assert not (tmp_path / "run").exists()


def _wait_for(path, proc, timeout=240):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
    time.sleep(0.05)


def test_sigterm_while_blocked_in_data_ends_the_run_after_the_grace_period(tmp_path):
  # Steps 1-5 run, then the data iterator blocks on the main thread: the loop never
  # reaches the step boundary where it looks at the SIGTERM flag.
  marker = tmp_path / "hanging"
  proc = _run(tmp_path / "run", "total_steps=100", "log_every_steps=1", "eval_every_steps=0",
              "checkpoint_every_steps=4", "data_hang_at=40", f"data_hang_marker={marker}",
              "preemption_grace_s=2")
  _wait_for(marker, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert ("Stopped: SIGTERM received, but the loop did not reach a step boundary within "
          "preemption_grace_s=2 s") in out
  assert "while waiting for data; saved step 5" in out
  assert _checkpoint_steps(tmp_path / "run") == [4, 5]


def test_second_sigint_while_blocked_ends_the_run_at_once(tmp_path):
  marker = tmp_path / "hanging"
  proc = _run(tmp_path / "run", "total_steps=100", "eval_every_steps=0",
              "checkpoint_every_steps=100", "data_hang_at=24", f"data_hang_marker={marker}",
              "preemption_grace_s=100000")
  _wait_for(marker, proc)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  assert proc.poll() is None   # the first one only asks for a stop at the next boundary
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, out
  assert "Stopped: second signal (SIGINT after SIGINT) while waiting for data; saved step 3" in out
  assert _checkpoint_steps(tmp_path / "run") == [3]
