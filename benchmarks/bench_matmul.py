"""The machine's measured matmul rate: the roofline every MFU figure divides by.

  python benchmarks/bench_matmul.py [--sizes 1024,2048] [--dtypes float32,bfloat16]
      [--out benchmarks/results.jsonl]

Prints a table of TFLOP/s per size and dtype on the default backend, and the best
rate per dtype (the other benchmarks call `peak_rate` in their own process for MFU).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp


def matmul_rate(n: int, dtype, repeats: int = 5) -> float:
  """FLOP/s of an n×n @ n×n product (2n³ FLOPs), median of `repeats` after warm-up."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / sorted(times)[len(times) // 2]


def peak_rate(dtype=jnp.float32, sizes=None) -> float:
  """Best rate over `sizes`; by default sizes that saturate the backend (an accelerator
  needs large products: at n = 2048 an H200 is mostly waiting for the launch)."""
  if sizes is None:
    sizes = (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)
  return max(matmul_rate(n, dtype) for n in sizes)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="512,1024,2048")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--out", default="", help="append the best rates as JSON lines here")
  args = p.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  sizes = [int(s) for s in args.sizes.split(",")]
  print(f"backend: {jax.default_backend()}  devices: {jax.devices()}")
  print(f"{'dtype':>10} {'n':>6} {'TFLOP/s':>10}")
  for dt in args.dtypes.split(","):
    best = 0.0
    for n in sizes:
      r = matmul_rate(n, jnp.dtype(dt))
      best = max(best, r)
      print(f"{dt:>10} {n:>6} {r / 1e12:>10.4f}")
    print(f"{dt:>10} {'best':>6} {best / 1e12:>10.4f}")
    common.append_result(args.out, dict(bench="matmul", dtype=dt, tflops=best / 1e12,
                                        sizes=sizes))


if __name__ == "__main__":
  main()
