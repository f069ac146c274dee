"""The study's aggregation and verdict rule on made-up runs."""

import math

import numpy as np
import pytest

from simla_jax.experiments import stats


def test_mean_std_is_the_sample_std():
  mean, std = stats.mean_std([1.0, 2.0, 6.0])
  assert mean == pytest.approx(3.0)
  assert std == pytest.approx(np.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
  m1, s1 = stats.mean_std([4.0])
  assert m1 == 4.0 and math.isnan(s1)
  assert all(math.isnan(v) for v in stats.mean_std([]))


def test_paired_differences_use_common_seeds_in_order():
  d = stats.paired_differences({0: 10.0, 1: 12.0, 2: 9.0}, {2: 8.0, 0: 7.0, 5: 1.0})
  np.testing.assert_array_equal(d, [3.0, 1.0])


@pytest.mark.parametrize("diffs,want", [
    ([3.0, 3.5, 2.5], stats.HIGHER),        # mean 3, se 0.29
    ([-3.0, -3.5, -2.5], stats.LOWER),
    ([3.0, -2.0, 1.0], stats.NOISE),        # mean 0.67, se 1.45
    ([0.0, 0.0], stats.NOISE),
    ([5.0], stats.ONE_SEED),
])
def test_verdict_rule(diffs, want):
  assert stats.verdict(diffs) == want


def test_verdict_needs_a_pair():
  with pytest.raises(ValueError, match="no paired runs"):
    stats.verdict([])


def test_value_at_interpolates_and_never_extrapolates():
  curve = [dict(flops=1.0, r1=10.0), dict(flops=3.0, r1=20.0)]
  assert stats.value_at(curve, "flops", "r1", 2.0) == pytest.approx(15.0)
  assert math.isnan(stats.value_at(curve, "flops", "r1", 4.0))
  assert math.isnan(stats.value_at(curve, "flops", "r1", 0.5))


def test_matched_compute_pairs_at_the_smaller_final_compute():
  # SIMLA costs 2 units a step, ALBEF 1: at ALBEF's final compute (4) SIMLA is halfway.
  simla = {s: dict(curve=[dict(flops=2.0 * k, r1=10.0 * k + s) for k in (1, 2, 3, 4)])
           for s in (0, 1)}
  albef = {s: dict(curve=[dict(flops=1.0 * k, r1=5.0 * k) for k in (1, 2, 3, 4)])
           for s in (0, 1, 2)}
  x, d = stats.matched_compute(simla, albef, "flops", "r1")
  assert x == 4.0
  np.testing.assert_allclose(d, [20.0 - 20.0, 21.0 - 20.0])


def test_claim_verdicts_from_steps():
  assert stats.ordered_verdict([stats.HIGHER] * 4) == "holds"
  assert stats.ordered_verdict([stats.HIGHER, stats.LOWER, stats.NOISE]).startswith("does not")
  assert stats.ordered_verdict([stats.HIGHER, stats.NOISE]).startswith("not shown")
  assert stats.ordered_verdict([stats.ONE_SEED] * 4).startswith("undecided")
  assert stats.pair_verdict(stats.LOWER).startswith("does not hold")


def test_fmt():
  assert stats.fmt(12.345, 0.44) == "12.3 ± 0.4"
  assert stats.fmt(12.345, math.nan) == "12.3"
  assert stats.fmt(math.nan, math.nan) == "–"
