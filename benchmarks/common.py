"""What every benchmark shares: machine facts, step timing, XLA cost and memory, output.

Benchmarks print tables and assert nothing. Every measurement is printed with the load
average of the machine at the time (the CPUs are shared), the CPU seconds the process
used beside the wall seconds, and optionally appended as one JSON line to a results file
(`--out`), from which benchmarks/README.md's table is kept.
"""

import datetime
import json
import os
import platform
import re
import resource
import socket
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np


def enable_compile_cache(path: str | None) -> None:
  """Persistent XLA cache (CPU too): repeated runs skip compilation. Off by default, since
  the benchmarks report compile time; the tests' cache directory is a good value."""
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def machine() -> dict[str, Any]:
  """Where and when: host, CPU model, cores, backend and devices, load average."""
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  dev = jax.devices()[0]
  return dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
              host=socket.gethostname(), cpu=cpu, cores=os.cpu_count(),
              backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)),
              devices=jax.device_count(), jax=jax.__version__, load=load())


def load() -> str:
  """The 1, 5 and 15 minute load averages, as `uptime` prints them."""
  return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def wait_for_load(threshold: float, max_s: float, poll_s: float = 15.0) -> float:
  """Sleeps until the 1-minute load average is below `threshold` (this process idle), at
  most `max_s` seconds; returns the seconds waited."""
  t0 = time.perf_counter()
  while os.getloadavg()[0] >= threshold and time.perf_counter() - t0 < max_s:
    time.sleep(poll_s)
  return time.perf_counter() - t0


def time_steps(step: Callable[[Any], tuple[Any, Any]], carry: Any, steps: int,
               warmup: int = 2) -> tuple[Any, np.ndarray, np.ndarray]:
  """Calls `carry, out = step(carry)` warmup + steps times, blocking on `out` each time.

  Returns (carry, wall seconds (steps,), process CPU seconds (steps,)): CPU seconds count
  every thread of this process, so on a shared machine wall / CPU shows the share of the
  cores the step got.
  """
  walls, cpus = [], []
  for i in range(warmup + steps):
    w0, c0 = time.perf_counter(), time.process_time()
    carry, out = step(carry)
    jax.block_until_ready(out)
    if i >= warmup:
      walls.append(time.perf_counter() - w0)
      cpus.append(time.process_time() - c0)
  return carry, np.asarray(walls), np.asarray(cpus)


def cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled executable: flops and bytes accessed per call."""
  c = compiled.cost_analysis()
  c = (c[0] if c else {}) if isinstance(c, (list, tuple)) else (c or {})
  return dict(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)))


def memory(compiled) -> dict[str, float]:
  """XLA's buffer assignment of a compiled executable, in bytes.

  `peak` = arguments + outputs - donated (aliased) + temporaries: what the device must hold
  while the step runs. It comes from this backend's fusion and scheduling decisions, so on
  another backend it is an estimate.
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             aliased=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
  return out


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute")
_SHAPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_COLLECTIVE_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")


def collective_bytes(compiled) -> dict[str, float]:
  """Bytes each device receives from every collective in a compiled executable, by kind:
  the sizes of their (per-device) results in the optimised HLO, each op counted once
  (an op inside a loop body runs once per iteration: this is a lower bound then)."""
  totals = dict.fromkeys(_COLLECTIVES, 0.0)
  for line in compiled.as_text().splitlines():
    m = _COLLECTIVE_OP.search(line)
    if not m:
      continue
    for dtype, dims in _SHAPE.findall(m.group(1)):
      size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      bits = 8 if dtype == "pred" else int(re.sub(r"\D", "", dtype))   # f32, bf16, s8, ...
      totals[m.group(2)] += size * max(1, bits // 8)
  return totals


def peak_memory_bytes() -> tuple[float, str]:
  """Peak memory of the device (GPU/TPU allocator) or of this process (CPU: max RSS)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"]), "device"
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "host RSS"


def gb(x: float) -> str:
  return f"{x / 2**30:.2f}"


def print_rows(rows: Iterable[tuple[str, Any]], width: int = 26) -> None:
  for k, v in rows:
    print(f"{k:>{width}}  {v}", flush=True)


def print_table(header: list[str], rows: list[list[Any]]) -> None:
  cells = [[str(x) for x in r] for r in [header] + rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  for j, r in enumerate(cells):
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)), flush=True)
    if j == 0:
      print("  ".join("-" * w for w in widths))


def append_result(path: str | None, record: dict[str, Any]) -> None:
  """One JSON line per measurement (machine facts included) in `path`, if given."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps({**machine(), **record}, default=str) + "\n")
