"""Subprocess entry: run.py's main with the loop tests' tiny task registered as the family
"tiny" (its step compiles in about a second, where a SIMLA step takes tens of seconds).

  python tests/train_jax/run_py_tiny.py --config=tests/train_jax/tiny_config.py [run.py flags]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "tiny_config.py")   # run.py's --config for the tiny family

if __name__ == "__main__":
  sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
  from absl import app
  import run
  run.FAMILIES["tiny"] = "tiny_task"
  app.run(run.main, argv=["run.py"] + sys.argv[1:])
