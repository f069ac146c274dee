"""Results file (JSON lines from the benchmarks' --out) -> Markdown tables.

  python benchmarks/report.py [benchmarks/results.jsonl] [--since 2025-01-01] [--label TEXT]

One table per benchmark (simla, mvcom, input, matmul), one row per measurement, with the
machine, date and load average it was taken under: what benchmarks/README.md's results
section is kept from.
"""

import argparse
import json
import os


def _f(x, fmt):
  return "-" if x is None else format(x, fmt)


def _gb(x):
  return "-" if not x else f"{x / 2**30:.2f}"


def simla_row(r):
  cpu = r.get("cpu_s")
  return [r["date"][:16].replace("T", " "), r.get("device", ""), r["size"], r["batch"],
          r["dtype"], r["remat"], r.get("attention", ""), r.get("label", ""),
          _f(r.get("step_s"), ".3f"), _f(cpu, ".2f"), _f(r.get("examples_per_s"), ".2f"),
          _f(r.get("compile_s"), ".0f"),
          _f(r.get("model_flops") and r["model_flops"] / 1e9, ".1f"),
          _f(r.get("mfu") and 100 * r["mfu"], ".1f"), _gb(r.get("xla_peak_bytes")),
          _gb(r.get("traced_total_bytes")), _gb(r.get("peak_memory_bytes")),
          r.get("load_before", r.get("load", ""))]


SIMLA = ["date", "device", "size", "batch", "dtype", "remat", "attention", "label", "step s",
         "CPU s", "ex/s", "compile s", "model GFLOP", "MFU %", "XLA peak GB", "traced GB",
         "peak mem GB", "load (1/5/15 min)"]


def mvcom_row(r):
  return [r["date"][:16].replace("T", " "), r.get("device", ""), r["size"], r["batch"],
          r.get("meta_batch"), r["dtype"], r["row"], r.get("label", ""), _f(r["step_s"], ".3f"),
          _f(r.get("cpu_s"), ".3f"), _f(r.get("flops", 0) / 1e9, ".2f"),
          _f(r.get("ratio"), ".2f"), r.get("load_before", "")]


MVCOM = ["date", "device", "size", "batch", "meta", "dtype", "step", "label", "step s", "CPU s",
         "GFLOP run", "x plain", "load (1/5/15 min)"]


def input_row(r):
  basis = {True: " per CPU-s", False: " wall", None: ""}[r.get("step_on_cpu")]
  return [r["date"][:16].replace("T", " "), r.get("cores"), r["pipeline"], r["batch"],
          r.get("threads"), _f(r["examples_per_s"], ".1f"), _f(r["examples_per_cpu_s"], ".1f"),
          _f(r.get("step_rate"), ".2f") + basis, _f(r.get("input_over_step"), ".1f"),
          r.get("load", "")]


INPUT = ["date", "cores", "pipeline", "batch", "threads", "ex/s", "ex per CPU-s",
         "step ex/s", "input/step", "load (1/5/15 min)"]


def matmul_row(r):
  return [r["date"][:16].replace("T", " "), r.get("device", ""), r["dtype"],
          _f(r["tflops"], ".4f"), r.get("load", "")]


MATMUL = ["date", "device", "dtype", "best TFLOP/s", "load (1/5/15 min)"]

KINDS = {"simla": (SIMLA, simla_row), "mvcom": (MVCOM, mvcom_row), "input": (INPUT, input_row),
         "matmul": (MATMUL, matmul_row)}


def markdown(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("path", nargs="?", default=os.path.join(os.path.dirname(__file__),
                                                          "results.jsonl"))
  p.add_argument("--since", default="", help="ISO date: only measurements from then on")
  p.add_argument("--label", default="", help="only measurements whose label contains this")
  args = p.parse_args(argv)
  with open(args.path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if r.get("date", "") >= args.since
             and args.label in r.get("label", "")]
  for kind, (header, row) in KINDS.items():
    rows = [row(r) for r in records if r.get("bench") == kind]
    if rows:
      print(f"\n### {kind}\n\n{markdown(header, rows)}")


if __name__ == "__main__":
  main()
