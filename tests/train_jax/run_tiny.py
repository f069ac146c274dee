"""Subprocess entry for loop tests: run_tiny.py WORKDIR [key=value ...]; writes params.npz."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..", "..")]

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tiny_task  # noqa: E402
from train_jax import loop  # noqa: E402


def main(workdir, *overrides):
  config = tiny_task.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  try:
    state = loop.train_and_evaluate(config, workdir, tiny_task.make_task)
  except loop.RunInterrupted as e:  # the loop printed what happened
    sys.exit(e.exit_code)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(os.path.join(workdir, "params.npz"), **flat)


if __name__ == "__main__":
  main(*sys.argv[1:])
