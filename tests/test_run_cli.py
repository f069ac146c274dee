"""run.py's command line: help, config overrides, family dispatch."""

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
