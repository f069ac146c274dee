"""SIMLA's three claims on the built-in shapes world, and the MIM target choice.

  python -m simla_jax.experiments.claims                            # every arm, seeds 0-2
  python -m simla_jax.experiments.claims --arms=simla,albef --seeds=0   # a part of it
  python -m simla_jax.experiments.claims --report_only              # table + PNGs only
  python -m simla_jax.experiments.claims --downstream=grounding,ve  # + entailment per run
  python -m simla_jax.experiments.claims --downstream_only          # finished runs only

Each (arm, seed) trains `configs/simla.py` (`:albef` for ALBEF) with the arm's changes in a
subprocess, into <out>/<arm>/seed<k>. A run whose result.json exists is skipped; an
unfinished one resumes from its checkpoint (its curve's times then restart from the last
recorded evaluation). Then <out>/claims.md (the README table and verdicts), ablation.png
and compute.png (into `--figures`, default <out>) are written from every result.json found;
`--readme` also replaces the README's text between `<!-- claims:begin -->` and
`<!-- claims:end -->`.

Downstream (`--downstream`, after training; never with `--report_only`, which reports what
exists): from each finished run's checkpoint, `grounding` (default) scores zero-shot
Grad-CAM grounding (`configs/simla_grounding.py`, `eval_only`, every BERT layer and ViT
block on val and test; the ITM layer and ITC block are chosen on val per run, test read
at that choice) and `ve` (asked for: ~350 CPU s a run) fine-tunes visual entailment with
`configs/simla_ve.py`'s recipe (test accuracy at the last step). Each runs in a subprocess
of run.py with its workdir under <out>/downstream/<arm>/seed<k>; the summary is cached in
the run dir as grounding0shot.json / ve.json (present: skipped). The downstream table
reports them next to the verdicts, which stay on test R@1.

Arms: the loss ablation in the paper's order (Table 1: ITM, +ITC, +MLM, +MIM, +PSL = full
SIMLA), ALBEF (`model.architecture="albef"`: ITC + ITM + MLM, text / fusion split of the same
BERT depth), and full SIMLA with dVAE MIM targets on the half-resolution view (official
weights with `--dvae_weights`, else a random-weight encoder, said so in the table) against
the built-in random-projection targets of the `simla` arm. Loss weights of the objectives an
arm keeps are the default config's; every other setting is the default config's (its lr and
steps were chosen on val by the pretraining work; nothing is tuned on test here). Each
evaluation scores val, test, the compositional split and the strict one (every object an
unseen colour-shape pair); the table reports all four.

Measure, fixed before the numbers: R@1 = mean of text- and image-retrieval R@1 (ITC top-k
re-ranked by ITM, the official zero-shot protocol). Paired differences per seed and the
verdict rule are in `stats.py` ("higher" = mean difference above 2 standard errors).
Reading rules for the paper's claims:
  1. Every added objective helps (Table 1): each step ITM -> +ITC -> +MLM -> +MIM -> +PSL is
     "higher" on test R@1. Holds if all are; does not hold if one is "lower".
  2. SIMLA beats ALBEF at the same data and steps (Table 2): SIMLA - ALBEF on test R@1 is
     "higher".
  3. Zero-shot accuracy rises faster per unit of compute (Fig. 4): SIMLA - ALBEF on test R@1
     at equal training compute (per seed, both curves interpolated at the smaller of the two
     runs' final compute) is "higher", on XLA-counted train-step FLOPs; wall seconds shown
     as well (a shared machine distorts them).
"""

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from simla_jax.experiments import stats
from train_jax import metrics as metrics_lib
from train_jax import readme_section

LOSSES = ("itc", "itm", "mlm", "mim", "psl")


@dataclasses.dataclass(frozen=True)
class Arm:
  label: str
  variant: str                        # configs/simla.py variant
  losses: tuple[str, ...]             # objectives with the default config's weight
  mim_target: str = "random_projection"


ARMS = {
    "itm": Arm("ITM", "default", ("itm",)),
    "itc": Arm("+ITC", "default", ("itm", "itc")),
    "mlm": Arm("+MLM", "default", ("itm", "itc", "mlm")),
    "mim": Arm("+MIM", "default", ("itm", "itc", "mlm", "mim")),
    "simla": Arm("+PSL = SIMLA", "default", LOSSES),
    "albef": Arm("ALBEF", "albef", ("itc", "itm", "mlm")),
    "dvae": Arm("SIMLA, dVAE MIM targets", "default", LOSSES, mim_target="dvae"),
}
ABLATION = ("itm", "itc", "mlm", "mim", "simla")
METRIC = "r1"           # mean of TR and IR R@1, see `r1`
EVALS = 4               # evaluations per run (the compute curve)


def r1(metrics: Mapping[str, float], split: str, itc_only: bool = False) -> float:
  """Mean of TR and IR R@1 of `split` from an evaluator's metrics (nan if absent)."""
  p = f"{split}_itc_" if itc_only else f"{split}_"
  keys = (f"{p}tr_r1", f"{p}ir_r1")
  if not all(k in metrics for k in keys):
    return math.nan
  return 0.5 * (float(metrics[keys[0]]) + float(metrics[keys[1]]))


# --------------------------------------------------------------------------- configs
def arm_config(arm: str, seed: int, *, steps: int = 0, evals: int = EVALS,
               dvae_weights: str = "", dvae_n_hid: int = 0):
  """The run config of one (arm, seed); `steps` > 0 overrides total_steps."""
  from configs import simla as simla_config
  if arm not in ARMS:
    raise ValueError(f"claims: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
  a = ARMS[arm]
  c = simla_config.get_config(a.variant)
  default_weights = dict(c.loss_weights)
  c.loss_weights.update({k: float(default_weights[k]) if k in a.losses else 0.0
                         for k in LOSSES})
  c.seed = int(seed)
  if steps:
    c.total_steps = int(steps)
  c.eval_every_steps = max(1, c.total_steps // evals)
  c.checkpoint_every_steps = c.eval_every_steps
  # The strict split (every object an unseen colour-shape pair) at the size of the others.
  c.data.shapes.strict_size = c.data.shapes.comp_size
  c.eval.splits = ("val", "test", "comp", "strict")
  c.progress_bar = False
  if a.mim_target == "dvae":
    if not dvae_weights:
      raise ValueError("claims: the dvae arm needs dvae_weights (a random-weight .npz is "
                       "written by the study when none is given)")
    m = c.data.mim
    m.target = "dvae"
    m.dvae_image_size = c.data.image_size // 2       # the official half-resolution view
    m.dvae_weights = dvae_weights
    if dvae_n_hid:
      m.dvae_n_hid = int(dvae_n_hid)
  return c


def step_flops(config) -> float:
  """XLA-counted FLOPs of one train step (cost analysis of the lowered program, one device;
  an MLM `lax.cond` may count both branches)."""
  import flax.linen as nn
  import jax
  from simla_jax import train as simla_train
  task = simla_train.make_task(config, mesh=None)
  state = jax.eval_shape(lambda k: nn.meta.unbox(task.init(k)), jax.random.key(0))
  batch = next(task.train_data)
  cost = jax.jit(task.train_step).lower(state, batch).cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


# --------------------------------------------------------------------------- one run
class _Clock:
  """Wall and process-CPU seconds of training: stopped while evaluating."""

  def __init__(self, wall0: float = 0.0, cpu0: float = 0.0):
    self.wall, self.cpu = wall0, cpu0
    self._t = (time.monotonic(), time.process_time())

  def stop(self):
    self.wall += time.monotonic() - self._t[0]
    self.cpu += time.process_time() - self._t[1]

  def start(self):
    self._t = (time.monotonic(), time.process_time())


def run_one(arm: str, seed: int, out: str, *, steps: int = 0, evals: int = EVALS,
            dvae_weights: str = "", dvae_n_hid: int = 0) -> dict:
  """Trains one (arm, seed) into <out>/<arm>/seed<seed>, writes its result.json."""
  import jax
  from simla_jax import train as simla_train
  from train_jax import loop

  workdir = run_dir(out, arm, seed)
  os.makedirs(workdir, exist_ok=True)
  config = arm_config(arm, seed, steps=steps, evals=evals, dvae_weights=dvae_weights,
                      dvae_n_hid=dvae_n_hid)
  # As run.py's: the fine-tuning configs read the network from it (`init.checkpoint`).
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  flops_path = os.path.join(out, arm, "flops.json")
  if not os.path.exists(flops_path):
    with open(flops_path, "w") as f:
      json.dump({"flops_per_step": step_flops(config)}, f)
  with open(flops_path) as f:
    flops = json.load(f)["flops_per_step"]
  curve_path = os.path.join(workdir, "curve.jsonl")
  done = []
  if os.path.exists(curve_path):
    # Rewritten without a torn last line (a run killed mid-write), which the next
    # evaluation's append would otherwise fuse with its own line.
    done = metrics_lib.read_jsonl(curve_path, torn_tail_ok=True)
    metrics_lib.write_jsonl(curve_path, done)
  clock = _Clock(done[-1]["train_wall_s"] if done else 0.0,
                 done[-1]["train_cpu_s"] if done else 0.0)

  def make_task(cfg, mesh):
    task = simla_train.make_task(cfg, mesh)

    def evaluate(state):
      clock.stop()
      step = int(jax.device_get(state.step))
      scores = task.evaluate(state)
      point = dict(step=step, flops=flops * step, train_wall_s=clock.wall,
                   train_cpu_s=clock.cpu, **{k: float(v) for k, v in scores.items()})
      with open(curve_path, "a") as f:
        f.write(json.dumps(point) + "\n")
      clock.start()
      return scores
    # No retrieval grid / loss plot: the study draws its own figures.
    return dataclasses.replace(task, evaluate=evaluate, finish=None)

  loop.train_and_evaluate(config, workdir, make_task)
  # A run stopped between an evaluation and its checkpoint evaluates that step again.
  by_step = {p["step"]: p for p in metrics_lib.read_jsonl(curve_path)}
  curve = [by_step[s] for s in sorted(by_step)]
  result = dict(arm=arm, seed=seed, steps=int(config.total_steps), flops_per_step=flops,
                final={k: v for k, v in curve[-1].items()}, curve=curve,
                mim_target=config.data.mim.target,
                dvae_weights=config.data.mim.dvae_weights if arm == "dvae" else "")
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def run_dir(out: str, arm: str, seed: int) -> str:
  return os.path.join(out, arm, f"seed{seed}")


def pending_runs(out: str, arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
  """The (arm, seed) runs of the request that have no result.json yet, arm-major."""
  return [(a, s) for a in arms for s in seeds
          if not os.path.exists(os.path.join(run_dir(out, a, s), "result.json"))]


def load_results(out: str) -> dict[str, dict[int, dict]]:
  """{arm: {seed: result}} of every finished run under `out`."""
  results: dict[str, dict[int, dict]] = {}
  for arm in ARMS:
    d = os.path.join(out, arm)
    if not os.path.isdir(d):
      continue
    for name in sorted(os.listdir(d)):
      path = os.path.join(d, name, "result.json")
      if name.startswith("seed") and os.path.exists(path):
        with open(path) as f:
          r = json.load(f)
        for task, file in DOWNSTREAM.items():     # blank in the report when absent
          if os.path.exists(os.path.join(d, name, file)):
            with open(os.path.join(d, name, file)) as f:
              r[task] = json.load(f)
        results.setdefault(arm, {})[int(r["seed"])] = r
  return results


def launch(out: str, arm: str, seed: int, args) -> dict:
  """One run in a subprocess (a fresh process per run: memory and compile caches do not
  pile up); returns its wall and CPU seconds (user + sys of the child)."""
  cmd = [sys.executable, "-m", "simla_jax.experiments.claims", f"--out={out}",
         f"--run_one={arm}", f"--seeds={seed}", f"--steps={args.steps}", f"--evals={args.evals}",
         f"--dvae_weights={args.dvae_weights}", f"--dvae_n_hid={args.dvae_n_hid}"]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.monotonic()
  log = os.path.join(out, arm, f"seed{seed}.log")
  with open(log, "a") as f:
    code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if code:
    raise RuntimeError(f"claims: run {arm} seed {seed} failed (exit {code}); see {log}")
  timing = dict(wall_s=time.monotonic() - t0,
                cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                loadavg=open("/proc/loadavg").read().split()[:3]
                if os.path.exists("/proc/loadavg") else [])
  path = os.path.join(run_dir(out, arm, seed), "result.json")
  with open(path) as f:
    result = json.load(f)
  result["process"] = timing
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return result


# --------------------------------------------------------------------------- downstream
DOWNSTREAM = {"grounding": "grounding0shot.json", "ve": "ve.json"}   # cached in the run dir
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def downstream_dir(out: str, arm: str, seed: int, root: str = "") -> str:
  """The fine-tuning workdirs of one run, under `root` (default <out>/downstream): kept
  apart from the run dir, which only gains the cached result files."""
  return os.path.join(root or os.path.join(out, "downstream"), arm, f"seed{seed}")


def init_workdir(out: str, arm: str, seed: int, result: Mapping[str, Any],
                 root: str = "") -> str:
  """A pretraining workdir the fine-tuning configs read as `init.checkpoint`: the run dir
  when it has a config.json (`run_one` writes one), else <downstream>/init holding the run's
  config (`arm_config`: the same network) and a link to the run's checkpoints."""
  rd = run_dir(out, arm, seed)
  if os.path.exists(os.path.join(rd, "config.json")):
    return rd
  init = os.path.join(downstream_dir(out, arm, seed, root), "init")
  os.makedirs(init, exist_ok=True)
  with open(os.path.join(init, "config.json"), "w") as f:
    f.write(arm_config(arm, seed, steps=int(result["steps"]),
                       dvae_weights=result.get("dvae_weights") or "").to_json_best_effort(indent=2))
  link = os.path.join(init, "checkpoints")
  if not os.path.islink(link):
    os.symlink(os.path.abspath(os.path.join(rd, "checkpoints")), link)
  return init


def downstream_command(task: str, init: str, workdir: str) -> list[str]:
  """run.py on the task's config from checkpoint `init`. grounding: zero-shot (eval_only),
  every BERT layer and ViT block scored on val and test; ve: the VE config's recipe."""
  if task == "grounding":
    flags = ["--config=configs/simla_grounding.py", "--config.eval_only=True",
             "--config.grounding.all_layers=True", "--config.grounding.also_itc=True",
             "--config.grounding.heatmaps=0"]
  elif task == "ve":
    flags = ["--config=configs/simla_ve.py", "--config.progress_bar=False"]
  else:
    raise ValueError(f"claims: unknown downstream task {task!r}; choose from "
                     f"{', '.join(DOWNSTREAM)}")
  return [sys.executable, os.path.join(REPO, "run.py"), *flags,
          f"--config.init.checkpoint={os.path.abspath(init)}",
          f"--workdir={os.path.abspath(workdir)}"]


def select_layer(metrics: Mapping[str, float], mode: str) -> dict:
  """The `mode` (itm / itc) layer with the highest val accuracy among the scored
  `val_<mode><k>_acc` (ALBEF's itm: its fusion layers only; ties go to the deeper layer,
  the configs' default being the last), and its test accuracy: test is read at that
  choice only."""
  pattern = re.compile(rf"val_{mode}(\d+)_acc")
  layers = sorted(int(m.group(1)) for k in metrics if (m := pattern.fullmatch(k)))
  if not layers:
    raise ValueError(f"claims: no val_{mode}<k>_acc in the grounding metrics (run with "
                     f"grounding.all_layers=True)")
  best = max(layers, key=lambda k: (metrics[f"val_{mode}{k}_acc"], k))
  return dict(layer=best, val_acc=float(metrics[f"val_{mode}{best}_acc"]),
              test_acc=float(metrics[f"test_{mode}{best}_acc"]), layers=layers)


def grounding_summary(metrics: Mapping[str, float], step: int) -> dict:
  """grounding0shot.json: both modes' val-chosen layer and test accuracy, the box
  baselines, every metric of the evaluation."""
  return dict(step=int(step), itm=select_layer(metrics, "itm"),
              itc=select_layer(metrics, "itc"),
              test_largest_acc=float(metrics["test_largest_acc"]),
              test_random_acc=float(metrics["test_random_acc"]), metrics=dict(metrics))


def eval_metrics(row: Mapping[str, Any]) -> dict[str, float]:
  """The evaluation entries of a metrics.jsonl row, without their "eval/" prefix."""
  return {k.removeprefix("eval/"): float(v) for k, v in row.items() if k.startswith("eval/")}


def ve_summary(rows: Sequence[Mapping[str, Any]]) -> dict:
  """ve.json: accuracy at the last step (the test split is scored there only)."""
  final = [r for r in rows if "eval/test_acc" in r]
  if not final:
    raise ValueError("claims: the VE run has no eval/test_acc (did it reach total_steps?)")
  last = final[-1]
  metrics = eval_metrics(last)
  return dict(step=int(last["step"]), test_acc=metrics["test_acc"],
              val_acc=metrics.get("val_acc", math.nan),
              test_majority_acc=metrics.get("test_majority_acc", math.nan), metrics=metrics)


def run_downstream(out: str, arm: str, seed: int, task: str, result: Mapping[str, Any],
                   root: str = "") -> dict:
  """Task `task` from the checkpoint of a finished run, in a subprocess (workdir under
  `downstream_dir`); its summary is cached in <run dir>/<DOWNSTREAM[task]> (returned as is
  when present; an interrupted VE run resumes from its workdir's checkpoint)."""
  path = os.path.join(run_dir(out, arm, seed), DOWNSTREAM[task])
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  init = init_workdir(out, arm, seed, result, root)
  workdir = os.path.join(downstream_dir(out, arm, seed, root), task)
  os.makedirs(workdir, exist_ok=True)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.monotonic()
  log = os.path.join(downstream_dir(out, arm, seed, root), f"{task}.log")
  with open(log, "a") as f:
    code = subprocess.call(downstream_command(task, init, workdir), stdout=f,
                           stderr=subprocess.STDOUT, cwd=REPO)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if code:
    raise RuntimeError(f"claims: {task} of {arm} seed {seed} failed (exit {code}); see {log}")
  rows = metrics_lib.read_metrics(workdir)
  if task == "grounding":
    last = [r for r in rows if any(k.startswith("eval/") for k in r)][-1]
    summary = grounding_summary(eval_metrics(last), last["step"])
  else:
    summary = ve_summary(rows)
  summary["process"] = dict(
      wall_s=time.monotonic() - t0,
      cpu_s=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
      loadavg=open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg")
      else [])
  with open(path, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def downstream_all(out: str, arms: Sequence[str], seeds: Sequence[int],
                   tasks: Sequence[str], root: str = "") -> None:
  """`run_downstream` of every task for the finished runs of the request, one at a time
  (workdirs under `root`, default <out>/downstream)."""
  unknown = [t for t in tasks if t not in DOWNSTREAM]
  if unknown:
    raise ValueError(f"claims: unknown downstream tasks {unknown}; choose from "
                     f"{list(DOWNSTREAM)}")
  for arm in arms:
    for seed in seeds:
      path = os.path.join(run_dir(out, arm, seed), "result.json")
      if not os.path.exists(path):
        continue
      with open(path) as f:
        result = json.load(f)
      for task in tasks:
        if os.path.exists(os.path.join(run_dir(out, arm, seed), DOWNSTREAM[task])):
          continue
        print(f"claims: {task} of {arm} seed {seed} ...", flush=True)
        d = run_downstream(out, arm, seed, task, result, root)
        acc = (f"itm layer {d['itm']['layer']} test {d['itm']['test_acc']:.1f} %, itc block "
               f"{d['itc']['layer']} test {d['itc']['test_acc']:.1f} %" if task == "grounding"
               else f"test {d['test_acc']:.1f} %")
        print(f"claims: {task} of {arm} seed {seed}: {acc}, {d['process']['wall_s']:.0f} s "
              f"wall, {d['process']['cpu_s']:.0f} CPU s", flush=True)


# --------------------------------------------------------------------------- report
def same_budget(a: Mapping[int, dict], b: Mapping[int, dict]) -> tuple[dict, dict]:
  """The runs of two arms restricted to the seeds both ran with the same total_steps: only
  those are paired."""
  seeds = {s for s in set(a) & set(b) if a[s]["steps"] == b[s]["steps"]}
  return {s: a[s] for s in seeds}, {s: b[s] for s in seeds}


def _diffs(a: Mapping[int, dict], b: Mapping[int, dict], value) -> np.ndarray:
  """Paired differences of `value(run)` (a - b) over the seeds both arms ran with the same
  budget and both have a value for (not nan)."""
  a, b = same_budget(a, b)
  values = lambda runs: {s: v for s, r in runs.items() if not math.isnan(v := value(r))}
  return stats.paired_differences(values(a), values(b))


def _test_diffs(a: Mapping[int, dict], b: Mapping[int, dict]):
  return _diffs(a, b, lambda r: r1(r["final"], "test"))


def _delta(arm: str, runs: Mapping[int, dict], ref: Mapping[int, dict] | None, value) -> str:
  """"mean ± std (verdict)" of the paired differences vs SIMLA, "–" when there are none."""
  if ref is None or arm == "simla":
    return "–"
  d = _diffs(runs, ref, value)
  return f"{stats.fmt(*stats.mean_std(d))} ({stats.verdict(d)})" if d.size else "–"


def _arm_row(arm: str, runs: Mapping[int, dict], ref: Mapping[int, dict] | None) -> list[str]:
  finals = {s: r["final"] for s, r in runs.items()}
  cell = lambda f: stats.fmt(*stats.mean_std([f(m) for m in finals.values()]))
  delta = _delta(arm, runs, ref, lambda r: r1(r["final"], "test"))
  runs_ = list(runs.values())
  gflops = runs_[0]["flops_per_step"] / 1e9
  wall = stats.fmt(*stats.mean_std([r["final"]["train_wall_s"] for r in runs_]), digits=0)
  label = ARMS[arm].label
  if arm == "dvae" and not all(r.get("dvae_weights_official") for r in runs_):
    label += " (random-weight dVAE)"
  return [label, ",".join(str(s) for s in sorted(runs)), str(runs_[0]["steps"]),
          cell(lambda m: m.get("test_tr_r1", math.nan)),
          cell(lambda m: m.get("test_ir_r1", math.nan)), cell(lambda m: r1(m, "test")), delta,
          cell(lambda m: r1(m, "comp")), cell(lambda m: r1(m, "strict")),
          cell(lambda m: r1(m, "val")),
          cell(lambda m: r1(m, "test", itc_only=True)), f"{gflops:.1f}", wall]


def claim_verdicts(results: Mapping[str, Mapping[int, dict]]) -> dict[str, str]:
  """The three claims' verdicts (reading rules in the module docstring)."""
  steps = []
  for prev, nxt in zip(ABLATION[:-1], ABLATION[1:]):
    if prev in results and nxt in results:
      d = _test_diffs(results[nxt], results[prev])
      if d.size:
        steps.append(stats.verdict(d))
  out = {"1": stats.ordered_verdict(steps), "2": "not run", "3": "not run"}
  if steps and len(steps) < len(ABLATION) - 1:
    out["1"] += " (partial: not every step was run)"
  if "simla" in results and "albef" in results:
    simla, albef = same_budget(results["simla"], results["albef"])
    d = _test_diffs(simla, albef)
    if d.size:
      out["2"] = stats.pair_verdict(stats.verdict(d))
    with_r1 = lambda runs: {s: dict(r, curve=[dict(p, r1=r1(p, "test")) for p in r["curve"]])
                            for s, r in runs.items()}
    x, d = stats.matched_compute(with_r1(simla), with_r1(albef), "flops", "r1")
    if d.size:
      out["3"] = (f"{stats.pair_verdict(stats.verdict(d))}: at {x / 1e12:.1f} TFLOPs, "
                  f"SIMLA - ALBEF = {stats.fmt(*stats.mean_std(d))} R@1 points")
  return out


HEADER = ["arm", "seeds", "steps", "test TR R@1", "test IR R@1", "test R@1",
          "Δ test R@1 vs SIMLA (paired)", "comp R@1", "strict R@1", "val R@1", "ITC-only test R@1",
          "GFLOPs / step", "train wall s"]


def downstream_value(task: str, key: str):
  """run -> a downstream accuracy (nan when the run has no such result): key "itm" / "itc"
  (grounding, test at the val-chosen layer) or "test_acc" (ve)."""
  def value(r: Mapping[str, Any]) -> float:
    d = r.get(task)
    if not d:
      return math.nan
    return float(d[key]["test_acc"] if task == "grounding" else d[key])
  return value


DOWNSTREAM_HEADER = ["arm", "grounding seeds", "grounding ITM test acc",
                     "ITM layer (val-chosen, per seed)", "Δ ITM vs SIMLA (paired)",
                     "grounding ITC test acc", "ITC block (val-chosen, per seed)",
                     "Δ ITC vs SIMLA (paired)", "VE seeds", "VE test acc",
                     "Δ VE vs SIMLA (paired)"]


def _downstream_row(arm: str, runs: Mapping[int, dict], ref: Mapping[int, dict] | None):
  grounded = {s: r for s, r in sorted(runs.items()) if r.get("grounding")}
  ve = {s: r for s, r in sorted(runs.items()) if r.get("ve")}
  seeds = lambda rs: ",".join(str(s) for s in rs) or "–"
  cells = [ARMS[arm].label, seeds(grounded)]
  for mode in ("itm", "itc"):
    value = downstream_value("grounding", mode)
    cells += [stats.fmt(*stats.mean_std([value(r) for r in grounded.values()])),
              ",".join(str(r["grounding"][mode]["layer"]) for r in grounded.values()) or "–",
              _delta(arm, runs, ref, value)]
  value = downstream_value("ve", "test_acc")
  cells += [seeds(ve), stats.fmt(*stats.mean_std([value(r) for r in ve.values()])),
            _delta(arm, runs, ref, value)]
  return cells


def downstream_report(results: Mapping[str, Mapping[int, dict]]) -> list[str]:
  """The downstream table (every arm; "–" where a run has no downstream result), the
  grounding box baselines and the reading note."""
  ref = results.get("simla")
  lines = ["| " + " | ".join(DOWNSTREAM_HEADER) + " |", "|" + "---|" * len(DOWNSTREAM_HEADER)]
  for arm in ARMS:
    if arm in results:
      lines.append("| " + " | ".join(_downstream_row(arm, results[arm], ref)) + " |")
  grounded = [r["grounding"] for runs in results.values() for r in runs.values()
              if r.get("grounding")]
  lines.append("")
  if grounded:
    lines.append(f"Grounding test baselines: a random proposal "
                 f"{grounded[0]['test_random_acc']:.1f} %, the largest proposal "
                 f"{grounded[0]['test_largest_acc']:.1f} %.")
  lines.append(
      "Reading note: the claims' verdicts stay on test R@1 (the rule was fixed before the "
      "numbers); the downstream columns are reported with their paired differences vs "
      "SIMLA (same 2-standard-error rule) and decide no claim. Grounding: zero-shot Grad-CAM "
      "(`configs/simla_grounding.py`, `eval_only`) from each run's final checkpoint, the ITM "
      "layer (ALBEF: its fusion layers, the only ones with cross-attention) and the ITC "
      "block chosen on val per run, test read at that choice. VE: `configs/simla_ve.py` "
      "fine-tuning from each run's checkpoint, test accuracy at the last step.")
  return lines


def report(results: Mapping[str, Mapping[int, dict]]) -> str:
  """The markdown table, the verdicts and the downstream table."""
  ref = results.get("simla")
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for arm in ARMS:
    if arm in results:
      lines.append("| " + " | ".join(_arm_row(arm, results[arm], ref)) + " |")
  v = claim_verdicts(results)
  lines += ["", f"- Claim 1 (every added objective helps): **{v['1']}**.",
            f"- Claim 2 (SIMLA beats ALBEF at the same data and steps): **{v['2']}**.",
            f"- Claim 3 (higher zero-shot R@1 per unit of training compute): **{v['3']}**.",
            "", "Downstream (zero-shot grounding; visual entailment when run):", ""]
  lines += downstream_report(results)
  return "\n".join(lines) + "\n"


def plots(results: Mapping[str, Mapping[int, dict]], out: str) -> list[str]:
  """ablation.png (test / comp R@1 per arm, mean ± std) and compute.png (test R@1 against
  train-step FLOPs and wall seconds, SIMLA and ALBEF, one line per seed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  arms = [a for a in ARMS if a in results]
  if arms:
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for j, split in enumerate(("test", "comp", "strict")):
      ms = [stats.mean_std([r1(r["final"], split) for r in results[a].values()]) for a in arms]
      ax.bar([i + 0.27 * j for i in range(len(arms))], [m for m, _ in ms], width=0.27,
             yerr=[0 if math.isnan(s) else s for _, s in ms], label=split, capsize=3)
    ax.set_xticks([i + 0.27 for i in range(len(arms))])
    ax.set_xticklabels([ARMS[a].label for a in arms], rotation=20, fontsize=8)
    ax.set_ylabel("zero-shot R@1 (mean TR, IR), %")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(os.path.join(out, "ablation.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  curves = [a for a in ("simla", "albef") if a in results]
  if curves:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, color in zip(curves, ("C0", "C1")):
      for i, r in enumerate(results[arm].values()):
        pts = [(p["flops"] / 1e12, p["train_wall_s"], r1(p, "test")) for p in r["curve"]]
        for ax, k in zip(axes, (0, 1)):
          ax.plot([p[k] for p in pts], [p[2] for p in pts], "o-", color=color,
                  label=ARMS[arm].label if i == 0 else None, alpha=0.8)
    axes[0].set_xlabel("training compute, XLA-counted TFLOPs")
    axes[1].set_xlabel("training wall seconds (shared 2-core CPU)")
    for ax in axes:
      ax.set_ylabel("test R@1, %")
      ax.grid(alpha=0.3)
      ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "compute.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/claims")
  p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated of {list(ARMS)}")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=0, help="> 0: total_steps of every run")
  p.add_argument("--evals", type=int, default=EVALS, help="evaluations per run")
  p.add_argument("--dvae_weights", default="", help="official dVAE encoder; '' = random")
  p.add_argument("--dvae_n_hid", type=int, default=64,
                 help="width of the random-weight dVAE (official 256; ignored with weights)")
  p.add_argument("--downstream", default="grounding",
                 help=f"comma-separated of {list(DOWNSTREAM)} run from each finished run's "
                      f"checkpoint ('' = none); grounding (zero-shot, ~15 CPU s a run) by "
                      f"default, ve (1,500 fine-tuning steps, ~350 CPU s a run) when asked")
  p.add_argument("--downstream_dir", default="",
                 help="workdirs of the downstream runs (default <out>/downstream)")
  p.add_argument("--report_only", action="store_true")
  p.add_argument("--downstream_only", action="store_true",
                 help="no training: the downstream tasks of the finished runs, then the report")
  p.add_argument("--readme", default="", help="README to update between the claims markers")
  p.add_argument("--figures", default="", help="directory of the PNGs (default: --out)")
  p.add_argument("--run_one", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
  tasks = [t for t in args.downstream.split(",") if t]
  if [t for t in tasks if t not in DOWNSTREAM]:
    p.error(f"--downstream {args.downstream!r}: choose from {list(DOWNSTREAM)}")
  os.makedirs(args.out, exist_ok=True)
  if args.run_one:
    from run import enable_compile_cache
    enable_compile_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "simla_face_jax_xla"), 0.5)
    run_one(args.run_one, seeds[0], args.out, steps=args.steps, evals=args.evals,
            dvae_weights=args.dvae_weights, dvae_n_hid=args.dvae_n_hid)
    return
  if not (args.report_only or args.downstream_only):
    if args.dvae_weights:          # official weights: the official width
      args.dvae_n_hid = 0
    elif "dvae" in arms:
      from simla_jax.experiments import random_dvae
      cfg = arm_config("simla", 0).data.mim
      cfg.dvae_n_hid = args.dvae_n_hid
      os.makedirs(os.path.join(args.out, "dvae"), exist_ok=True)
      args.dvae_weights = os.path.abspath(os.path.join(
          args.out, "dvae", f"random_dvae_nhid{args.dvae_n_hid}.npz"))
      if not os.path.exists(args.dvae_weights):
        random_dvae.write(args.dvae_weights, cfg)
      print(f"dvae arm: no --dvae_weights given, so a RANDOM-weight dVAE encoder "
            f"(n_hid {args.dvae_n_hid}) gives the MIM targets: {args.dvae_weights}", flush=True)
    for arm, seed in pending_runs(args.out, arms, seeds):
      os.makedirs(os.path.join(args.out, arm), exist_ok=True)
      print(f"claims: training {arm} seed {seed} ...", flush=True)
      r = launch(args.out, arm, seed, args)
      print(f"claims: {arm} seed {seed}: test R@1 {r1(r['final'], 'test'):.1f}, "
            f"{r['process']['wall_s']:.0f} s wall, {r['process']['cpu_s']:.0f} CPU s", flush=True)
  if not args.report_only:
    downstream_all(args.out, arms, seeds, tasks, args.downstream_dir)
  results = load_results(args.out)
  for arm, runs in results.items():   # official weights or not, for the table's label
    for r in runs.values():
      r["dvae_weights_official"] = bool(r.get("dvae_weights")) and \
          "random_dvae" not in os.path.basename(r["dvae_weights"])
  text = report(results)
  with open(os.path.join(args.out, "claims.md"), "w") as f:
    f.write(text)
  os.makedirs(args.figures or args.out, exist_ok=True)
  paths = plots(results, args.figures or args.out)
  print(text + "\n" + "\n".join(paths))
  if args.readme:
    readme_section.update_file(args.readme, "claims", text)


if __name__ == "__main__":
  main()
