"""Checkpoints against what clusters do: damage, full or unwritable directories, config
changes, another mesh or process count, and a SIGTERM during an asynchronous save.

One 12-step FSDP run (mesh data=2 x fsdp=4, checkpoints at 4, 8, 12) is trained once;
each test works on a copy of its workdir.
"""

import errno
import glob
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train_jax import checkpoint as checkpoint_lib
from train_jax import loop
from train_jax import metrics as metrics_lib

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import tiny_task  # noqa: E402


def _config(**changes):
  c = tiny_task.get_config()
  c.mesh.update(data=2, fsdp=4, model=1)
  c.update(changes)
  return c


def _params(state):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _files(workdir, step):
  """{relative path: bytes} of one checkpoint: to show it was not touched."""
  root = os.path.join(workdir, "checkpoints", str(step))
  out = {}
  for path in glob.glob(os.path.join(root, "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(workdir, final params) of the 12-step run; checkpoints 4, 8, 12."""
  workdir = str(tmp_path_factory.mktemp("base"))
  state = loop.train_and_evaluate(_config(), workdir, tiny_task.make_task)
  assert _steps(workdir) == ["12", "4", "8"]
  return workdir, _params(state)


@pytest.fixture
def run(base, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(base[0], workdir)
  return workdir


def _truncate_state_data(step_dir):
  (path,) = glob.glob(os.path.join(step_dir, "state", "d", "*"))
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    "truncated_state": _truncate_state_data,
    "missing_iterator_state": lambda d: os.remove(os.path.join(d, "data", "process_0-of-1.json")),
    "missing_state_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_the_run_falls_back(run, damage, capsys):
  DAMAGE[damage](os.path.join(run, "checkpoints", "12"))
  intact = _files(run, 8)
  state = loop.train_and_evaluate(_config(), run, tiny_task.make_task)
  out = capsys.readouterr().out
  assert f"checkpoint step 12 in {run}/checkpoints is damaged (" in out
  assert "moved it to 12.damaged and trying step 8" in out
  assert "Resumed from step 8" in out
  assert int(state.step) == 12
  assert _steps(run) == ["12", "12.damaged", "4", "8"]   # kept for inspection, out of orbax's count
  assert _files(run, 8) == intact                         # the intact one was not rewritten
  assert [r["step"] for r in metrics_lib.read_metrics(run) if "train/loss" in r] == [2, 4, 6, 8, 10, 12]


def test_damaged_checkpoint_without_fallback_stops_and_touches_nothing(run):
  DAMAGE["truncated_state"](os.path.join(run, "checkpoints", "12"))
  before = {s: _files(run, s) for s in (4, 8, 12)}
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"checkpoint step 12 in .* is damaged \(.*\)\. Stopped \(config "
                           r"checkpoint_fallback=False\); the older checkpoints \[4, 8\] are "
                           r"untouched"):
    loop.train_and_evaluate(_config(checkpoint_fallback=False, total_steps=16), run,
                            tiny_task.make_task)
  assert {s: _files(run, s) for s in (4, 8, 12)} == before


def test_unwritable_checkpoint_directory_is_reported_before_training(tmp_path):
  (tmp_path / "checkpoints").write_text("a file where the directory should be")
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"checkpoint directory .*checkpoints is not writable: .*nothing was "
                           r"trained"):
    loop.train_and_evaluate(_config(), str(tmp_path), tiny_task.make_task)
  assert not (tmp_path / "metrics.jsonl").exists()


def test_failing_save_names_the_last_complete_checkpoint(tmp_path, monkeypatch):
  save = ocp.CheckpointManager.save

  def disk_full_at_8(self, step, *args, **kwargs):
    if step == 8:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_at_8)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"saving checkpoint step 8 to .* failed: OSError: \[Errno 28\] No "
                           r"space left on device\. The last complete checkpoint is step 4"):
    loop.train_and_evaluate(_config(), str(tmp_path), tiny_task.make_task)
  assert _steps(str(tmp_path)) == ["4"]


def test_sigterm_during_an_async_save_leaves_complete_checkpoints(tmp_path, monkeypatch, capsys):
  save = checkpoint_lib.Checkpointer.save

  def save_then_sigterm(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)     # returns with the write still in flight
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save_then_sigterm)
  loop.train_and_evaluate(_config(), str(tmp_path), tiny_task.make_task)
  assert "Received SIGTERM: saved a checkpoint at step 5" in capsys.readouterr().out
  assert _steps(str(tmp_path)) == ["4", "5"]
  for step in (4, 5):
    restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
    assert int(restored["step"]) == step


def test_config_with_other_shapes_is_refused_naming_the_keys(run):
  before = {s: _files(run, s) for s in (4, 8, 12)}
  with pytest.raises(checkpoint_lib.ConfigMismatchError,
                     match=r"checkpoint step 12 in .* was written by a config whose train state "
                           r"differs from this one: .*\['Dense_0'\]\['kernel'\] \[\[8, 32\], "
                           r"'float32'\] in the checkpoint vs \[\[8, 48\], 'float32'\] now.*"
                           r"Config keys that differ: hidden: 32 -> 48; total_steps: 12 -> 16\."):
    loop.train_and_evaluate(_config(hidden=48, total_steps=16), run, tiny_task.make_task)
  assert {s: _files(run, s) for s in (4, 8, 12)} == before


def test_config_change_that_keeps_shapes_resumes(run, capsys):
  state = loop.train_and_evaluate(_config(log_every_steps=1, total_steps=14), run,
                                  tiny_task.make_task)
  assert "Resumed from step 12" in capsys.readouterr().out
  assert int(state.step) == 14


def _use_two_process_data_files(run):
  data = os.path.join(run, "checkpoints", "12", "data")
  os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
  shutil.copy(os.path.join(data, "process_0-of-2.json"), os.path.join(data, "process_1-of-2.json"))


def test_another_process_count_is_refused_or_restarts_the_data(run, capsys):
  _use_two_process_data_files(run)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"holds data-iterator positions for 2 processes; this run has 1\. "
                           r"Each process reads its own shard.*Rerun with 2 processes, or set "
                           r"data_state_on_process_change='restart'"):
    loop.train_and_evaluate(_config(total_steps=14), run, tiny_task.make_task)
  state = loop.train_and_evaluate(
      _config(total_steps=14, data_state_on_process_change="restart"), run, tiny_task.make_task)
  out = capsys.readouterr().out
  assert "the data iterators start afresh" in out and "Resumed from step 12" in out
  assert int(state.step) == 14


def _run_tiny(workdir, devices, *overrides):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  res = subprocess.run([sys.executable, os.path.join(HERE, "run_tiny.py"), workdir, *overrides],
                       env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout + res.stderr
  with np.load(os.path.join(workdir, "params.npz")) as f:
    return {k: f[k] for k in f.files}, res.stdout


def test_fsdp_checkpoint_restores_onto_fewer_devices_and_training_continues(base, tmp_path):
  workdir, params_8 = base
  # 8 devices (data 2 x fsdp 4) -> 4 devices (fsdp 4): the same values.
  on4 = str(tmp_path / "on4")
  shutil.copytree(workdir, on4)
  restored, out = _run_tiny(on4, 4, "mesh.data=1", "mesh.fsdp=4")
  assert "Resumed from step 12" in out
  assert restored.keys() == params_8.keys()
  for k in params_8:
    np.testing.assert_array_equal(restored[k], params_8[k], err_msg=k)
  # -> 1 device, training on: the same losses as training on with 8 devices, so the values
  # and the iterator position carried over (to float32 reduction-order tolerance).
  on1, on8 = str(tmp_path / "on1"), str(tmp_path / "on8")
  shutil.copytree(workdir, on1)
  shutil.copytree(workdir, on8)
  _run_tiny(on1, 1, "total_steps=16", "log_every_steps=1")
  loop.train_and_evaluate(_config(total_steps=16, log_every_steps=1), on8, tiny_task.make_task)
  losses = [{r["step"]: r["train/loss"] for r in metrics_lib.read_metrics(w) if r["step"] > 12
             and "train/loss" in r} for w in (on1, on8)]
  assert sorted(losses[0]) == sorted(losses[1]) == [13, 14, 15, 16]
  np.testing.assert_allclose([losses[0][s] for s in range(13, 17)],
                             [losses[1][s] for s in range(13, 17)], rtol=1e-5)
