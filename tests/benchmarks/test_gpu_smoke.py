"""benchmarks/gpu.sh in SMOKE mode on the CPU: every row it measures lands in results.jsonl
with its compile s, step s, examples/s, MFU and peak memory, the official step's JSON line
becomes a row of its own, and an item killed at its limit leaves a row saying so."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Stands in for shared/reference/run_ref.py (the official code cannot run in the test
# suite): prints what run_ref.py --mode time_base prints, its arguments included, and
# writes the --out file as it does.
FAKE_REF = textwrap.dedent("""
    import json, sys
    args = sys.argv[1:]
    out = args[args.index("--out") + 1]
    res = {"impl": "official-pytorch", "mode": "time_base", "argv": args,
           "step_s_median": 0.5, "pairs_per_s": 128.0, "peak_mem_gb": None, "batch": 64}
    print("step 0 (warmup) 0.6s", file=sys.stderr)
    print(json.dumps(res), flush=True)
    json.dump(res, open(out, "w"), indent=1)
""")


def _gpu_sh(tmp_path, only, budget_s=400, ref=True, **env_vars):
  ref_dir = tmp_path / "ref"
  ref_dir.mkdir(exist_ok=True)
  (ref_dir / "run_ref.py").write_text(FAKE_REF)
  env = dict(os.environ, SMOKE="1", ONLY=only, BUDGET_S=str(budget_s), PYTHON=sys.executable,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.update(env_vars)
  out = tmp_path / "out"
  proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), str(out)]
                        + ([str(ref_dir)] if ref else []),
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget_s + 60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  rows = []
  if (out / "results.jsonl").exists():
    with open(out / "results.jsonl") as f:
      rows = [json.loads(line) for line in f]
  return out, rows, proc.stdout


def test_rows_are_written_as_measured(tmp_path):
  out, rows, stdout = _gpu_sh(tmp_path, "matmul,official_bf16")
  items = {r["item"]: r for r in rows if r.get("bench") == "item"}
  assert {k: v["status"] for k, v in items.items()} == {"matmul": "ok", "official_bf16": "ok"}
  (matmul,) = [r for r in rows if r.get("bench") == "matmul"]
  assert matmul["tflops"] > 0 and matmul["jax"]
  # The official step: its JSON kept as a row, run as shared/reference/README.md says.
  (ref,) = [r for r in rows if r.get("bench") == "simla_ref"]
  assert ref["pairs_per_s"] == 128.0 and ref["amp"] == "bf16"
  assert ref["argv"][:4] == ["--mode", "time_base", "--device", "cpu"]
  # The order of the file is the order of measurement: nothing waits for the end.
  kinds = [r.get("item") or r["bench"] for r in rows]
  assert kinds == ["matmul", "matmul", "official_bf16", "simla_ref"]
  table = (out / "table.md").read_text()
  assert "### matmul" in table and "### simla_ref" in table and "### item" in table
  assert "done in" in stdout and (out / "log.txt").read_text().count("== ") == 2


def test_an_item_past_its_budget_is_skipped_and_recorded(tmp_path):
  _, rows, stdout = _gpu_sh(tmp_path, "matmul", budget_s=30, ref=False)
  assert "matmul: skipped" in stdout           # its 60 s limit does not fit in 30 s
  (item,) = [r for r in rows if r.get("bench") == "item"]
  assert item["item"] == "matmul" and item["status"] == "skipped"


def test_gpu_commands_within_eight_minutes(tmp_path):
  """The GPU sequence (DRY: commands printed, none run): bfloat16, cuDNN attention, scanned
  layers, the official step on CUDA; every limit inside the budget, the budget inside 8 min."""
  _, rows, stdout = _gpu_sh(tmp_path, "", budget_s=450, SMOKE="", DRY="1")
  commands = {line.split(" (limit")[0][3:]: line for line in stdout.splitlines()
              if line.startswith("== ") and " (limit " in line}
  assert list(commands)[:5] == ["smoke", "matmul", "simla compile", "simla run", "official_bf16"]
  for name in ("smoke", "simla compile", "simla run"):
    assert "--dtype bfloat16 --attention cudnn --scan" in commands[name], name
  assert "--size base --batch 64" in commands["simla run"]
  assert "--memory_only" in commands["simla compile"]
  assert "--mode time_base --device cuda --batch 64 --amp bf16" in commands["official_bf16"]
  limits = [int(line.split("(limit ")[1].split(" s")[0]) for line in commands.values()]
  assert max(limits) <= 450 and rows == []


@pytest.mark.slow
def test_smoke_step_row(tmp_path):
  """The tiny SIMLA step gpu.sh runs first (layers scanned): one row with every column.
  End to end: its compile takes one to four minutes on a loaded 2-core CPU."""
  _, rows, _ = _gpu_sh(tmp_path, "smoke", budget_s=900, ref=False)
  items = {r["item"]: r["status"] for r in rows if r.get("bench") == "item"}
  assert items == {"smoke": "ok"}
  (simla,) = [r for r in rows if r.get("bench") == "simla"]
  assert simla["label"] == "gpu.sh smoke" and simla["size"] == "tiny"
  assert simla["scan_layers"] is True
  for key in ("compile_s", "step_s", "examples_per_s", "mfu", "peak_memory_bytes"):
    assert simla[key] > 0, key
