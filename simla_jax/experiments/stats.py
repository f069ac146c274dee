"""Aggregation of a study's runs and the verdict rules, as pure functions.

A study's results are `{arm: {seed: run}}` where a run is the `result.json` of one training
run (see `claims.py`): `final` {metric: value} and `curve` [{step, flops, train_wall_s,
metric: value, ...}] of the evaluations during training.

The verdict rule, fixed before any number is read: a paired difference d (same seed,
arm minus reference) is
  "higher"        mean(d) > 0 and mean(d) > 2 standard errors (std(d) / sqrt(n), ddof 1);
  "lower"         mean(d) < 0 and -mean(d) > 2 standard errors;
  "within noise"  otherwise, with n >= 2 seeds;
  "1 seed"        n == 1: no spread to compare with, the sign alone is not a verdict.
"""

import math
from typing import Mapping, Sequence

import numpy as np

HIGHER, LOWER, NOISE, ONE_SEED = "higher", "lower", "within noise", "1 seed"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std with ddof 1); the std is nan for fewer than 2 values, both nan for none."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def paired_differences(arm: Mapping[int, float], reference: Mapping[int, float]) -> np.ndarray:
  """arm[seed] - reference[seed] over the seeds both have, in seed order."""
  seeds = sorted(set(arm) & set(reference))
  return np.array([arm[s] - reference[s] for s in seeds], np.float64)


def verdict(diffs: Sequence[float]) -> str:
  """The rule of the module docstring for paired differences `diffs`."""
  d = np.asarray(diffs, np.float64)
  if d.size == 0:
    raise ValueError("verdict: no paired runs (no seed common to both arms)")
  if d.size == 1:
    return ONE_SEED
  mean, std = mean_std(d)
  margin = 2.0 * std / math.sqrt(d.size)
  if mean > 0 and mean > margin:
    return HIGHER
  if mean < 0 and -mean > margin:
    return LOWER
  return NOISE


def per_seed(runs: Mapping[int, Mapping], metric: str) -> dict[int, float]:
  """{seed: final[metric]} over the runs that have the metric."""
  return {s: float(r["final"][metric]) for s, r in runs.items() if metric in r["final"]}


def value_at(curve: Sequence[Mapping], x_key: str, metric: str, x: float) -> float:
  """`metric` of a run's evaluation curve linearly interpolated at x (e.g. FLOPs); nan
  outside the evaluated range (no extrapolation)."""
  pts = sorted((float(p[x_key]), float(p[metric])) for p in curve if metric in p)
  if not pts or not pts[0][0] <= x <= pts[-1][0]:
    return math.nan
  xs, ys = zip(*pts)
  return float(np.interp(x, xs, ys))


def matched_compute(runs: Mapping[int, Mapping], reference: Mapping[int, Mapping], x_key: str,
                    metric: str) -> tuple[float, np.ndarray]:
  """Paired differences (arm - reference) of `metric` at equal compute `x_key`.

  Per seed, the compute is the smaller of the two runs' last evaluated compute (both runs
  reached it); each curve is interpolated there. Returns (mean of those computes,
  differences in seed order); a seed where either curve does not cover it is left out.
  """
  xs, diffs = [], []
  for seed in sorted(set(runs) & set(reference)):
    a, b = runs[seed]["curve"], reference[seed]["curve"]
    if not a or not b:
      continue
    x = min(max(float(p[x_key]) for p in a), max(float(p[x_key]) for p in b))
    va, vb = value_at(a, x_key, metric, x), value_at(b, x_key, metric, x)
    if not (math.isnan(va) or math.isnan(vb)):
      xs.append(x)
      diffs.append(va - vb)
  return (float(np.mean(xs)) if xs else math.nan), np.asarray(diffs, np.float64)


def ordered_verdict(steps: Sequence[str]) -> str:
  """Claim 1 from the verdicts of each added objective (previous arm -> next arm)."""
  if not steps:
    return "not run"
  if all(s == HIGHER for s in steps):
    return "holds"
  if any(s == LOWER for s in steps):
    return "does not hold (an added objective lowers R@1)"
  if any(s == ONE_SEED for s in steps):
    return "undecided (1 seed)"
  return "not shown at this scale (some steps within seed noise)"


def pair_verdict(v: str) -> str:
  """Claims 2 and 3 from the verdict of SIMLA minus ALBEF."""
  return {HIGHER: "holds", LOWER: "does not hold (ALBEF higher)",
          NOISE: "not shown at this scale (within seed noise)",
          ONE_SEED: "undecided (1 seed)"}[v]


def fmt(mean: float, std: float, digits: int = 1) -> str:
  """"12.3 ± 0.4"; the std left out when it is nan (1 seed), "–" when nothing was run."""
  if math.isnan(mean):
    return "–"
  return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
