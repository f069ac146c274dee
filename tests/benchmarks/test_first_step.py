"""benchmarks/first_step.py: a real run.py run, timed up to its first finished step."""

import os
import sys

from benchmarks import first_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "tests", "train_jax")

# run.py's main with the loop tests' tiny task as a family (compiles in about a second).
_MAIN = f"""
import sys
sys.path[:0] = [{ROOT!r}, {TINY!r}]
from absl import app
import run
run.FAMILIES["tiny"] = "tiny_task"
app.run(run.main, argv=["run.py"] + sys.argv[1:])
"""


def test_first_step_is_timed_from_launch(tmp_path):
  config = tmp_path / "tiny_cfg.py"
  config.write_text(f"import sys\nsys.path[:0] = [{ROOT!r}, {TINY!r}]\n"
                    "from tiny_task import get_config\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = first_step.measure([f"--config={config}", "--compile_cache_min_s=0"],
                         str(tmp_path / "cache"), timeout_s=120,
                         program=[sys.executable, "-c", _MAIN], env=env)
  # Launch to first step covers the loop's own lowering, compile and first step.
  assert r["wall_to_first_step_s"] >= r["first_step_s"] > r["lower_s"] + r["compile_s"] > 0
  assert r["child_cpu_s"] > 0
  assert os.listdir(tmp_path / "cache")   # the given cache was used
