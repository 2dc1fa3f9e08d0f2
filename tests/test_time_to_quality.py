"""Time to quality: the crossing and budget arithmetic on synthetic curves, and ``qoda bench
time-to-quality --quick`` end to end (every row and seed in its JSON)."""

from __future__ import annotations

import json
import math

import pytest

from qoda.eval.time_to_quality import (
    auto_target,
    first_crossing,
    limiting_cost,
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


def _record(row: str, seed: int, step_seconds: float, losses: list[float]) -> dict:
    steps = [10 * (k + 1) for k in range(len(losses))]
    return {"workload": "lm", "row": row, "seed": seed, "workers": 4, "bandwidth_mbit": 100.0,
            "curve": [[s * step_seconds, v] for s, v in zip(steps, losses, strict=True)], "curve_steps": steps,
            "final_quality": losses[-1], "steps": steps[-1], "train_seconds": steps[-1] * step_seconds,
            "step_seconds": step_seconds, "compute_seconds": 0.1, "encode_seconds": 0.0, "comm_seconds": 0.0,
            "decode_seconds": 0.0, "bits_per_step": 1.0, "compression_ratio": 1.0, "parameters": 10}  # fmt: skip


def test_summary_splits_each_speedup_into_quality_per_step_and_step_time():
    """Constant step times: seconds to target = steps to target x step time, exactly, so every
    speed-up is the product of its steps ratio and its step-time ratio."""
    from qoda.bench.time_to_quality import claims, summarise

    records = []
    for seed in range(3):
        records += [
            _record("allreduce", seed, 1.0, [5.0, 4.0, 3.0, 2.0]),  # target 3.0: step 30, 30 s
            _record("powersgd1", seed, 0.5, [5.0, 4.5, 4.0, 3.5]),  # never reaches 3.0
            _record("qoda_dp4", seed, 0.25, [5.0, 4.0, 3.5, 3.0, 2.9 + 0.1 * seed]),  # step 40: 10 s
        ]
    rows = {r["row"]: r for r in summarise(records)}
    assert rows["allreduce"]["target"] == 3.0  # auto: best of the first 3 of 4 evaluations, every seed
    q = rows["qoda_dp4"]
    assert q["seconds_to_target"]["median"] == pytest.approx(10.0) and q["steps_to_target"]["median"] == 40.0
    assert q["speedup_vs_allreduce"] == pytest.approx(3.0)
    assert q["speedup_vs_allreduce"] == pytest.approx(q["steps_ratio_vs_allreduce"] * q["step_time_ratio_vs_allreduce"])
    assert q["steps_ratio_vs_allreduce"] == pytest.approx(0.75) and q["step_time_ratio_vs_allreduce"] == 4.0
    assert rows["powersgd1"]["seconds_to_target"]["median"] is None and q["speedup_vs_powersgd1"] is None
    assert q["budget_seconds"] == 12.5  # the shortest run: qoda's 50 steps at 0.25 s
    assert rows["allreduce"]["quality_at_budget"]["median"] == pytest.approx(4.75)  # between 5 at 10 s, 4 at 20 s
    assert q["quality_at_budget"]["median"] == pytest.approx(3.0) and q["final_quality"]["std"] == pytest.approx(0.1)
    (c,) = claims(list(rows.values()))
    assert c["met_2x_vs_allreduce"] and c["met_1.2x_vs_powersgd1"]
    assert c["decided_by_vs_allreduce"] == "met"
    # PowerSGD never reaches the target in its 20 s: qoda (10 s) is at least 2x sooner
    assert c["decided_by_vs_powersgd1"].endswith("within its 20 s: speed-up at least 2.00x (met)")
    assert c["final_within_one_std_of_allreduce"] is False  # 3.0 +- 0.1 vs 2.0 +- 0


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
    md = path.with_suffix(".md").read_text()
    assert md.count("| qoda layer-wise, DP widths, 3 bits |") == 4  # per workload: its row and its targets
    # --merge: one document per workload, summarised together, gives the same summary
    parts = []
    for w in ("lm", "gan"):
        part = {**res, "runs": [r for r in res["runs"] if r["workload"] == w], "workloads": {w: res["workloads"][w]},
                "quality": {w: res["quality"][w]}, "steps": {w: res["steps"][w]}}  # fmt: skip
        parts.append(tmp_path / f"{w}.json")
        parts[-1].write_text(json.dumps(part))
    merged = tmp_path / "merged.json"
    assert main(["bench", "time-to-quality", "--merge", *map(str, parts), "--json", str(merged)]) == 0
    m = json.loads(merged.read_text())
    key = [(s["workload"], s["row"]) for s in res["summary"]]
    assert [(s["workload"], s["row"]) for s in m["summary"]] == key and m["claims"] == res["claims"]
    assert main(["bench", "time-to-quality", "--merge", str(parts[0]), str(parts[0]), "--json", str(merged)]) == 2
    assert "in common" in capsys.readouterr().err
    assert path.with_suffix(".png").stat().st_size > 1000


def test_limiting_cost_names_what_keeps_the_speedup_below_its_target():
    """speed-up = steps ratio x other's step / this step; a free link and codec bound it by
    steps ratio x other's step / compute."""
    split = {"compute": 0.3, "encode": 0.01, "comm": 0.05, "decode": 0.04}  # 0.4 s per step
    assert limiting_cost(1.0, 0.9, split, 2.0) == "met"  # 2.25x
    assert limiting_cost(None, 0.9, split, 2.0).startswith("quality")
    why = limiting_cost(1.0, 0.5, split, 2.0)  # 1.25x; free link: 0.5 / 0.3 = 1.67x < 2
    assert why.startswith("compute") and "1.67x" in why
    why = limiting_cost(0.5, 0.9, split, 1.2)  # 1.125x; free link: 1.5x >= 1.2: the larger of link and codec
    assert why.startswith("quality per step (2.00x the steps); link: 0.050")
    assert limiting_cost(1.0, 0.45, {**split, "comm": 0.0, "encode": 0.05}, 1.2).startswith("codec: 0.090")
