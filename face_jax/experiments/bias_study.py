"""Worst-group study: arms (CosFace, MvCoM, baselines) x seeds, equal steps, one table.

  python -m face_jax.experiments.bias_study --arms=cosface,mvcom --seeds=0,1,2 \
      [--steps=400] [--override=data.jitter=0.4 ...] [--out=runs/bias_study.json]
  python -m face_jax.experiments.bias_study --table_from=a.json,b.json   # table only

Each arm is a variant of configs/mvcom.py ("mvcom" = the default); every run uses the
task's own train_step and evaluator (face_jax/steps.py, face_jax/evaluators.py), trains `steps` steps from seed s
(data world, init and sampling all from s) and evaluates the synthetic test pairs. The
table gives mean +- std over seeds of each group's accuracy, the worst group, the
max-min gap and the per-variation accuracies, plus wall time per run.
"""

import argparse
import ast
import json
import os
import time

import jax
import numpy as np

from configs import mvcom as mvcom_config
from face_jax import train
from train_jax import optimizers
from train_jax import sharding


def _override(config, assignment: str) -> None:
  key, _, value = assignment.partition("=")
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"--override: config has no key {key!r}")
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  node[leaf] = value


def run_arm(arm: str, seed: int, steps: int, overrides=(), verbose: bool = True) -> dict:
  """Trains one arm for `steps` steps with `seed`; returns scores, margins and timings."""
  config = mvcom_config.get_config("" if arm == "mvcom" else arm)
  config.seed = seed
  config.total_steps = steps
  for o in overrides:
    _override(config, o)
  t_start = time.time()
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  task = train.make_task_with(config, tx, schedule)
  state, shardings = sharding.sharded_init(task.init, mesh, config.axis_rules, jax.random.key(seed))
  step_fn = jax.jit(task.train_step, out_shardings=(shardings, None), donate_argnums=(0,))
  with jax.set_mesh(mesh):
    t_train = time.time()
    for i in range(steps):
      batch = sharding.global_batch(next(task.train_data), mesh)
      state, metrics = step_fn(state, batch)
      if verbose and (i + 1) % max(steps // 4, 1) == 0:
        m = jax.device_get(metrics)
        print(f"  [{arm} seed {seed}] step {i + 1}: loss {float(m['loss']):.3f} "
              f"acc {float(m['accuracy']):.3f}", flush=True)
    jax.block_until_ready(state.params)
    t_train = time.time() - t_train
    t_eval = time.time()
    scores = task.evaluate(state)
    t_eval = time.time() - t_eval
  out = {"arm": arm, "seed": seed, "steps": steps, "scores": scores,
         "train_s": t_train, "eval_s": t_eval, "wall_s": time.time() - t_start}
  if "margin" in state.extras:
    from face_jax import mvcom
    out["margins"] = {k: v.tolist() for k, v in mvcom.factor_offsets(
        jax.device_get(state.extras["margin"]), config.mvcom.bound, config.mvcom.class_bound).items()}
  return out


def table(results: list[dict]) -> str:
  cols = [c for c in results[0]["scores"] if c.startswith("acc_group") and c[9:].isdigit()]
  cols += ["acc_worst_group", "group_gap", "acc_pose", "acc_occlusion", "acc_blur", "acc_clean"]
  short = {c: c.replace("acc_", "").replace("_group", "").replace("occlusion", "occl") for c in cols}
  lines = ["arm".ljust(27) + "".join(short[c].rjust(13) for c in cols) + "train s/run".rjust(13)]
  for arm in dict.fromkeys(r["arm"] for r in results):
    rs = [r for r in results if r["arm"] == arm]
    cells = []
    for c in cols:
      v = 100 * np.array([r["scores"][c] for r in rs])
      cells.append(f"{v.mean():6.2f}±{v.std():4.2f}".rjust(13))
    t = np.array([r["train_s"] for r in rs])
    lines.append(f"{arm} (n={len(rs)})".ljust(27) + "".join(cells) + f"{t.mean():9.0f}".rjust(13))
  # Paired worst-group differences against the first arm, seed by seed.
  arms = list(dict.fromkeys(r["arm"] for r in results))
  base = {r["seed"]: r["scores"]["acc_worst_group"] for r in results if r["arm"] == arms[0]}
  for arm in arms[1:]:
    d = [100 * (r["scores"]["acc_worst_group"] - base[r["seed"]]) for r in results
         if r["arm"] == arm and r["seed"] in base]
    if d:
      lines.append(f"worst group, {arm} - {arms[0]} per seed: " + ", ".join(f"{x:+.2f}" for x in d)
                   + f"  (mean {np.mean(d):+.2f}, std {np.std(d):.2f})")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arms", default="cosface,mvcom")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--override", action="append", default=[],
                      help="config assignment applied to every arm, e.g. data.jitter=0.4")
  parser.add_argument("--out", default="runs/bias_study.json")
  parser.add_argument("--table_from", default="",
                      help="comma-separated result files of earlier runs: print their table")
  args = parser.parse_args()
  if args.table_from:
    runs = [json.load(open(p)) for p in args.table_from.split(",")]
    steps = {r["args"]["steps"] for r in runs}
    print(f"{'/'.join(map(str, sorted(steps)))} steps per run, accuracy in % (mean ± std over seeds)")
    print(table([r for run in runs for r in run["results"]]))
    return
  results = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    for arm in args.arms.split(","):
      r = run_arm(arm, seed, args.steps, args.override)
      results.append(r)
      print(f"{arm} seed {seed}: worst group {100 * r['scores']['acc_worst_group']:.2f}, "
            f"gap {100 * r['scores']['group_gap']:.2f}, train {r['train_s']:.0f}s, "
            f"eval {r['eval_s']:.0f}s" + (f", margins {r['margins']}" if "margins" in r else ""),
            flush=True)
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
  print(f"\n{args.steps} steps per run, accuracy in % (mean ± std over seeds)")
  print(table(results))


if __name__ == "__main__":
  main()
