"""``qoda bench time-to-quality``: wall-clock seconds until a quality target, per compression, over seeds.

For each workload (:data:`WORKLOADS`: the GAN of ``qoda train`` scored by FID, the byte-level
transformer of ``qoda train --task lm`` scored by its validation loss) and each (workers,
bandwidth) setting, real worker processes in network namespaces with rate-limited links
(:mod:`qoda.bench.netns`, as ``qoda bench e2e``) train every row of :data:`ROWS` once per seed,
through the trainer itself (:func:`qoda.train.trainer.run_worker`: the GAN with qoda's averagers,
the LM through DDP and its comm hook).  Runs are interleaved: seed by seed, the row order rotated
by one per seed, so that machine drift hits every row alike.

Per run the curve is quality against the *training clock* (sum of step times, evaluations
excluded; :func:`qoda.eval.time_to_quality.training_clock`).  Per row, over the seeds (median,
min, max; :mod:`qoda.eval.time_to_quality`):

* ``seconds_to_target``: first crossing of the workload's target, interpolated between
  evaluations (``None`` for a seed that never reaches it);
* ``quality_at_budget``: the quality at a fixed training-clock budget, by default the shortest
  run of the setting (every run is measured there, none extrapolated);
* ``steps_to_target``: the same crossing on the step axis (quality per step);
* ``final_quality``: at equal steps (mean and standard deviation too), with the step time and
  its split, bits per step, and the speed-ups of the time to target over PowerSGD rank 1 and
  over the uncompressed all-reduce (ratios of the medians), each split into a steps ratio
  (quality per step) and a step-time ratio (compute, codec, link: the step split says which).

The target is given (``--lm-target``, ``--gan-target``) or chosen from the uncompressed row:
the loosest value every one of its seeds reaches within the first 75% of its evaluations
(:func:`~qoda.eval.time_to_quality.auto_target`), so the uncompressed runs reach it within the
step budget.

``--quick``: a CI-sized run (tiny models, 3 steps, 2 workers, 2 seeds, every row) that runs in
namespaces when it can and on the loopback interface otherwise (no root needed; the JSON says
which); it checks the machinery, not the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qoda.eval.time_to_quality import (
    auto_target,
    first_crossing,
    limiting_cost,
    median_band,
    quality_at,
    seed_summary,
    training_clock,
)

DEFAULT_WORKERS = (4,)
DEFAULT_RATES_MBIT = (100.0,)
DEFAULT_SEEDS = 3
EVALUATIONS = 12  # per run, with --lm-steps / --gan-steps
TARGET_FRACTION = 0.75  # auto target: reached by every uncompressed seed within this share of its evaluations


@dataclass(frozen=True)
class Workload:
    """One training job: its base options (full and ``--quick``), its quality key and history."""

    name: str
    label: str
    quality: str  # the evaluation row's key (lower is better)
    quality_label: str
    options: dict[str, Any]
    quick: dict[str, Any]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "lm", "byte-level transformer (qoda train --task lm: 2 blocks, d 128, context 64), standard-library "
            "corpus, AdamW, batch 16 per worker", "val_loss", "validation loss (nats per byte)",
            {"task": "lm", "optimizer": "adamw", "lr": 1e-3, "batch_size": 16, "steps": 400, "eval_every": 40,
             "log_every": 10, "val_windows": 64},
            {"task": "lm", "optimizer": "adamw", "lr": 3e-3, "lm_dim": 64, "lm_layers": 1, "lm_heads": 2,
             "lm_context": 16, "batch_size": 4, "steps": 3, "eval_every": 1, "log_every": 1, "val_windows": 8,
             "ddp_bucket_mb": 0.05, "refit_steps": (0,), "hook_start_iter": 1},
        ),
        Workload(
            "gan", "WGAN-GP (qoda train: DCGAN width 64, MNIST), QODA, batch 64 per worker", "fid",
            "FID of the EMA generator (classifier features, 1,000 samples)",
            {"steps": 400, "eval_every": 50, "log_every": 10, "fid_samples": 1000},
            {"dataset": "digits", "width": 12, "batch_size": 8, "steps": 3, "eval_every": 1, "log_every": 1,
             "fid_samples": 16, "refit_steps": (0,)},
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    workloads: tuple[str, ...] = ("lm", "gan")


ROWS: tuple[Row, ...] = (
    Row("allreduce", "uncompressed fp32 all-reduce", {"compression": "none"}),
    Row("fp16", "fp16 all-reduce (PyTorch's hook)", {"compression": "fp16"}),
    Row("powersgd1", "PowerSGD rank 1 (PyTorch's hook, error feedback)", {"compression": "powersgd",
                                                                          "powersgd_rank": 1}),
    Row("powersgd4", "PowerSGD rank 4 (PyTorch's hook, error feedback)", {"compression": "powersgd",
                                                                          "powersgd_rank": 4}),
    Row("global_alq4", "global ALQ, 4 bits", {"compression": "global_adaptive", "bits": 4,
                                              "bit_allocation": "uniform"}),
    Row("qoda_dp4", "qoda layer-wise, DP widths, 4 bits", {"compression": "layerwise_adaptive", "bits": 4,
                                                           "bit_allocation": "dp"}),
    Row("qoda_dp3", "qoda layer-wise, DP widths, 3 bits", {"compression": "layerwise_adaptive", "bits": 3,
                                                           "bit_allocation": "dp"}),
    Row("extra_adam_allreduce", "ExtraAdam, uncompressed (the paper's baseline; 2 exchanges)",
        {"optimizer": "extra_adam", "compression": "none"}, ("gan",)),
)  # fmt: skip
REFERENCE, RIVAL = "allreduce", "powersgd1"  # the uncompressed row (auto target) and the compressed rival
QODA_ROWS = ("qoda_dp4", "qoda_dp3")


def rows_of(workload: str) -> list[Row]:
    return [r for r in ROWS if workload in r.workloads]


def run_order(workloads: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int, str]]:
    """``(workload, seed, row)`` in run order: seed by seed, each workload's rows rotated left by
    the seed's position, so every row takes every position as the seeds go by."""
    order = []
    for k, seed in enumerate(seeds):
        for w in workloads:
            names = [r.name for r in rows_of(w)]
            order += [(w, seed, names[(k + i) % len(names)]) for i in range(len(names))]
    return order


def run_config(workload: str, row: str, seed: int, quick: bool, world: int, out: str, steps: int = 0) -> Any:
    """The :class:`~qoda.train.config.TrainConfig` of one run (checkpoint and samples at the end only).
    ``steps`` (0: the workload's) shortens or lengthens the runs, still with about
    :data:`EVALUATIONS` evaluations, at multiples of ``log_every``."""
    from qoda.train.config import TrainConfig

    w, r = WORKLOADS[workload], next(x for x in ROWS if x.name == row)
    base = dict(w.quick if quick else w.options)
    if steps:
        log = base["log_every"]
        base.update(steps=steps, eval_every=max(log, round(steps / EVALUATIONS / log) * log))
    steps = base["steps"]
    extra = {"sample_every": steps} if workload == "gan" else {}
    return TrainConfig(**base, **r.options, **extra, seed=seed, checkpoint_every=steps, workers=world,
                       progress=False, out=out)  # fmt: skip


# ---------------------------------------------------------------------------- one worker
def run_record(workload: str, row: str, seed: int, report: dict[str, Any], history: list[dict[str, Any]],
               evals: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """What rank 0 keeps of one run: its curve on the training clock and its costs."""
    key = WORKLOADS[workload].quality
    steps = [int(e["step"]) for e in evals]
    clock = training_clock(history, steps)
    return {
        "workload": workload, "row": row, "seed": seed,
        "curve": [[t, float(e[key])] for t, e in zip(clock, evals, strict=True)],
        "curve_steps": steps,
        "final_quality": float(evals[-1][key]),
        "steps": report["steps"],
        "train_seconds": clock[-1],
        "wall_seconds": report["seconds"],
        **{k: report.get(k) for k in ("step_seconds", "compute_seconds", "encode_seconds", "comm_seconds",
                                      "decode_seconds", "bits_per_step", "compression_ratio", "parameters",
                                      "wire_bits_per_coordinate", "optimizer", "compression")},
    }  # fmt: skip


def worker_main(a: argparse.Namespace) -> None:
    import torch.distributed as dist

    from qoda.bench.netns import join_group, leave_group
    from qoda.train import checkpoint
    from qoda.train.trainer import run_worker

    join_group(a)
    records: list[dict[str, Any]] = []
    seeds = list(range(a.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        box = [tmp if a.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)  # rank 0's folder holds every rank's checkpoint shards
        root = Path(str(box[0]))
        for workload, seed, row in run_order(a.workloads, seeds):
            out = root / f"{workload}-{row}-s{seed}"
            cfg = run_config(workload, row, seed, a.quick, a.world, str(out), getattr(a, f"{workload}_steps"))
            report = run_worker(cfg, a.rank, a.world)
            if a.rank == 0:
                common = checkpoint.read_file(out / "checkpoints" / checkpoint.latest(out)["dir"] / "common.pt")
                evals = report["val_history"] if workload == "lm" else report["fid_history"]
                rec = run_record(workload, row, seed, report, common["history"], evals)
                rec.update(workers=a.world, bandwidth_mbit=a.rate)
                records.append(rec)
                Path(a.out).write_text(json.dumps(records))  # as it goes: a stopped setting keeps its runs
    leave_group()


# ---------------------------------------------------------------------------- summary
def summarise(records: list[dict[str, Any]], targets: dict[str, float | None] | None = None,
              budget: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One summary per (workload, workers, bandwidth, row), from the per-seed run records."""
    targets = targets or {}
    out: list[dict[str, Any]] = []
    settings = sorted({(r["workload"], r["workers"], r["bandwidth_mbit"]) for r in records}, key=str)
    for workload, workers, rate in settings:
        runs = [r for r in records if (r["workload"], r["workers"], r["bandwidth_mbit"]) == (workload, workers, rate)]
        ref = [r["curve"] for r in runs if r["row"] == REFERENCE]
        target = targets.get(workload)
        if target is None:
            target = auto_target(ref, TARGET_FRACTION) if ref else None
        at = budget if budget is not None else min(r["train_seconds"] for r in runs)
        rows = []
        for row in rows_of(workload):
            mine = sorted((r for r in runs if r["row"] == row.name), key=lambda r: r["seed"])
            if not mine:
                continue
            finals = [r["final_quality"] for r in mine]
            rows.append({
                "workload": workload, "workers": workers, "bandwidth_mbit": rate, "row": row.name,
                "label": row.label, "seeds": [r["seed"] for r in mine], "target": target, "budget_seconds": at,
                "seconds_to_target": seed_summary([first_crossing(r["curve"], target) if target is not None
                                                   else None for r in mine]),
                "seconds_to_target_per_seed": [first_crossing(r["curve"], target) if target is not None else None
                                               for r in mine],
                # the same crossing on the step axis: quality per step, apart from the step time
                "steps_to_target": seed_summary([first_crossing(step_curve(r), target) if target is not None
                                                 else None for r in mine]),
                "quality_at_budget": seed_summary([quality_at(r["curve"], at) for r in mine]),
                "final_quality": {**seed_summary(finals), "mean": statistics.fmean(finals),
                                  "std": statistics.stdev(finals) if len(finals) > 1 else 0.0},
                "steps": mine[0]["steps"],
                **{k: statistics.median(r[k] for r in mine) for k in (
                    "train_seconds", "step_seconds", "compute_seconds", "encode_seconds", "comm_seconds",
                    "decode_seconds", "bits_per_step", "compression_ratio")},
                "parameters": mine[0]["parameters"],
            })  # fmt: skip
        for r in rows:
            for name, key in ((RIVAL, "speedup_vs_powersgd1"), (REFERENCE, "speedup_vs_allreduce")):
                other = next((x for x in rows if x["row"] == name), None)
                r[key] = _ratio(other, r, "seconds_to_target")
                # speed-up = (steps the other needs / steps this row needs) x (its step time / this row's):
                # quality per step against the cost of a step (compute, codec, link: the step split)
                r[key.replace("speedup", "steps_ratio")] = _ratio(other, r, "steps_to_target")
                r[key.replace("speedup", "step_time_ratio")] = (
                    other["step_seconds"] / r["step_seconds"] if other and r["step_seconds"] else None)  # fmt: skip
        out += rows
    return out


def step_curve(record: dict[str, Any]) -> list[tuple[float, float]]:
    """A run's curve on the step axis: ``(step, quality)`` at its evaluations."""
    return [(float(s), v) for s, (_, v) in zip(record["curve_steps"], record["curve"], strict=True)]


def _ratio(other: dict[str, Any] | None, row: dict[str, Any], key: str) -> float | None:
    """``other[key] / row[key]`` of the seed medians, ``None`` if either is missing or zero."""
    a = other[key]["median"] if other else None
    b = row[key]["median"]
    return a / b if a is not None and b else None


def claims(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets per setting and qoda row: >= 1.2x sooner than PowerSGD rank 1, >= 2x sooner
    than uncompressed (medians), final quality within one standard deviation of uncompressed."""
    out = []
    for r in summary:
        if r["row"] not in QODA_ROWS:
            continue
        ref = _row(summary, r, REFERENCE)
        within = None
        if ref is not None:
            within = abs(r["final_quality"]["mean"] - ref["final_quality"]["mean"]) <= ref["final_quality"]["std"]
        vs_p, vs_a = r["speedup_vs_powersgd1"], r["speedup_vs_allreduce"]
        split = {k: r[f"{k}_seconds"] for k in ("compute", "encode", "comm", "decode")}
        verdicts = {}
        for name, goal, other in (("powersgd1", 1.2, _row(summary, r, RIVAL)),
                                  ("allreduce", 2.0, _row(summary, r, REFERENCE))):  # fmt: skip
            met, why = (False, None) if other is None else _decided_by(r, other, split, goal,
                                                                           r[f"steps_ratio_vs_{name}"])  # fmt: skip
            verdicts[name] = met
            if why is not None:
                verdicts[f"decided_by_vs_{name}"] = why
        out.append({
            "workload": r["workload"], "workers": r["workers"], "bandwidth_mbit": r["bandwidth_mbit"], "row": r["row"],
            # met: the ratio of the medians, or its lower bound when only qoda reaches the target
            "speedup_vs_powersgd1": vs_p, "met_1.2x_vs_powersgd1": verdicts.pop("powersgd1"),
            "speedup_vs_allreduce": vs_a, "met_2x_vs_allreduce": verdicts.pop("allreduce"),
            "final_within_one_std_of_allreduce": within,
            # what decides: the speed-up is the product of these two factors (see summarise)
            **{k: r[k] for k in ("steps_ratio_vs_powersgd1", "step_time_ratio_vs_powersgd1",
                                 "steps_ratio_vs_allreduce", "step_time_ratio_vs_allreduce")},
            **verdicts,
        })  # fmt: skip
    return out


def _decided_by(row: dict[str, Any], other: dict[str, Any], split: dict[str, float], goal: float,
                steps_ratio: float | None) -> tuple[bool, str]:  # fmt: skip
    """Whether ``row``'s speed-up over ``other`` reaches ``goal``, and what decides it:
    :func:`~qoda.eval.time_to_quality.limiting_cost`, or, when only ``row`` reaches the target, the
    lower bound it gives: the other's whole training clock over this row's time to target."""
    mine, theirs = row["seconds_to_target"]["median"], other["seconds_to_target"]["median"]
    if mine is not None and theirs is None:
        bound = other["train_seconds"] / mine
        return bound >= goal, (
            f"{other['row']} does not reach the target ({other['seconds_to_target']['reached']} of "
            f"{other['seconds_to_target']['n']} seeds) within its {other['train_seconds']:.0f} s: speed-up at "
            f"least {bound:.2f}x ({'met' if bound >= goal else 'not shown'})")  # fmt: skip
    why = limiting_cost(steps_ratio, other["step_seconds"], split, goal)
    return why == "met", why


def _row(summary: list[dict[str, Any]], like: dict[str, Any], name: str) -> dict[str, Any] | None:
    """Row ``name`` of ``like``'s workload and setting."""
    key = (like["workload"], like["workers"], like["bandwidth_mbit"])
    return next((x for x in summary if x["row"] == name and (x["workload"], x["workers"], x["bandwidth_mbit"]) == key),
                None)  # fmt: skip


# ---------------------------------------------------------------------------- orchestration
def run_time_to_quality(
    workloads: Sequence[str] = ("lm", "gan"),
    workers: Sequence[int] = DEFAULT_WORKERS,
    rates_mbit: Sequence[float] = DEFAULT_RATES_MBIT,
    seeds: int = DEFAULT_SEEDS,
    quick: bool = False,
    targets: dict[str, float | None] | None = None,
    budget: float | None = None,
    max_seconds: float = 3 * 3600,
    loopback: bool | None = None,
    log: Callable[[str], None] = print,
    steps: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """Every (workers, rate) setting, every workload x row x seed (interleaved); the result document.
    ``loopback``: ``None`` = namespaces when available, else (``--quick`` only) the loopback interface.
    ``steps``: per workload, steps per run instead of the default (:func:`run_config`)."""
    from qoda.bench.netns import NetnsUnavailable, check_available, run_sweep
    from qoda.train.launch import check_plan
    from qoda.utils.system import allocator

    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"workloads: unknown {unknown}; known: {', '.join(WORKLOADS)}")
    if seeds < 1:
        raise ValueError(f"seeds: must be >= 1, got {seeds}")
    for w, seed, row in run_order(workloads, range(seeds)):  # every run's options, before any process starts
        for k in workers:
            try:
                check_plan(run_config(w, row, seed, quick, k, "unused", (steps or {}).get(w) or 0))
            except ValueError as e:
                raise ValueError(f"{w} row {row}: {e}") from None
    why = ""
    if loopback is None:
        try:
            check_available()
            loopback = False
        except NetnsUnavailable as e:
            if not quick:
                raise
            loopback, why = True, str(e)
    args = [
        "--steps",
        "0",
        "--seeds",
        str(seeds),
        "--workloads",
        *workloads,
        *(["--quick"] if quick else []),
        *(a for w in workloads for a in (f"--{w}-steps", str((steps or {}).get(w) or 0))),
    ]
    start = time.monotonic()
    records, skipped = run_sweep("qoda.bench.time_to_quality", workers, rates_mbit, args, max_seconds=max_seconds,
                                 setting_seconds=30 if quick else 600, log=log, loopback=loopback)  # fmt: skip
    summary = summarise(records, targets, budget)
    return {
        "benchmark": "time-to-quality",
        "quick": quick,
        "links": (
            "loopback interface, not rate-limited" + (f" (namespaces unavailable: {why})" if why else "")
            if loopback
            else "network namespaces + veth + bridge, tc tbf on both ends of each link"
        ),
        "workloads": {w: WORKLOADS[w].label for w in workloads},
        "quality": {w: WORKLOADS[w].quality_label for w in workloads},
        "rows": {r.name: r.label for r in ROWS},
        "seeds": seeds,
        "steps": {
            w: run_config(w, REFERENCE, 0, quick, 2, "unused", (steps or {}).get(w) or 0).steps for w in workloads
        },
        "order": "seed by seed, each workload's rows rotated by one per seed",
        "clock": "training clock: sum of step times (evaluations and checkpoints excluded)",
        "target_rule": f"given, or the loosest value every uncompressed seed reaches within the first "
        f"{TARGET_FRACTION:.0%} of its evaluations",
        "budget_rule": "given, or the shortest run's training clock in the setting",
        "allocator": allocator(),
        "bench_seconds": time.monotonic() - start,
        "runs": records,
        "summary": summary,
        "claims": claims(summary),
        "skipped": skipped,
    }


def _fmt(s: dict[str, Any], digits: int = 1, missing: str = "not reached") -> str:
    if s["median"] is None:
        return f"{missing} ({s['reached']}/{s['n']})"
    lo, hi = s["min"], s["max"]
    spread = f" [{lo:.{digits}f}-{hi:.{digits}f}]" if hi is not None else f" [{lo:.{digits}f}-never]"
    return f"{s['median']:.{digits}f}{spread}" + (f" ({s['reached']}/{s['n']})" if s["reached"] < s["n"] else "")


def format_time_to_quality(res: dict[str, Any]) -> str:
    lines = [f"links: {res['links']}; {res['seeds']} seeds per row; {res['order']}; {res['clock']}", ""]
    for workload in res["workloads"]:
        rows = [r for r in res["summary"] if r["workload"] == workload]
        if not rows:
            continue
        lines += [f"**{workload}**: {res['workloads'][workload]}; quality: {res['quality'][workload]}", ""]
        for setting in sorted({(r["workers"], r["bandwidth_mbit"]) for r in rows}):
            rs = [r for r in rows if (r["workers"], r["bandwidth_mbit"]) == setting]
            t = rs[0]["target"]
            lines += [
                f"{setting[0]} workers at {setting[1]:g} Mbit/s, target {t:.4g}" if t is not None else
                f"{setting[0]} workers at {setting[1]:g} Mbit/s, no target", "",
                f"| row | s to target, median [min-max] | steps to target | vs PowerSGD r1 | vs fp32 | quality at "
                f"{rs[0]['budget_seconds']:.3g} s | final quality ({rs[0]['steps']} steps), mean +- std | step s | "
                "compute | encode | comm | decode | MB/step |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]  # fmt: skip
            for r in rs:
                f = r["final_quality"]
                sp = [f"{r[k]:.2f}x" if r[k] is not None else "" for k in ("speedup_vs_powersgd1",
                                                                             "speedup_vs_allreduce")]  # fmt: skip
                lines.append(
                    f"| {r['label']} | {_fmt(r['seconds_to_target'])} | {_fmt(r['steps_to_target'], 0)} | {sp[0]} | "
                    f"{sp[1]} | {_fmt(r['quality_at_budget'], 3, 'not evaluated yet')} | "
                    f"{f['mean']:.3f} +- {f['std']:.3f} | {r['step_seconds']:.3f} "
                    f"| {r['compute_seconds']:.3f} | {r['encode_seconds']:.4f} | {r['comm_seconds']:.3f} | "
                    f"{r['decode_seconds']:.4f} | {r['bits_per_step'] / 8e6:.3f} |"
                )
            mine = [c for c in res["claims"] if (c["workload"], c["workers"], c["bandwidth_mbit"]) == (workload,
                                                                                                     *setting)]
            if mine:
                lines += ["", "Targets (speed-up = steps ratio x step-time ratio, medians over seeds):", "",
                          "| row | vs PowerSGD r1 (target 1.2x) | decided by | vs fp32 (target 2x) | decided by | "
                          "final within 1 std of fp32 |", "|---|---|---|---|---|---|"]  # fmt: skip
                for c in mine:
                    cells = []
                    for name in ("powersgd1", "allreduce"):
                        sp, st, tt = (c[f"{k}_vs_{name}"] for k in ("speedup", "steps_ratio", "step_time_ratio"))
                        cells.append("-" if sp is None else f"{sp:.2f}x = {st:.2f} x {tt:.2f}")
                        cells.append(c.get(f"decided_by_vs_{name}", "-"))
                    lines.append(f"| {res['rows'][c['row']]} | {' | '.join(cells)} | "
                                 f"{c['final_within_one_std_of_allreduce']} |")
            lines.append("")
    for s in res.get("skipped", []):
        lines.append(f"skipped: {s}")
    return "\n".join(lines).rstrip()


def merge_results(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result document from several (e.g. one per workload, run separately): the union of their
    runs, summarised again (targets and budgets per setting, as :func:`run_time_to_quality`)."""
    if not documents:
        raise ValueError("merge: no documents")
    if len({d["seeds"] for d in documents}) > 1 or len({d["quick"] for d in documents}) > 1:
        raise ValueError("merge: the documents differ in seeds per row or --quick")
    runs = [r for d in documents for r in d["runs"]]
    keys = [(r["workload"], r["workers"], r["bandwidth_mbit"], r["row"], r["seed"]) for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("merge: the documents have runs in common (same workload, setting, row and seed)")
    summary = summarise(runs)
    out = {**documents[0], "runs": runs, "summary": summary, "claims": claims(summary)}
    for key in ("workloads", "quality", "steps"):
        out[key] = {k: v for d in documents for k, v in d[key].items()}
    out["bench_seconds"] = sum(d["bench_seconds"] for d in documents)
    out["skipped"] = [s for d in documents for s in d.get("skipped", [])]
    return out


def plot_time_to_quality(res: dict[str, Any], path: Path) -> None:
    """Quality against the training clock per row (median over seeds, band min-max), one panel per
    workload and setting; the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["workload"], r["workers"], r["bandwidth_mbit"]) for r in res["runs"]}, key=str)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.5 * max(1, len(panels)), 4.5), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (workload, workers, rate) in zip(axes[0], panels, strict=False):
        runs = [r for r in res["runs"] if (r["workload"], r["workers"], r["bandwidth_mbit"]) == (workload, workers,
                                                                                                   rate)]  # fmt: skip
        for i, row in enumerate(rows_of(workload)):
            curves = [r["curve"] for r in runs if r["row"] == row.name]
            if not curves:
                continue
            end = min(c[-1][0] for c in curves)
            grid = [end * k / 60 for k in range(61)]
            band = median_band(curves, grid)
            if band:
                t, med, lo, hi = zip(*band, strict=True)
                ax.plot(t, med, label=row.name, color=colors[i % len(colors)], lw=1.3)
                ax.fill_between(t, lo, hi, color=colors[i % len(colors)], alpha=0.15)
        target = next((s["target"] for s in res["summary"] if s["workload"] == workload and s["workers"] == workers
                       and s["bandwidth_mbit"] == rate), None)  # fmt: skip
        if target is not None:
            ax.axhline(target, ls="--", color="grey", lw=0.8, label="target")
        ax.set_xlabel("training seconds (sum of step times)")
        ax.set_ylabel(res["quality"][workload])
        ax.set_title(f"{workload}: {workers} workers at {rate:g} Mbit/s" if rate else f"{workload}: {workers} workers")
        if workload == "gan":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worker_args(argv: list[str]) -> argparse.Namespace:
    from qoda.bench.netns import worker_parser

    p = worker_parser()
    p.add_argument("--seeds", type=int, required=True)
    p.add_argument("--workloads", nargs="+", required=True)
    p.add_argument("--quick", action="store_true")
    for w in WORKLOADS:
        p.add_argument(f"--{w}-steps", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    worker_main(_worker_args(sys.argv[1:]))

__all__ = ["ROWS", "WORKLOADS", "claims", "format_time_to_quality", "merge_results", "plot_time_to_quality",
           "run_order", "run_time_to_quality", "summarise"]  # fmt: skip
