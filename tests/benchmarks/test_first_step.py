"""benchmarks/first_step.py: a real run.py run, timed up to its first finished step."""

import os
import sys

from benchmarks import first_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_PY_TINY = os.path.join(ROOT, "tests", "train_jax", "run_py_tiny.py")
TINY_CONFIG = os.path.join(ROOT, "tests", "train_jax", "tiny_config.py")


def test_first_step_is_timed_from_launch(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = first_step.measure([f"--config={TINY_CONFIG}", "--compile_cache_min_s=0"],
                         str(tmp_path / "cache"), timeout_s=120,
                         program=[sys.executable, RUN_PY_TINY], env=env)
  # Launch to first step covers the loop's own lowering, compile and first step.
  assert r["wall_to_first_step_s"] >= r["first_step_s"] > r["lower_s"] + r["compile_s"] > 0
  assert r["child_cpu_s"] > 0
  assert os.listdir(tmp_path / "cache")   # the given cache was used
