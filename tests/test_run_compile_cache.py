"""run.py's persistent compilation cache: a rerun or a resumed run compiles from it, and
the loop reports how long the train step took to compile and the first step to finish."""

import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run.py with the loop tests' tiny task as a family: its step compiles in about a second.
RUN_PY_TINY = os.path.join(ROOT, "tests", "train_jax", "run_py_tiny.py")
TINY_CONFIG = os.path.join(ROOT, "tests", "train_jax", "tiny_config.py")


def _run(workdir, cache, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)   # the flag alone decides
  out = subprocess.run(
      [sys.executable, RUN_PY_TINY, f"--config={TINY_CONFIG}",
       f"--workdir={workdir}", f"--compile_cache={cache}", "--compile_cache_min_s=0", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout + out.stderr


def _entries(cache):
  return set(os.listdir(cache)) if os.path.isdir(cache) else set()


def _compile_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if "compile/compile_s" in r]


def test_rerun_and_resume_compile_from_the_cache(tmp_path):
  cache = str(tmp_path / "cache")
  first = _run(tmp_path / "a", cache)
  assert "Compiled the train step in" in first and cache in first
  after_first = _entries(cache)
  assert any(name.startswith("jit_train_step") for name in after_first)
  rows = _compile_rows(tmp_path / "a")
  assert len(rows) == 1 and rows[0]["step"] == 0 and rows[0]["compile/lower_s"] > 0
  # Start-up to the first finished step includes the step's lowering and compilation.
  assert "First train step done" in first
  assert rows[0]["compile/first_step_s"] > rows[0]["compile/lower_s"] + rows[0]["compile/compile_s"]

  # The run as if stopped after its step-8 checkpoint: a second process, same config and
  # cache; every program it compiles is found there, none is added.
  shutil.rmtree(tmp_path / "a" / "checkpoints" / "12")
  resumed = _run(tmp_path / "a", cache)
  assert "Resumed from step 8" in resumed and "Compiled the train step in" in resumed
  assert _entries(cache) == after_first
  assert [r["step"] for r in _compile_rows(tmp_path / "a")] == [0, 8]


def test_empty_compile_cache_turns_it_off():
  import jax
  import run
  before = jax.config.jax_compilation_cache_dir   # the tests' own cache (conftest)
  try:
    run.enable_compile_cache("", 0.5)
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
