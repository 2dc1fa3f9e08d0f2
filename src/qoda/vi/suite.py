"""``qoda vi``: methods x problems x noise models x bits on the simulated K-worker VI suite.

Writes one JSON row per run (``problem, method, noise, bits, iterations, exchanges,
bits_sent, final_gap, slope``, plus the history), the checks of the reference's claims, and
plots of the ergodic gap against iterations and against bits sent.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from qoda.vi.problems import Noise
from qoda.vi.simulator import RunConfig, simulate

METHODS = ("gda", "eg", "og", "qgenx", "qoda", "extra_adam", "optimistic_adam")
PROBLEM_NAMES = ("bilinear", "monotone_linear", "strongly_monotone", "logistic_game")


def plan_runs(
    methods=METHODS, problems=PROBLEM_NAMES, noises=("relative", "absolute"), bits=(None, 4), extra_bits=(8,),
    iterations=3000, workers=4, d=40, sigma=0.1, seed=0,
) -> list[RunConfig]:  # fmt: skip
    runs = []
    for m, p, n, b in itertools.product(methods, problems, noises, bits):
        runs.append(RunConfig(p, m, Noise(n, sigma), b, workers, iterations, d, seed))
    for m, p, n, b in itertools.product(("qoda", "qgenx"), problems, noises, extra_bits):
        if m in methods:
            runs.append(RunConfig(p, m, Noise(n, sigma), b, workers, iterations, d, seed))
    return runs


def _run(cfg: RunConfig) -> dict:
    import torch

    torch.set_num_threads(1)
    return simulate(cfg)


def exchanges_to_reach(history: list[dict], target: float) -> float:
    """Exchanges at which the (running-min) ergodic gap first reaches ``target``, interpolated
    log-log between checkpoints."""
    best, prev = math.inf, None
    for r in history:
        best = min(best, r["gap"])
        if best <= target:
            if prev is None or prev[1] <= target:
                return float(r["exchanges"])
            (e0, g0), (e1, g1) = prev, (r["exchanges"], best)
            if g1 <= 0 or g0 == g1:
                return float(e1)
            frac = math.log(g0 / target) / math.log(g0 / g1)
            return math.exp(math.log(e0) + frac * (math.log(e1) - math.log(e0)))
        prev = (r["exchanges"], best)
    return math.inf


def claims(rows: list[dict]) -> dict:
    """The reference's claims, evaluated on these rows (numbers, not pass/fail)."""

    def find(problem, method, noise, bits):
        return next(
            (r for r in rows if (r["problem"], r["method"], r["noise"], r["bits"]) == (problem, method, noise, bits)),
            None,
        )

    out: dict = {
        "gda_diverges_on_bilinear": {},
        "qoda_slopes": {},
        "qoda_vs_qgenx_exchanges": {},
        "quantized_vs_unquantized": {},
    }
    for noise in ("relative", "absolute"):
        g = find("bilinear", "gda", noise, 32)
        if g:
            out["gda_diverges_on_bilinear"][noise] = {"final_gap": g["final_gap"], "slope": g["slope"]}
        for problem in ("bilinear", "monotone_linear"):
            for bits in (32, 4):
                r = find(problem, "qoda", noise, bits)
                if r:
                    out["qoda_slopes"][f"{problem}/{noise}/{bits}b"] = r["slope"]
        for problem in PROBLEM_NAMES:
            q, x = find(problem, "qoda", noise, 32), find(problem, "qgenx", noise, 32)
            if q and x:  # the gap both reach: the larger of the two final gaps
                target = max(q["final_gap"], x["final_gap"])
                eq, ex = exchanges_to_reach(q["history"], target), exchanges_to_reach(x["history"], target)
                out["qoda_vs_qgenx_exchanges"][f"{problem}/{noise}"] = {"target_gap": target, "qoda": eq, "qgenx": ex,
                                                                        "ratio": eq / ex if ex else None}  # fmt: skip
            q4, q32 = find(problem, "qoda", noise, 4), find(problem, "qoda", noise, 32)
            if q4 and q32:
                out["quantized_vs_unquantized"][f"{problem}/{noise}"] = q4["final_gap"] / q32["final_gap"]
    return out


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for noise in sorted({r["noise"] for r in rows}):
        problems = sorted({r["problem"] for r in rows})
        fig, axes = plt.subplots(2, len(problems), figsize=(4.2 * len(problems), 7.5), squeeze=False)
        for j, problem in enumerate(problems):
            for r in rows:
                if r["problem"] != problem or r["noise"] != noise or r["method"] == "gda":
                    continue
                label = f"{r['method']} {r['bits']}b"
                ts = [h["t"] for h in r["history"]]
                gaps = [h["gap"] for h in r["history"]]
                bits = [h.get("bits_sent", 0) for h in r["history"]]
                style = "-" if r["bits"] == 32 else ("--" if r["bits"] == 8 else ":")
                color = f"C{METHODS.index(r['method']) % 10}"
                axes[0, j].loglog(ts, gaps, style, color=color, label=label)
                axes[1, j].loglog([max(b, 1) for b in bits], gaps, style, color=color, label=label)
            axes[0, j].set_title(f"{problem} ({noise} noise)")
            axes[0, j].set_xlabel("iterations")
            axes[1, j].set_xlabel("bits sent per worker")
            axes[0, j].set_ylabel("restricted gap (ergodic)")
            axes[1, j].set_ylabel("restricted gap (ergodic)")
        axes[0, 0].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        path = out_dir / f"vi_{noise}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run_suite(runs: list[RunConfig], jobs: int | None = None, log=print) -> dict:
    jobs = jobs or min(2, os.cpu_count() or 1)
    rows = []
    with ProcessPoolExecutor(jobs) as pool:
        for cfg, r in zip(runs, pool.map(_run, runs), strict=True):
            rows.append(r)
            log(f"{cfg.problem:17s} {cfg.method:15s} {cfg.noise.kind:8s} {r['bits']:2d}b  gap {r['final_gap']:.3e}  "
                f"slope {r['slope']:+.2f}  exchanges {r['exchanges']}")  # fmt: skip
    return {"benchmark": "vi", "rows": rows, "claims": claims(rows)}


def _finite(obj: object) -> object:
    """Strict JSON: non-finite numbers (a diverged run's gap) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write(res: dict, path: Path) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(res), indent=1, allow_nan=False) + "\n")
    return plot(res["rows"], path.parent)
