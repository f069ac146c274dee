"""Worst-group study: a positive control of hand-set margins, then the arms, paired by seed.

  # 1. the gate: hand-set margins against CosFace, seed by seed
  python -m face_jax.experiments.bias_study --stage=control --seeds=0,1,2,3,4 --results=R
  # 2. the arms (CosFace, ArcFace, baselines, MvCoM and its ablations)
  python -m face_jax.experiments.bias_study --stage=study --seeds=0,1,2,3,4 --results=R
  # table, verdict and PNGs from what is in R (any subset of runs); --readme rewrites the
  # README's <!-- mvcom:begin --> ... <!-- mvcom:end --> section with them
  python -m face_jax.experiments.bias_study --stage=report --results=R [--out_dir=D --readme=README.md]
  # all three in one command (what the README's table comes from)
  python -m face_jax.experiments.bias_study --stage=all --world=nuisance --results=R --readme=README.md
  # no training: verification on the test images' latent identity codes (the ceiling)
  python -m face_jax.experiments.bias_study --stage=ceiling --seeds=0,1,2

Every run is one JSON in --results named <arm>_seed<s>.json and is skipped when present,
so a study can be resumed or grown. Each arm is configs/mvcom.py with the world variant
(--world, default nuisance) and the arm's changes; every run uses the task's own step and
evaluator (face_jax/steps.py, face_jax/evaluators.py), trains --steps steps from seed s
(world, init and sampling all from s) and evaluates the synthetic test pairs.

Reading rule, fixed before any number is read (also printed with the report):
  * Gate. A control setting passes when its worst-group accuracy minus CosFace's, seed by
    seed, is >= 2 points in magnitude with the same sign on every one of >= 3 seeds. Without
    a passing setting no margin method is judged: the world cannot show a margin effect.
  * MvCoM (oracle) vs CosFace, paired worst-group difference d over n >= 5 seeds, standard
    error se = std(d) / sqrt(n): "consistent with the paper" if mean(d) - 2 se > 0;
    "not consistent at this scale" if mean(d) + 2 se < 1 point; otherwise "inconclusive".
"""

import argparse
import ast
import glob
import json
import os
import time

import jax
import numpy as np

from configs import mvcom as mvcom_config
from face_jax import evaluate as evaluate_lib
from face_jax import mvcom
from face_jax import train
from face_jax.data import synthetic
from train_jax import optimizers
from train_jax import readme_section
from train_jax import sharding

GATE_POINTS, GATE_SEEDS, VERDICT_SEEDS = 2.0, 3, 5

# Positive control: hand-set margin offsets (config.fixed_margins) per group, per
# variation and per class (LDAM's n^(-1/4) prior, rarest class +1), positive and negative.
CONTROL = {
    "minority+": {"group": (0.0, 0.15, 0.3)},
    "minority++": {"group": (0.0, 0.3, 0.6)},     # minority margins 0.65 / 0.95 (m0 0.35)
    "minority-": {"group": (0.0, -0.15, -0.3)},
    "minority--": {"group": (0.0, -0.25, -0.5)},   # minority margins 0.1 / -0.15 (m0 0.35)
    "minority---": {"group": (0.0, -0.35, -0.7)},  # minority margins 0 / -0.35
    "majority-": {"group": (-0.2, 0.0, 0.0)},
    "variations+": {"occlusion": 0.2, "blur": 0.2},
    "variations-": {"occlusion": -0.2, "blur": -0.2},
    "rare+": {"class_prior": 0.3},                # the rarest identity +0.3, common ones below 0
    "rare-": {"class_prior": -0.3},
}


def _fixed(offsets):
  def apply(c, _):
    c.method = "fixed_margins"
    c.fixed_margins.update(offsets)
  return apply


def _mvcom_frozen(c, context):
  """MvCoM's final margins of the same seed, fixed from step 0 (needs that run)."""
  margins = context["mvcom"]["margins"]
  c.mvcom.frozen = True
  bound, cb = c.mvcom.bound, c.mvcom.class_bound
  clip = lambda v, b: tuple(float(np.clip(x, -0.999 * b, 0.999 * b)) for x in np.ravel(v))
  c.mvcom.init_offsets = tuple((k, clip(v, cb if k == "class" else bound)) for k, v in margins.items())


def _unbalanced_meta(c, _):
  """The meta set with the training group mix instead of balanced groups."""
  total = c.data.meta_ids_per_group * len(c.data.group_fractions)
  c.data.meta_ids_by_group = tuple(max(1, int(round(f * total))) for f in c.data.group_fractions)


# An arm: configs/mvcom.py variants (a string) applied after the world, or a function
# (config, {arm: result of this seed}) -> None that edits the config.
ARMS = {
    "cosface": "cosface",
    "arcface": "arcface",
    "fixed_best": None,              # the best passing control setting (set in main)
    "balanced": "balanced",
    "ldam": "ldam",
    "l2rw": "l2rw",
    "mvcom": "",
    "mvcom_predicted": "predicted",
    "mvcom_prototype": "prototype",
    "mvcom_frozen": _mvcom_frozen,
    "mvcom_unbalanced_meta": _unbalanced_meta,
    "mvcom_shuffled": lambda c, _: c.mvcom.update(shuffle_attributes=True),
    "mvcom_group_only": lambda c, _: c.mvcom.update(factors=(("group", len(c.data.group_fractions)),)),
}
CONTROL_ARMS = {f"fixed[{k}]": _fixed(v) for k, v in CONTROL.items()}


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


def make_config(arm: str, seed: int, world: str, steps: int, overrides=(), context=None):
  apply = {**ARMS, **CONTROL_ARMS}[arm]
  if apply is None:
    raise ValueError(f"arm {arm!r} needs --fixed_best or a passing control")
  config = mvcom_config.get_config(f"{world},{apply}" if isinstance(apply, str) else world)
  if not isinstance(apply, str):
    apply(config, context or {})
  config.seed = seed
  if steps:
    config.total_steps = steps
  for o in overrides:
    _override(config, o)
  return config


def run_arm(arm: str, config, log_every: int = 25, verbose: bool = True) -> dict:
  """Trains one arm; returns scores, margins, per-group diagnostics over time and timings."""
  seed, steps = config.seed, config.total_steps
  t_start, c_start = time.time(), time.process_time()
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optimizers.make_optimizer(config.optimizer, config.total_steps)
  task = train.make_task_with(config, tx, schedule)
  state, shardings = sharding.sharded_init(task.init, mesh, config.axis_rules, jax.random.key(seed))
  step_fn = jax.jit(task.train_step, out_shardings=(shardings, None), donate_argnums=(0,))
  history = []
  with jax.set_mesh(mesh):
    t_train = time.time()
    for i in range(steps):
      batch = sharding.global_batch(next(task.train_data), mesh)
      state, metrics = step_fn(state, batch)
      if (i + 1) % log_every == 0 or i + 1 == steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        history.append({"step": i + 1, **m})
        if verbose and (i + 1) % max(steps // 4, 1) == 0:
          met = " ".join(f"{m[k]:.2f}" for k in sorted(m) if k.startswith("margin_met_group"))
          print(f"  [{arm} seed {seed}] step {i + 1}: loss {m['loss']:.3f} acc {m['accuracy']:.3f} "
                f"margin met per group {met}", flush=True)
    jax.block_until_ready(state.params)
    t_train = time.time() - t_train
    t_eval = time.time()
    scores = task.evaluate(state)
    t_eval = time.time() - t_eval
  out = {"arm": arm, "seed": seed, "steps": steps, "scores": scores, "history": history,
         "similarity": pair_similarity(getattr(task.evaluate, "last_results", None) or {}),
         "train_s": t_train, "eval_s": t_eval, "wall_s": time.time() - t_start,
         "cpu_s": time.process_time() - c_start, "config": config.to_dict()}
  if "margin" in state.extras:
    out["margins"] = {k: v.tolist() for k, v in mvcom.factor_offsets(
        jax.device_get(state.extras["margin"]), config.mvcom.bound, config.mvcom.class_bound).items()}
  return out


def pair_similarity(results: dict) -> dict:
  """{cell: {genuine_mean, genuine_std, impostor_mean, impostor_std}} of the test pairs'
  cosine similarity (1 - squared distance / 2 of the normalised embeddings)."""
  out = {}
  for cell, r in results.items():
    cos = 1.0 - np.asarray(r["dist"]) / 2.0
    same = np.asarray(r["issame"], bool)
    out[cell] = {"genuine_mean": float(cos[same].mean()), "genuine_std": float(cos[same].std()),
                 "impostor_mean": float(cos[~same].mean()), "impostor_std": float(cos[~same].std())}
  return out


def code_ceiling(config) -> dict[str, float]:
  """{acc_<cell>: accuracy} of verification on the test images' latent identity codes
  (face_jax/data/synthetic.py latent_codes): the accuracy that identity alone allows
  before rendering and variations; a trained model far below it is learning-limited."""
  faces = synthetic.SyntheticFaces(config.data, config.seed)
  codes = faces.latent_codes("test", np.arange(faces.size("test")))
  return {f"acc_{name}": evaluate_lib.verification(codes[p.a], codes[p.b], p.issame,
                                                   n_folds=config.eval.n_folds)["accuracy"]
          for name, p in faces.test_pairs().items()}


# --- reading the results ------------------------------------------------------------------

def load_results(results_dir: str) -> list[dict]:
  out = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*_seed*.json"))):
    with open(path) as f:
      out.append(json.load(f))
  return out


def paired(results, arm: str, key: str = "acc_worst_group", base: str = "cosface") -> dict:
  """{seed: 100 * (arm - base)} over the seeds both ran."""
  ref = {r["seed"]: r["scores"][key] for r in results if r["arm"] == base}
  return {r["seed"]: 100 * (r["scores"][key] - ref[r["seed"]]) for r in results
          if r["arm"] == arm and r["seed"] in ref and key in r["scores"]}


def gate(results) -> dict:
  """{control arm: (passes, paired worst-group differences)}."""
  out = {}
  for arm in CONTROL_ARMS:
    d = np.array(list(paired(results, arm).values()))
    passes = bool(len(d) >= GATE_SEEDS and np.all(np.abs(d) >= GATE_POINTS)
                  and (np.all(d > 0) or np.all(d < 0)))
    if len(d):
      out[arm] = (passes, d)
  return out


def sample_std(v) -> float:
  """std over seeds with n - 1 (as the verdict's standard error); 0 for one seed."""
  v = np.asarray(v, dtype=float)
  return float(v.std(ddof=1)) if v.size > 1 else 0.0


def verdict(results, gates) -> str:
  if not any(p for p, _ in gates.values()):
    return ("NO VERDICT: no hand-set margin moved the worst group by >= "
            f"{GATE_POINTS:g} points with one sign on every one of >= {GATE_SEEDS} seeds, so this "
            "world cannot show a margin method's effect")
  d = np.array(list(paired(results, "mvcom").values()))
  if len(d) < VERDICT_SEEDS:
    return f"NO VERDICT YET: MvCoM and CosFace paired on {len(d)} seeds (< {VERDICT_SEEDS})"
  mean, se = d.mean(), sample_std(d) / np.sqrt(len(d))
  if mean - 2 * se > 0:
    word = "consistent with the paper (worst group up)"
  elif mean + 2 * se < 1.0:
    word = "not consistent with the paper at this scale"
  else:
    word = "inconclusive"
  return f"MvCoM - CosFace worst group {mean:+.2f} ± {se:.2f} (s.e., n={len(d)}): {word}"


def table(results: list[dict]) -> str:
  scores0 = results[0]["scores"]
  groups = sorted(c for c in scores0 if c.startswith("acc_group") and c[9:].isdigit())
  cols = groups + ["acc_worst_group", "group_gap", "acc_pose", "acc_occlusion", "acc_blur", "acc_clean"]
  short = {c: c.replace("acc_", "").replace("_group", "").replace("occlusion", "occl") for c in cols}
  lines = ["arm".ljust(30) + "".join(short[c].rjust(13) for c in cols)
           + "worst-CosFace".rjust(17) + "CPU s/run".rjust(11)]
  for arm in dict.fromkeys(r["arm"] for r in results):
    rs = [r for r in results if r["arm"] == arm]
    cells = []
    for c in cols:
      v = 100 * np.array([r["scores"].get(c, np.nan) for r in rs])
      cells.append(f"{v.mean():6.2f}±{sample_std(v):4.2f}".rjust(13))
    d = np.array(list(paired(results, arm).values())) if arm != "cosface" else np.array([])
    diff = f"{d.mean():+6.2f}±{sample_std(d):4.2f}" if len(d) else ""
    cpu = np.mean([r.get("cpu_s", np.nan) for r in rs])
    lines.append(f"{arm} (n={len(rs)})".ljust(30) + "".join(cells) + diff.rjust(17)
                 + f"{cpu:9.0f}".rjust(11))
  return "\n".join(lines)


def grid_table(results: list[dict]) -> str:
  """Group x variation cells: mean accuracy per arm, and the paired difference vs CosFace."""
  cells = sorted(c for c in results[0]["scores"] if c.startswith("acc_group") and "_" in c[9:]
                 and c[9:].split("_")[0].isdigit())
  if not cells:
    return ""
  lines = ["group x variation (accuracy %, mean over the arm's seeds; in brackets the mean "
           "paired difference vs CosFace over the seeds both ran)",
           "arm".ljust(30) + "".join(c[4:].rjust(18) for c in cells)]
  for arm in dict.fromkeys(r["arm"] for r in results):
    rs = [r for r in results if r["arm"] == arm]
    row = []
    for c in cells:
      v = 100 * np.mean([r["scores"][c] for r in rs])
      d = list(paired(results, arm, c).values()) if arm != "cosface" else []
      row.append((f"{v:6.2f}" + (f" ({np.mean(d):+.2f})" if d else "")).rjust(18))
    lines.append(arm.ljust(30) + "".join(row))
  return "\n".join(lines)


def plots(results: list[dict], gates: dict, out_dir: str) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  written = []
  if gates:   # the positive-control sweep, seed by seed
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (arm, (passes, d)) in enumerate(gates.items()):
      ax.scatter(np.full(len(d), k), d, color="C2" if passes else "C3", zorder=3)
      ax.bar(k, d.mean(), color="C2" if passes else "C7", alpha=0.4)
    ax.axhline(0, color="k", lw=0.5)
    for y in (GATE_POINTS, -GATE_POINTS):
      ax.axhline(y, color="k", ls=":", lw=0.8)
    ax.set_xticks(range(len(gates)), [a[6:-1] for a in gates], rotation=20, fontsize=8)
    ax.set_ylabel("worst group − CosFace (points)")
    ax.set_title("positive control: hand-set margins, paired by seed")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "control.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
  arms = list(dict.fromkeys(r["arm"] for r in results))
  groups = sorted(c for c in results[0]["scores"] if c.startswith("acc_group") and c[9:].isdigit())
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(arms)), 3.8))
  width = 0.8 / len(groups)
  for gi, g in enumerate(groups):
    means = [100 * np.mean([r["scores"][g] for r in results if r["arm"] == a]) for a in arms]
    stds = [100 * sample_std([r["scores"][g] for r in results if r["arm"] == a]) for a in arms]
    ax.bar(np.arange(len(arms)) + gi * width, means, width, yerr=stds, label=g[4:])
  ax.set_xticks(np.arange(len(arms)) + 0.4 - width / 2, arms, rotation=30, ha="right", fontsize=8)
  lo = min(100 * r["scores"]["acc_worst_group"] for r in results)
  ax.set_ylim(lo - 5, 100)
  ax.set_ylabel("verification accuracy (%)")
  ax.legend(fontsize=8)
  ax.set_title("per-group accuracy (mean ± std over seeds)")
  fig.tight_layout()
  written.append(os.path.join(out_dir, "groups.png"))
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)
  # Per group over training: the fraction meeting the margin (is it binding?), and the
  # learned margins of the MvCoM arms.
  def keys(r, prefix):
    return sorted(k for k in r["history"][-1] if k.startswith(prefix) and (
        prefix == "margin_met_group" or (k != "margin_mean" and not k.startswith("margin_met"))))

  seed0 = min(x["seed"] for x in results)
  for name, prefix in (("binding.png", "margin_met_group"), ("margins.png", "margin_")):
    runs = [r for r in results if r["seed"] == seed0 and r["history"] and keys(r, prefix)]
    if not runs:
      continue
    # One panel per arm (shared axes), one colour per group / factor across panels.
    binding = prefix == "margin_met_group"
    names = sorted({k for r in runs for k in keys(r, prefix)})
    cols = min(4, len(runs))
    rows = -(-len(runs) // cols)
    height = 2.2 * rows + 0.8
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, height), sharex=True,
                             sharey=True, squeeze=False)
    for ax, r in zip(axes.flat, runs):
      steps = [h["step"] for h in r["history"]]
      for k in keys(r, prefix):
        ax.plot(steps, [h.get(k, np.nan) for h in r["history"]], lw=1,
                color=f"C{names.index(k) % 10}")
      ax.axhline(0, color="k", lw=0.4)
      ax.set_title(r["arm"], fontsize=8)
      ax.tick_params(labelsize=7)
    for ax in axes.flat[len(runs):]:
      ax.axis("off")
    handles = [plt.Line2D([], [], color=f"C{i % 10}",
                          label=("group " if binding else "") + k[len(prefix):])
               for i, k in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 8), fontsize=7)
    fig.supxlabel("step", fontsize=8, y=0.4 / height)
    fig.supylabel("fraction meeting the margin" if binding else "margin offset", fontsize=8)
    fig.suptitle(f"seed {seed0}: " + ("margin binding per group" if binding
                                       else "learned margins (MvCoM arms)"), fontsize=9)
    fig.tight_layout(rect=(0, 0.55 / height, 1, 1))
    written.append(os.path.join(out_dir, name))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
  return written


def report(results: list[dict], out_dir: str = "", rule: bool = True) -> str:
  gates = gate(results)
  lines = [__doc__[__doc__.index("Reading rule"):].strip(), ""] if rule else []
  steps = sorted({r["steps"] for r in results})
  lines.append(f"{'/'.join(map(str, steps))} steps per run, accuracy in % (mean ± std over seeds, n - 1); "
               "worst-CosFace: paired by seed")
  lines.append(table(results))
  grid = grid_table(results)
  if grid:
    lines += ["", grid]
  lines.append("")
  for arm, (passes, d) in gates.items():
    lines.append(f"control {arm}: worst group - CosFace per seed "
                 + ", ".join(f"{x:+.2f}" for x in d) + ("  PASSES" if passes else "  fails"))
  lines.append(verdict(results, gates))
  if out_dir:
    lines.append("figures: " + ", ".join(plots(results, gates, out_dir)))
  return "\n".join(lines)


def best_control(results) -> dict:
  """The passing control setting with the largest mean worst-group gain (or None)."""
  gains = {arm: d.mean() for arm, (passes, d) in gate(results).items() if passes and d.mean() > 0}
  if not gains:
    return None
  return CONTROL[max(gains, key=gains.get)[len("fixed["):-1]]


def run_arms(arms, seeds, args) -> None:
  """Trains every (arm, seed) whose JSON is not in --results yet, seed by seed."""
  fixed = ast.literal_eval(args.fixed_best) if args.fixed_best else best_control(load_results(args.results))
  if fixed is not None:
    ARMS["fixed_best"] = _fixed(fixed)
  for seed in seeds:
    context = {}
    for arm in arms:
      path = os.path.join(args.results, f"{arm}_seed{seed}.json")
      if os.path.exists(path):
        with open(path) as f:
          context[arm] = json.load(f)
        continue
      if arm == "fixed_best" and ARMS["fixed_best"] is None:
        print("fixed_best skipped: no passing control setting and no --fixed_best", flush=True)
        continue
      if arm == "mvcom_frozen" and "mvcom" not in context:
        print(f"mvcom_frozen seed {seed} skipped: needs the mvcom run of that seed", flush=True)
        continue
      config = make_config(arm, seed, args.world, args.steps, args.override, context)
      r = run_arm(arm, config)
      context[arm] = r
      print(f"{arm} seed {seed}: worst group {100 * r['scores']['acc_worst_group']:.2f}, "
            f"gap {100 * r['scores']['group_gap']:.2f}, train {r['train_s']:.0f}s wall, "
            f"{r['cpu_s']:.0f}s CPU" + (f", margins {r['margins']}" if "margins" in r else ""),
            flush=True)
      with open(path + ".tmp", "w") as f:
        json.dump(r, f)
      os.replace(path + ".tmp", path)


def readme_body(results: list[dict], figures: list[str], readme: str) -> str:
  """The README's generated section: table, control sweep, verdict, links to the PNGs."""
  body = report(results, rule=False)               # the reading rule stays in the prose
  rel = os.path.dirname(os.path.abspath(readme))
  links = " · ".join(f"[{os.path.basename(p)}]({os.path.relpath(os.path.abspath(p), rel)})"
                     for p in figures)
  return f"```\n{body}\n```\n\nFigures: {links}\n" if links else f"```\n{body}\n```\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stage", choices=("all", "control", "study", "report", "ceiling"),
                      default="report", help="all: control, then study, then report")
  parser.add_argument("--arms", default="", help="comma-separated subset of the stage's arms")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--world", default="nuisance", help="configs/mvcom.py variant(s) of the world")
  parser.add_argument("--steps", type=int, default=0, help="0: the world's total_steps")
  parser.add_argument("--override", action="append", default=[],
                      help="config assignment applied to every arm, e.g. data.jitter=0.4")
  parser.add_argument("--fixed_best", default="", help="fixed_margins offsets as a Python dict; "
                      "default: the best passing control setting in --results")
  parser.add_argument("--results", default="runs/bias_study")
  parser.add_argument("--out_dir", default="", help="report: where the PNGs go (default --results)")
  parser.add_argument("--readme", default="", help="report: README whose <!-- mvcom:begin --> ... "
                      "<!-- mvcom:end --> section gets the table, verdict and figure links")
  args = parser.parse_args()
  os.makedirs(args.results, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  if args.stage == "ceiling":   # no training: the world's identity-code ceiling per seed
    for seed in seeds:
      acc = code_ceiling(make_config("cosface", seed, args.world, args.steps, args.override))
      print(f"seed {seed} code ceiling: " + ", ".join(
          f"{k[4:]} {100 * v:.2f}" for k, v in acc.items() if "_" not in k[4:]), flush=True)
    return
  stages = {"all": ("control", "study"), "report": ()}.get(args.stage, (args.stage,))
  for stage in stages:
    arms = list(CONTROL_ARMS) if stage == "control" else list(ARMS)
    arms = ["cosface", *[a for a in arms if a != "cosface"]]
    if args.arms:
      arms = args.arms.split(",")
      unknown = set(arms) - set(ARMS) - set(CONTROL_ARMS)
      if unknown:
        raise SystemExit(f"--arms: unknown {sorted(unknown)}; known: {[*ARMS, *CONTROL_ARMS]}")
    run_arms(arms, seeds, args)
  results = load_results(args.results)
  out_dir = args.out_dir or args.results
  print(report(results, out_dir))
  if args.readme:
    figures = sorted(glob.glob(os.path.join(out_dir, "*.png")))
    readme_section.update_file(args.readme, "mvcom", readme_body(results, figures, args.readme))


if __name__ == "__main__":
  main()
