"""Results file (JSON lines from the benchmarks' --out) -> Markdown tables.

  python benchmarks/report.py [benchmarks/results.jsonl] [--since 2025-01-01] [--label TEXT]
  python benchmarks/report.py RESULTS --add key=value ... [--json FILE]   # append one line

One table per benchmark (simla, the official PyTorch step, mvcom, input, matmul, and the
ledger of benchmarks/gpu.sh's items), one row per measurement, with the machine, date and
load average it was taken under: what benchmarks/README.md's results section is kept from.
`--add` appends a record (date, host and load added) without importing jax: how gpu.sh
keeps the official step's JSON and how each of its items ended.
"""

import argparse
import datetime
import json
import os
import socket


def _f(x, fmt):
  return "-" if x is None else format(x, fmt)


def _gb(x):
  return "-" if not x else f"{x / 2**30:.2f}"


def simla_row(r):
  cpu = r.get("cpu_s")
  return [r["date"][:16].replace("T", " "), r.get("device", ""), r["size"], r["batch"],
          r["dtype"], r["remat"], {True: "on", False: "off"}.get(r.get("scan_layers"), "-"),
          r.get("attention", ""),
          " ".join(r.get("overrides") or []) + (" (compile only)" if r.get("memory_only") else ""),
          r.get("label", ""),
          _f(r.get("step_s"), ".3f"), _f(cpu, ".2f"), _f(r.get("examples_per_s"), ".2f"),
          _f(r.get("lower_s"), ".0f"), _f(r.get("compile_s"), ".0f"),
          _f(r.get("model_flops") and r["model_flops"] / 1e9, ".1f"),
          _f(r.get("mfu") and 100 * r["mfu"], ".1f"), _gb(r.get("xla_peak_bytes")),
          _gb(r.get("traced_total_bytes")), _gb(r.get("peak_memory_bytes")),
          r.get("load_before", r.get("load", ""))]


SIMLA = ["date", "device", "size", "batch", "dtype", "remat", "scan", "attention", "overrides",
         "label", "step s", "CPU s", "ex/s", "lower s", "lower + compile s", "model GFLOP",
         "MFU %", "XLA peak GB", "traced GB", "peak mem GB", "load (1/5/15 min)"]


def mvcom_row(r):
  scan = r.get("scan_layers")
  return [r["date"][:16].replace("T", " "), r.get("device", ""), r["size"], r["batch"],
          r.get("meta_batch"), r["dtype"], r["row"], "-" if scan is None else ("on" if scan else "off"),
          r.get("label", ""), _f(r.get("lower_s"), ".1f"), _f(r.get("compile_s"), ".1f"),
          _f(r.get("compile_cpu_s"), ".1f"), _f(r.get("step_s"), ".3f"),
          _f(r.get("cpu_s"), ".3f"), _f(r.get("flops", 0) / 1e9, ".2f"),
          _f(r.get("ratio"), ".2f"), r.get("load_before", "")]


MVCOM = ["date", "device", "size", "batch", "meta", "dtype", "step", "scan", "label", "lower s",
         "compile s", "compile CPU s", "step s", "CPU s", "GFLOP run", "x plain",
         "load (1/5/15 min)"]


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

def ref_row(r):
  return [r["date"][:16].replace("T", " "), r.get("device_name") or r.get("device", ""),
          r.get("dtype", r.get("amp", "")), r.get("batch"), r.get("label", ""),
          _f(r.get("step_s_median"), ".3f"), _f(r.get("pairs_per_s"), ".1f"),
          _f(r.get("peak_mem_gb"), ".1f"), r.get("dvae", ""), r.get("load", "")]


REF = ["date", "device", "dtype", "batch", "label", "step s", "pairs/s", "peak mem GB",
       "dVAE", "load (1/5/15 min)"]


def item_row(r):
  return [r["date"][:16].replace("T", " "), r.get("label", ""), r["item"], r["status"],
          r.get("rc", ""), r.get("seconds", ""), r.get("limit_s", ""), r.get("load", "")]


ITEM = ["date", "label", "item", "status", "exit", "s", "limit s", "load (1/5/15 min)"]

KINDS = {"simla": (SIMLA, simla_row), "simla_ref": (REF, ref_row), "mvcom": (MVCOM, mvcom_row),
         "input": (INPUT, input_row), "matmul": (MATMUL, matmul_row), "item": (ITEM, item_row)}


def _value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def read_json(path: str) -> dict:
  """A JSON object file, or the last line of a log that is one ({} if none)."""
  with open(path) as f:
    text = f.read()
  try:
    record = json.loads(text)
    return record if isinstance(record, dict) else {"value": record}
  except json.JSONDecodeError:
    pass
  for line in reversed(text.splitlines()):
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        continue
  return {}


def add(path: str, pairs: list[str], json_path: str | None) -> dict:
  """Appends {date, host, load, **json_path's object, **key=value pairs} to `path`."""
  record = {}
  if json_path:
    record = read_json(json_path) if os.path.exists(json_path) else {}
    if not record:
      record["error"] = f"no JSON result in {json_path}"
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise SystemExit(f"--add expects key=value, got {pair!r}")
    record[key] = _value(value)
  record = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "load": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), **record}
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
  return record


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
  p.add_argument("--add", nargs="+", metavar="KEY=VALUE",
                 help="append one record to the results file instead of printing tables")
  p.add_argument("--json", help="with --add: a file whose JSON object the record extends")
  args = p.parse_args(argv)
  if args.add:
    print(json.dumps(add(args.path, args.add, args.json)))
    return
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
