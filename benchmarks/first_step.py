"""Time from start-up to the first finished train step of a real `run.py` run.

  python benchmarks/first_step.py [--cache DIR | --cold] [--label L] [--out results.jsonl]
      -- --config=configs/simla.py [--config.key=value ...]

Starts `python run.py ARGS` in a new work directory, reads its output until the loop
reports the first finished step ("First train step done"), then kills it (nothing is
saved; a run's first checkpoint comes much later). Reported: wall seconds from launch to
that line (interpreter, imports, data, init, lowering, compile, one step), the loop's own
figures from metrics.jsonl (`compile/lower_s`, `compile/compile_s`, `compile/first_step_s`),
the child's CPU seconds (user + sys, all threads) and the load average before and after.
`--cold` gives the run a new, empty compilation cache (what a first run on a machine
pays); `--cache DIR` a given one (run twice: the second run measures a warm cache).
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DONE = "First train step done"


def measure(run_args: list[str], cache: str, timeout_s: float,
            program: list[str] | None = None, env: dict | None = None,
            cwd: str = ROOT) -> dict:
  """Runs run.py until its first step is done; wall s, the loop's timings, child CPU s.

  `program`: the command that runs run.py's main (default `python run.py`), in `cwd`.
  """
  workdir = tempfile.mkdtemp(prefix="first_step_")
  cmd = [*(program or [sys.executable, os.path.join(ROOT, "run.py")]),
         f"--workdir={workdir}", f"--compile_cache={cache}", *run_args]
  env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  wall, lines = None, []
  deadline = t0 + timeout_s
  try:
    for line in proc.stdout:   # tqdm's bar and the loop's messages, unbuffered
      lines.append(line)
      if DONE in line:
        wall = time.perf_counter() - t0
        break
      if time.perf_counter() > deadline:
        break
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if wall is None:
    raise RuntimeError(f"no '{DONE}' line from {' '.join(cmd)} within {timeout_s} s:\n"
                       + "".join(lines[-30:]))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(x) for x in f]
  timings = next(r for r in rows if "compile/first_step_s" in r)
  return dict(wall_to_first_step_s=wall,
              child_cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
              **{k.replace("compile/", ""): v for k, v in timings.items() if k != "step"},
              workdir=workdir)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cache", default="", help="compilation cache directory for the run")
  p.add_argument("--cold", action="store_true", help="a new, empty compilation cache")
  p.add_argument("--timeout_s", type=float, default=900.0)
  p.add_argument("--root", default=ROOT, help="the checkout whose run.py runs (e.g. an "
                 "older commit's, for a before/after pair)")
  p.add_argument("--label", default="")
  p.add_argument("--out", default="", help="append the result as a JSON line to this file")
  p.add_argument("run_args", nargs="+", help="run.py's flags, after --")
  args = p.parse_args(argv)
  if args.cold == bool(args.cache):
    p.error("give exactly one of --cold and --cache DIR")
  cache = tempfile.mkdtemp(prefix="xla_cache_") if args.cold else args.cache
  load_before = common.load()
  root = os.path.abspath(args.root)
  r = measure(args.run_args, cache, args.timeout_s,
              program=[sys.executable, os.path.join(root, "run.py")], cwd=root)
  record = dict(bench="first_step", label=args.label, run_args=args.run_args,
                cache="empty" if args.cold else cache, load_before=load_before,
                load_after=common.load(), **r)
  # startup_s / wait_s: written by a loop that compiles during start-up (compile_ahead).
  ahead = (f"start-up {r['startup_s']:.1f} s, then first step after {r['first_step_s'] - r['startup_s']:.1f} s"
           f"{'; waited ' + format(r['wait_s'], '.1f') + ' s for the compile' if 'wait_s' in r else ''}; "
           if "startup_s" in r else "")
  print(f"{args.label or 'run'}: first step done {r['wall_to_first_step_s']:.1f} s after "
        f"launch ({ahead}in-process {r['first_step_s']:.1f} s; lowering {r['lower_s']:.1f} s, XLA "
        f"compile {r['compile_s']:.1f} s; child CPU {r['child_cpu_s']:.1f} s; cache "
        f"{record['cache']}; load {load_before} -> {record['load_after']})", flush=True)
  common.append_result(args.out, record)


if __name__ == "__main__":
  main()
