"""labkit.core.frontier: per-user speed at matched aggregate throughput on hand-made frontiers (linear
between measured points, never extrapolated), the gain over a baseline where both frontiers reach, the
case where they never meet, and Eq. 1 as a per-user speed."""

from __future__ import annotations

import pytest

from labkit.core.errors import LabkitError
from labkit.core.frontier import (MatchedGain, best_gain, eq1_speed, frontier, frontiers, gain_at, matched_gains,
                                  overlap, speed_at)

# (aggregate throughput, per-user speed): throughput rises with load, per-user speed falls
BASE = [(40.0, 10.0), (10.0, 10.0), (20.0, 8.0)]  # unsorted on purpose
POLICY = [(15.0, 16.0), (30.0, 12.0), (60.0, 6.0)]


def test_frontier_sorts_by_throughput_and_drops_points_without_numbers():
    assert frontier(BASE + [(None, 3.0), (5.0, None), (float("nan"), 1.0)]) == [(10.0, 10.0), (20.0, 8.0), (40.0, 10.0)]
    assert frontiers({"b": BASE, "p": POLICY})["p"] == POLICY
    assert frontier([]) == []


def test_speed_is_linear_between_points_and_none_outside_the_measured_range():
    f = frontier(BASE)
    assert speed_at(f, 10.0) == 10.0 and speed_at(f, 40.0) == 10.0  # the ends themselves
    assert speed_at(f, 15.0) == pytest.approx(9.0)
    assert speed_at(f, 30.0) == pytest.approx(9.0)
    assert speed_at(f, 9.99) is None and speed_at(f, 40.01) is None  # never extrapolated
    assert speed_at([], 1.0) is None and speed_at(f, None) is None


def test_a_throughput_met_twice_takes_the_best_speed_seen_there():
    f = frontier([(10.0, 5.0), (10.0, 7.0), (20.0, 3.0)])
    assert speed_at(f, 10.0) == 7.0
    assert speed_at(f, 15.0) == pytest.approx(5.0)  # the segment from (10, 7) to (20, 3)


def test_overlap_and_gains_at_every_measured_throughput_inside_it():
    p, b = frontier(POLICY), frontier(BASE)
    assert overlap(p, b) == (15.0, 40.0)
    gains = matched_gains(p, b)
    assert [g.throughput for g in gains] == [15.0, 20.0, 30.0, 40.0]  # knots of either frontier in [15, 40]
    g15 = gains[0]
    assert (g15.speed, g15.baseline_speed) == (16.0, pytest.approx(9.0)) and g15.gain == pytest.approx(16 / 9 - 1)
    assert gains[-1].speed == pytest.approx(10.0) and gains[-1].gain == pytest.approx(0.0)  # 12 -> 6 at 40 is 10
    best = best_gain(gains)
    assert best is gains[1] and best.gain == pytest.approx((16 - 4 * 5 / 15) / 8 - 1)  # 14.67 / 8 at 20
    assert gain_at(p, b, 20.0) == pytest.approx((16 - 4 * 5 / 15) / 8 - 1)
    assert gain_at(p, b, 50.0) is None and gain_at(p, b, 12.0) is None  # one frontier does not reach


def test_frontiers_that_share_no_throughput_give_no_gain():
    low, high = frontier([(1.0, 9.0), (2.0, 8.0)]), frontier([(3.0, 20.0), (5.0, 10.0)])
    assert overlap(low, high) is None and overlap(low, []) is None
    assert matched_gains(high, low) == [] and best_gain([]) is None
    assert gain_at(high, low, 2.5) is None


def test_frontiers_touching_at_one_throughput_compare_there_only():
    a, b = frontier([(1.0, 9.0), (2.0, 8.0)]), frontier([(2.0, 4.0), (5.0, 1.0)])
    assert overlap(a, b) == (2.0, 2.0)
    assert [(g.throughput, g.gain) for g in matched_gains(a, b)] == [(2.0, 1.0)]


def test_a_baseline_at_zero_speed_gives_no_ratio():
    assert MatchedGain(1.0, 3.0, 0.0).gain is None
    assert best_gain([MatchedGain(1.0, 3.0, 0.0)]) is None


def test_eq1_per_user_speed_is_tau_over_the_round_time():
    assert eq1_speed(3.0, 0.05) == pytest.approx(60.0)
    with pytest.raises(LabkitError, match="positive"):
        eq1_speed(3.0, 0.0)
