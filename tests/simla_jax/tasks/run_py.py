"""`python run.py` end to end from the task tests."""

import os
import subprocess
import sys

from train_jax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run(args, workdir, timeout: int = 900) -> tuple[list[dict], str]:
  """Runs `python run.py ARGS --workdir=WORKDIR` from the repository root without a progress
  bar; asserts it succeeded; returns (the workdir's metrics rows, its stdout)."""
  cmd = [sys.executable, "run.py", *args, "--config.progress_bar=False", f"--workdir={workdir}"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return metrics_lib.read_metrics(str(workdir)), done.stdout
