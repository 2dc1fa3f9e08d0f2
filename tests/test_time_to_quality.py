"""Time to quality: the crossing and budget arithmetic on synthetic curves, and ``qoda bench
time-to-quality --quick`` end to end (every row and seed in its JSON)."""

from __future__ import annotations

import json
import math

import pytest

from qoda.eval.time_to_quality import (
    auto_target,
    first_crossing,
    median_band,
    quality_at,
    seed_summary,
    training_clock,
)


def test_first_crossing_interpolates_between_the_evaluations_around_the_target():
    curve = [(10.0, 5.0), (20.0, 4.0), (30.0, 2.0)]
    assert first_crossing(curve, 3.0) == pytest.approx(25.0)  # halfway from 4.0 at 20 s to 2.0 at 30 s
    assert first_crossing(curve, 4.5) == pytest.approx(15.0)
    assert first_crossing(curve, 5.0) == 10.0  # reached at the first evaluation: nothing to interpolate from
    assert first_crossing(curve, 1.9) is None  # never reached
    assert first_crossing([], 1.0) is None


def test_first_crossing_ties_and_noisy_curves_take_the_first_time():
    assert first_crossing([(0.0, 3.0), (10.0, 2.0), (20.0, 2.0)], 2.0) == 10.0  # equal counts as reached
    noisy = [(0.0, 6.0), (10.0, 2.5), (20.0, 4.0), (30.0, 1.0)]  # dips below, rises, falls again
    assert first_crossing(noisy, 3.0) == pytest.approx(10.0 * (6.0 - 3.0) / (6.0 - 2.5))
    flat = [(0.0, 3.0), (5.0, 3.0), (5.0, 1.0)]  # two evaluations at one time: no division by zero
    assert first_crossing(flat, 2.0) == 5.0
    with pytest.raises(ValueError, match="non-decreasing"):
        first_crossing([(2.0, 1.0), (1.0, 0.5)], 1.0)
    with pytest.raises(ValueError, match="finite"):
        first_crossing([(0.0, math.nan)], 1.0)


def test_quality_at_a_budget_interpolates_inside_the_span_only():
    curve = [(10.0, 5.0), (20.0, 4.0), (30.0, 2.0)]
    assert quality_at(curve, 25.0) == pytest.approx(3.0)
    assert quality_at(curve, 10.0) == 5.0 and quality_at(curve, 30.0) == 2.0
    assert quality_at(curve, 9.9) is None and quality_at(curve, 30.1) is None  # no extrapolation
    assert quality_at([(4.0, 1.5)], 4.0) == 1.5


def test_seed_summary_ranks_never_reached_after_every_time():
    assert seed_summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "reached": 3}
    one_missing = seed_summary([3.0, None, 1.0])
    assert one_missing["median"] == 3.0 and one_missing["max"] is None and one_missing["reached"] == 2
    assert seed_summary([None, None, 1.0])["median"] is None  # most seeds never reached it
    assert seed_summary([4.0, None])["median"] is None  # the median of (4, inf)
    assert seed_summary([2.0, 4.0])["median"] == 3.0


def test_training_clock_sums_the_log_windows_and_targets_come_from_the_reference():
    history = [{"step": 2, "step_seconds": 0.5}, {"step": 4, "step_seconds": 1.0}, {"step": 6, "step_seconds": 0.25}]
    assert training_clock(history, [2, 4, 6]) == [1.0, 3.0, 3.5]
    with pytest.raises(ValueError, match="log_every"):
        training_clock(history, [3])
    ref = [[(1, 5.0), (2, 3.0), (3, 2.0), (4, 1.0)], [(1, 6.0), (2, 4.0), (3, 2.5), (4, 2.4)]]
    assert auto_target(ref, 0.75) == 2.5  # the best of each run's first 3 evaluations: 2.0 and 2.5
    band = median_band([[(0.0, 4.0), (10.0, 2.0)], [(0.0, 6.0), (20.0, 2.0)]], [0.0, 10.0, 15.0])
    assert band == [(0.0, 5.0, 4.0, 6.0), (10.0, 3.0, 2.0, 4.0)]  # 15 s: outside the first curve


def test_quick_bench_has_every_row_and_seed(tmp_path, capsys):
    from qoda.bench.time_to_quality import ROWS, rows_of
    from qoda.cli import main

    path = tmp_path / "ttq.json"
    assert main(["bench", "time-to-quality", "--quick", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert res["quick"] and not res["skipped"] and res["seeds"] == 2
    got = {(r["workload"], r["row"], r["seed"]) for r in res["runs"]}
    assert got == {(w, r.name, s) for w in ("lm", "gan") for r in rows_of(w) for s in (0, 1)}
    assert {r.name for r in ROWS} == {r["row"] for r in res["summary"]}
    for run in res["runs"]:
        assert [s for s in run["curve_steps"]] == [1, 2, 3] and run["train_seconds"] > 0
        assert all(b[0] >= a[0] for a, b in zip(run["curve"], run["curve"][1:], strict=False))
    for s in res["summary"]:
        assert s["seeds"] == [0, 1] and s["target"] is not None and len(s["seconds_to_target_per_seed"]) == 2
    ref = [s for s in res["summary"] if s["row"] == "allreduce"]
    assert all(s["seconds_to_target"]["reached"] == 2 for s in ref)  # the target is one the reference reaches
    assert {c["row"] for c in res["claims"]} == {"qoda_dp4", "qoda_dp3"}
    assert path.with_suffix(".md").read_text().count("| qoda layer-wise, DP widths, 3 bits |") == 2
    assert path.with_suffix(".png").stat().st_size > 1000
