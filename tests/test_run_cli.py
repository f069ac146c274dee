"""run.py's command line: help, config overrides, family dispatch."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=120)


def _config_file(tmp_path, family):
  path = tmp_path / "cfg.py"
  path.write_text(
      "import sys\n"
      f"sys.path.insert(0, {ROOT!r})\n"
      "from configs import common\n"
      "def get_config(arg=None):\n"
      "  c = common.base()\n"
      f"  c.family = {family!r}\n"
      "  return c\n")
  return str(path)


def test_helpfull_documents_config_and_workdir():
  out = _run("--helpfull").stdout
  assert "--config" in out and "--workdir" in out


def test_unknown_config_key_is_named(tmp_path):
  res = _run(f"--config={_config_file(tmp_path, 'mvcom')}", "--config.no_such_key=3")
  assert res.returncode != 0
  assert "no_such_key" in res.stderr


def test_unknown_family_lists_known_ones(tmp_path):
  res = _run(f"--config={_config_file(tmp_path, 'nope')}", f"--workdir={tmp_path}/w")
  assert res.returncode != 0
  assert "'nope'" in res.stderr and "mvcom" in res.stderr and "simla" in res.stderr


def test_default_workdir_includes_variant():
  sys.path.insert(0, ROOT)
  import run
  assert run.default_workdir("configs/simla.py") == os.path.join("runs", "simla")
  assert run.default_workdir("configs/mvcom.py:arcface") == os.path.join("runs", "mvcom_arcface")


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost(tmp_path):
  # The README's localhost launch: 2 processes x 4 CPU devices, one coordinator.
  cfg = tmp_path / "tiny_mvcom.py"
  cfg.write_text(
      "import sys\n"
      f"sys.path.insert(0, {ROOT!r})\n"
      "from configs import mvcom\n"
      "def get_config(arg=None):\n"
      "  c = mvcom.get_config(arg)\n"
      "  c.update(batch_size=16, total_steps=2, log_every_steps=1, eval_every_steps=0,\n"
      "           checkpoint_every_steps=2, progress_bar=False)\n"
      "  c.model.update(layers=(1,), widths=(4,), embed_dim=8)\n"
      "  c.data.update(image_size=8, frequencies=3, num_train_ids=40, images_per_id=(3, 5),\n"
      "                group_fractions=(0.6, 0.25, 0.15), meta_ids_per_group=3,\n"
      "                meta_images_per_id=2, test_ids_per_group=4,\n"
      "                test_images_per_id=5, pairs_per_cell=20, meta_batch_size=8,\n"
      "                prefetch_batches=0)\n"
      "  c.eval.update(batch_size=32, n_folds=2)\n"
      "  return c\n")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "run.py"), f"--config={cfg}:cosface",
       f"--workdir={tmp_path}/run", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert "Done at step 2" in outs[0] and "Done at step 2" not in outs[1]
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
  assert json.loads((tmp_path / "run" / "config.json").read_text())["total_steps"] == 2
