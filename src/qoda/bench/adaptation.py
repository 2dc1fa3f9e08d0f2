"""Adaptation from the first step: DP bit allocation against global ALQ, per logging window.

Runs the real CLI (``python -m qoda.cli train --workers 2 --bits 4 ...``, the default job's
settings otherwise) once per row, seed and step count, and reads every run's ``report.json``:
``windows`` (per logging window: the exact quantization variance of rank 0's gradient before the
exchange at the window's last step, and the measured bits per coordinate) and ``quant_variance``
(the run's mean over the second half of its windows).

Rows: ``global`` (``--compression global_adaptive --bits 4``), ``dp_eq`` (``layerwise_adaptive
--bit-allocation dp`` at the bits per coordinate of global ALQ's message, so both send the same
bits within 2%) and ``dp4`` (``--bits 4``, what a user types; it sends about 6% fewer bits).
Ratios are DP over global ALQ of the same seed and steps: of the run means, and per window (same
steps, same seed).  Every invocation adds its rows to those already in ``OUT.json`` (runs whose
``report.json`` exists under ``--runs`` are reused), so longer runs can be added for one seed::

    python -m qoda.bench.adaptation --steps 60 300 --seeds 0 1 --out benchmarks/adaptation
    python -m qoda.bench.adaptation --steps 1500 --seeds 0 --rows dp_eq --out benchmarks/adaptation

``--steps 0 --hook-steps N`` runs only the DDP-hook study and replaces its section of ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qoda.bench.quality import equal_budget
from qoda.train.config import TrainConfig

ROWS = {
    "global": ["--compression", "global_adaptive", "--bits", "4"],
    "dp_eq": ["--compression", "layerwise_adaptive", "--bit-allocation", "dp", "--bits", "{eq}"],
    "dp4": ["--compression", "layerwise_adaptive", "--bit-allocation", "dp", "--bits", "4"],
}
COMMON = ["--workers", "2", "--fid-samples", "500", "--eval-every", "100000", "--sample-every", "100000",
          "--checkpoint-every", "100000", "--no-progress", "--overwrite"]  # fmt: skip


def command(row: str, seed: int, steps: int, out: Path, eq: float) -> list[str]:
    args = [a.format(eq=eq) for a in ROWS[row]]
    return [sys.executable, "-m", "qoda.cli", "train", *args, "--steps", str(steps), "--seed", str(seed),
            "--out", str(out / f"{row}-s{seed}-n{steps}"), *COMMON]  # fmt: skip


def run(row: str, seed: int, steps: int, out: Path, eq: float) -> dict[str, Any]:
    """One run (reused when its report exists); returns its report."""
    report = out / f"{row}-s{seed}-n{steps}" / "report.json"
    if not report.exists():
        t0 = time.perf_counter()
        subprocess.run(command(row, seed, steps, out, eq), check=True, stdout=subprocess.DEVNULL)
        print(f"{row} seed {seed} {steps} steps: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(report.read_text())


def compare(dp: dict[str, Any], glob: dict[str, Any]) -> dict[str, Any]:
    """DP against global ALQ of the same seed and steps: run means and every window."""
    windows = [
        {"step": d["step"], "ratio": d["quant_variance"] / g["quant_variance"]}
        for d, g in zip(dp["windows"], glob["windows"], strict=True)
        if d.get("quant_variance") and g.get("quant_variance")
    ]  # fmt: skip
    bits = [d["bits_per_coordinate"] / g["bits_per_coordinate"] for d, g in zip(dp["windows"], glob["windows"],
                                                                                 strict=True)]  # fmt: skip
    return {
        "mean_ratio": dp["quant_variance"] / glob["quant_variance"],
        "max_window_ratio": max(w["ratio"] for w in windows),
        "windows_over_1": sum(w["ratio"] > 1.0 for w in windows),
        "bits_ratio": dp["bits_per_step"] / glob["bits_per_step"],
        "max_window_bits_ratio": max(bits),
        "windows": windows,
        "dp_quant_variance": dp["quant_variance"],
        "global_quant_variance": glob["quant_variance"],
        "width_changes": len(dp["width_changes"]),
        "seconds_per_step": {"dp": dp["seconds_per_step"], "global": glob["seconds_per_step"]},
    }


HOOK_HEADING = "## The DDP hook: DP against uniform widths, per window"


def hook_markdown(hook: dict[str, Any]) -> str:
    """The DDP-hook study's section (from ``OUT_hook.json``)."""
    lines = [
        "", HOOK_HEADING, "",
        f"Produced by `{hook['command']}`: 2 ranks, an MLP (64-256-512-256-10) in {hook['buckets']} DDP buckets,",
        "SGD on a synthetic teacher task, ALQ levels (`QuantizerConfig.qsgd_inf(4)` policy, `start_iter=10`);",
        "uniform widths = `AdaptConfig()` (4 bits); DP = `AdaptConfig(allocation=\"dp\", budget=B)` with `B` =",
        f"{hook['budget']} (one whole 4-bit message per coordinate).", "",
        "**Paired (the target)**: at every iteration the DP run observed (every 2nd before iteration 100,",
        "then every 10th), on the *same* gradients (rank 0's, captured before the exchange), the exact",
        "variance `plan_variance` of the plan DP quantized them with over that of `uniform_plan(base, 4,",
        "allocation.type_levels)`: every tensor at 4 bits with the levels DP's last fit gave 4 bits (what",
        "uniform widths fit on the same statistics), whose message is the budget. The ratio measures the",
        "allocation alone. Per window: ratio of the summed variances, the largest single-iteration ratio,",
        "the largest ratio of the two plans' message bits, and the widths DP used.", "",
        "| iterations | observed | variance ratio | max iteration ratio | message bits ratio | DP widths |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    lines += [
        f"| {p['window']} | {p['iterations']} | {p['ratio']:.4f} | {p['max_iteration_ratio']:.4f} | "
        f"{p['bits_ratio']:.4f} | {', '.join(map(str, p['widths']))} |"
        for p in hook["paired"]
    ]
    worst = max(hook["paired"], key=lambda p: p["ratio"])
    lines += [
        "", f"Largest window ratio {worst['ratio']:.4f} (iterations {worst['window']}), largest single-iteration ratio",
        f"{hook['max_paired_iteration_ratio']:.4f}: an iteration whose gradients differ from the statistics",
        "(the last two observations) the widths were chosen on can come out above uniform widths.",
    ]  # fmt: skip
    lines += [
        "", "Two runs (not paired): rank 0's relative variance of the DP run over that of a separate",
        "uniform-widths run at the first iteration of every 10 (both observe there); bits = measured bits per",
        "coordinate. The trajectories diverge after iteration 10, so this ratio also moves with the",
        "gradients each run happens to have (about ±0.5% where DP uses the uniform plan itself).", "",
        "| iteration | variance ratio | bits ratio |", "|---|---|---|",
    ]  # fmt: skip
    lines += [f"| {w['step']} | {w['ratio']:.4f} | {w['bits_ratio']:.4f} |" for w in hook["windows"]]
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any], eq: float, invocations: list[str]) -> str:
    produced = " then ".join(f"`python -m qoda.bench.adaptation {a}`" for a in invocations)
    lines = [
        "# Adaptation from the first step: DP bit allocation vs global ALQ, per logging window",
        "",
        f"Produced by {produced} (each invocation adds its rows to the JSON's; 2 workers, the default job's",
        "settings, `--fid-samples 500`; one CLI run per row, seed and step count; commands in the JSON).",
        f"`dp_eq`: `--bit-allocation dp --bits {eq}` (global ALQ 4-bit's bits per coordinate);",
        "`dp4`: `--bits 4`. Ratios are DP / global ALQ of the same seed and steps: `mean` of the runs'",
        "`quant_variance` (second half of the windows), `max window` over every logging window",
        "(10 steps, exact variance at the window's last step), `bits` of the payload per step.",
        "",
        "| row | steps | seed | mean ratio | max window ratio | windows > 1.0x | bits ratio | width changes "
        "| s/step DP / global |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key, r in results.items():
        row, steps, seed = key.split("/")
        s = r["seconds_per_step"]
        lines.append(
            f"| {row} | {steps} | {seed} | {r['mean_ratio']:.3f} | {r['max_window_ratio']:.3f} | "
            f"{r['windows_over_1']}/{len(r['windows'])} | {r['bits_ratio']:.3f} | {r['width_changes']} | "
            f"{s['dp']:.3f} / {s['global']:.3f} |"
        )
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key, r in results.items():
        row, steps, _ = key.split("/")
        by.setdefault((row, steps), []).append(r)
    lines += ["", "Over seeds (mean ± standard deviation of the mean ratio; worst window of any seed):", "",
              "| row | steps | seeds | mean ratio | worst window ratio | bits ratio |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for (row, steps), rs in by.items():
        m = [r["mean_ratio"] for r in rs]
        sd = statistics.stdev(m) if len(m) > 1 else 0.0
        lines.append(
            f"| {row} | {steps} | {len(rs)} | {statistics.mean(m):.3f} ± {sd:.3f} | "
            f"{max(r['max_window_ratio'] for r in rs):.3f} | {statistics.mean(r['bits_ratio'] for r in rs):.3f} |"
        )
    return "\n".join(lines) + "\n"


def _key_order(key: str) -> tuple[int, int, int]:
    row, steps, seed = key.split("/")
    return int(seed), int(steps), list(ROWS).index(row)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m qoda.bench.adaptation", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[60, 300])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rows", nargs="+", default=["dp_eq", "dp4"], choices=["dp_eq", "dp4"])
    p.add_argument("--dp4-steps", type=int, nargs="*", default=None, help="steps of dp4 (default: --steps)")
    p.add_argument("--runs", type=Path, default=Path("runs/adaptation"), help="where the runs go")
    p.add_argument("--out", type=Path, default=Path("benchmarks/adaptation"),
                   help="writes OUT.md and OUT.json, adding to the rows already there")  # fmt: skip
    p.add_argument("--hook-steps", type=int, default=0, help="also (or only, with --steps 0) the DDP hook study")
    args = p.parse_args(argv)
    md, js = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    hook_file = args.out.parent / (args.out.name + "_hook.json")
    if args.hook_steps:
        hook = hook_study(args.hook_steps)
        hook_file.write_text(json.dumps({"command": f"python -m qoda.bench.adaptation {' '.join(argv)}", **hook},
                                        indent=1))  # fmt: skip
        print(json.dumps({k: hook[k] for k in ("buckets", "budget", "paired", "max_window_ratio")}), file=sys.stderr)
    hook_md = hook_markdown(json.loads(hook_file.read_text())) if hook_file.exists() else ""
    if args.steps == [0]:  # the hook section only: replace it, keep the trainer rows
        if md.exists():
            text = md.read_text()
            cut = text.find("\n" + HOOK_HEADING)
            md.write_text((text if cut < 0 else text[:cut]).rstrip("\n") + "\n" + hook_md)
        return
    eq = equal_budget(TrainConfig())
    old = json.loads(js.read_text()) if js.exists() else {}
    if old and old.get("budget_eq") != eq:
        raise SystemExit(f"--out: {js} was measured at budget {old.get('budget_eq')}, this job's is {eq}")
    results: dict[str, Any] = dict(old.get("results", {}))
    commands: list[str] = list(old.get("commands", []))
    invocations: list[str] = [*old.get("invocations", []), " ".join(argv)]
    for seed in args.seeds:
        for steps in args.steps:
            glob = run("global", seed, steps, args.runs, eq)
            todo = [("global", None)] + [
                (row, compare(run(row, seed, steps, args.runs, eq), glob)) for row in args.rows
                if not (row == "dp4" and args.dp4_steps is not None and steps not in args.dp4_steps)
            ]  # fmt: skip
            for row, result in todo:
                cmd = " ".join(command(row, seed, steps, args.runs, eq)[1:])
                commands += [cmd] if cmd not in commands else []
                if result is not None:
                    results[f"{row}/{steps}/{seed}"] = result
            results = dict(sorted(results.items(), key=lambda kv: _key_order(kv[0])))
            js.write_text(json.dumps({"budget_eq": eq, "invocations": invocations, "results": results,
                                      "commands": commands}, indent=1))  # fmt: skip
            md.write_text(markdown(results, eq, invocations) + hook_md)


# ---------------------------------------------------------------------------- the DDP hook
HOOK_CAP_MB = 0.25  # DDP bucket cap: the MLP below then has 3 buckets


def _mlp() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256),
                         nn.ReLU(), nn.Linear(256, 10))  # fmt: skip


def _hook_worker(rank: int, world: int, allocation: str, budget: float | None, steps: int) -> dict[str, Any]:
    """One rank of a DDP run of an MLP (3 buckets) with the qoda hook; at every iteration the hook
    observed: the relative variance of this rank's gradient (``summary()["variance"]``) and, with
    ``dp``, the paired comparison on the same gradients (this rank's, captured before the exchange):
    :func:`~qoda.quant.variance.plan_variance` of the plan the hook used and of
    :func:`~qoda.quant.allocation.uniform_plan` (every tensor at 4 bits, the allocation's 4-bit levels)."""
    import torch
    from torch import nn

    from qoda.codec.layerwise import fixed_message_bits
    from qoda.comm.ddp_hook import QodaHookState, qoda_hook
    from qoda.quant.adapt import AdaptConfig
    from qoda.quant.allocation import uniform_plan
    from qoda.quant.config import QuantizerConfig
    from qoda.quant.policy import LayerPolicy
    from qoda.quant.variance import plan_variance

    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=HOOK_CAP_MB)
    adapt = AdaptConfig(allocation=allocation, budget=budget)
    state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd_inf(4)), adapt=adapt)
    state.bind(model)
    names = {id(p): n for n, p in model.named_parameters()}
    local: dict[str, torch.Tensor] = {}

    def capture(st, bucket):  # type: ignore[no-untyped-def]  # DDP checks the annotations (these would be strings)
        """This rank's gradients, before the exchange; then the qoda hook."""
        local.update({names[id(p)]: g.detach().clone() for p, g in zip(bucket.parameters(), bucket.gradients(),
                                                                          strict=True)})  # fmt: skip
        return qoda_hook(st, bucket)

    ddp.register_comm_hook(state, capture)

    def state_sq(plan: Any, grads: list[torch.Tensor]) -> float:  # ||g||^2 over the compressed tensors (the hook's)
        return sum(float(t.double().square().sum()) for e, t in zip(plan.entries, grads, strict=True) if e.type_name)

    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(64, 10, generator=teacher)
    rows = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        x = torch.randn(32, 64, generator=g)
        y = (x @ w).argmax(1)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        s = state.summary()
        if not (s["compressing"] and adapt.observes(step)):
            continue
        row = {"step": step, "variance": s["variance"], "bits_per_coordinate": s["bits_per_coordinate"]}
        adapter = state.adapter
        if adapt.allocates and adapter is not None and adapter.allocation is not None:
            plan = state.plan
            assert plan is not None
            ref = uniform_plan(adapter.base_plan, 4, adapter.allocation.type_levels)
            grads = [local[e.name] for e in plan.entries]
            dp, sq = plan_variance(grads, plan, normalized=False), state_sq(plan, grads)
            if not math.isclose(dp / sq, s["variance"], rel_tol=1e-9):  # the hook's own figure, same gradients
                raise RuntimeError(f"iteration {step}: paired DP variance {dp / sq} != the hook's {s['variance']}")
            row["paired"] = {
                "dp": dp,
                "uniform": plan_variance(grads, ref, normalized=False),
                "grad_sq": sq,
                "dp_message_bits": fixed_message_bits(plan),
                "uniform_message_bits": fixed_message_bits(ref),
                "widths": sorted(set(adapter.widths.values())),
            }
        rows.append(row)
    return {"rows": rows, "buckets": len(state.layout)}


def hook_study(steps: int, window: int = 10) -> dict[str, Any]:
    """DP against uniform widths (ALQ levels, 4 bits) in the DDP hook, 2 ranks, DP's budget one whole
    message of the 4-bit plan per coordinate (every bit counted, as the DP budget counts them).

    ``paired`` (the target): on the same gradients (rank 0's, at every iteration the DP run
    observed), the exact variance of the plan DP used over that of the uniform-widths plan with the
    same levels; per window of ``window`` iterations, the ratio of the summed variances and the
    largest single-iteration ratio.  ``windows`` (two runs): rank 0's relative variance of the DP
    run over that of a separate uniform-widths run at the first iteration of every window (the
    trajectories diverge, so this ratio also moves with trajectory noise)."""
    from qoda.codec.layerwise import fixed_message_bits
    from qoda.quant.config import QuantizerConfig
    from qoda.quant.policy import LayerPolicy
    from qoda.utils.procs import run, values

    model = _mlp()
    plan = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4)).plan(model)
    # rounded up to 1e-6: the 4-bit plan itself must fit (a budget rounded down would exclude it)
    bits = math.ceil(fixed_message_bits(plan) / sum(p.numel() for p in model.parameters()) * 1e6) / 1e6
    uniform = values(run(_hook_worker, 2, "uniform", None, steps, timeout=600))[0]
    dp = values(run(_hook_worker, 2, "dp", bits, steps, timeout=600))[0]
    u = {r["step"]: r for r in uniform["rows"]}
    windows = [
        {"step": r["step"], "ratio": r["variance"] / u[r["step"]]["variance"],
         "bits_ratio": r["bits_per_coordinate"] / u[r["step"]]["bits_per_coordinate"]}
        for r in dp["rows"] if r["step"] in u and r["step"] % window == 0 and r["variance"] and u[r["step"]]["variance"]
    ]  # fmt: skip
    by: dict[int, list[dict[str, Any]]] = {}
    for r in (r for r in dp["rows"] if "paired" in r):
        by.setdefault(r["step"] // window * window, []).append(r["paired"])
    paired = [
        {"window": f"{w}-{w + window - 1}", "iterations": len(ps),
         "ratio": sum(p["dp"] for p in ps) / sum(p["uniform"] for p in ps),
         "max_iteration_ratio": max(p["dp"] / p["uniform"] for p in ps),
         "bits_ratio": max(p["dp_message_bits"] / p["uniform_message_bits"] for p in ps),
         "widths": sorted({b for p in ps for b in p["widths"]})}
        for w, ps in sorted(by.items())
    ]  # fmt: skip
    return {"buckets": dp["buckets"], "budget": bits, "paired": paired,
            "max_paired_window_ratio": max(p["ratio"] for p in paired),
            "max_paired_iteration_ratio": max(p["max_iteration_ratio"] for p in paired),
            "iterations": dp["rows"], "windows": windows,
            "max_window_ratio": max(w["ratio"] for w in windows)}  # fmt: skip


if __name__ == "__main__":
    main()
