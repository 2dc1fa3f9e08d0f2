"""``qoda bench quality``: what compression costs in sample quality, at equal steps, over seeds.

Trains the default WGAN-GP (2 workers, default data) once per row and seed, with the same steps
and evaluation, and reports per row the mean and standard deviation over seeds of the FID (EMA
and raw generator), of the exact quantization variance measured during training (rank 0's
gradient before each logged exchange, :func:`qoda.quant.variance.plan_variance`) and the bits of
one message per coordinate (every bit on the wire).  One seed is an anecdote: GAN FIDs move by
several points between seeds, so every claim compares means with the spread.

Rows (:data:`ROWS`): QODA uncompressed, global ALQ at 4 bits, layer-wise with DP bit allocation
at the same bits on the wire as global ALQ 4-bit (``dp_eq4``) and at 3 and 2.5 bits, and
ExtraAdam uncompressed and DP at ``dp_eq4``'s budget for reference.

Finished runs are kept (``<out>/<row>-s<seed>/report.json``) and reused by a rerun with the same
settings, so an interrupted study continues where it stopped; results are written after every run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qoda.train.config import TrainConfig

# ExtraAdam: the same Adam rates as the default (Adam-preconditioned) QODA
ADAM_LR = {"lr_g": 2e-4, "lr_d": 2e-4}
EQUAL_TO_GLOBAL4 = "equal"  # budget marker: the bits per coordinate of global ALQ 4-bit's message


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    optimizer: str
    compression: str
    bits: float | str = 4  # EQUAL_TO_GLOBAL4: computed from the model (see equal_budget)
    bit_allocation: str = "uniform"


ROWS = (
    Row("qoda-none", "QODA, uncompressed (fp32)", "qoda", "none", 32),
    Row("qoda-global4", "QODA, global ALQ 4-bit", "qoda", "global_adaptive", 4),
    Row("qoda-dp_eq4", "QODA, layer-wise DP, bits of global ALQ 4-bit", "qoda", "layerwise_adaptive",
        EQUAL_TO_GLOBAL4, "dp"),
    Row("qoda-dp3", "QODA, layer-wise DP 3 bits", "qoda", "layerwise_adaptive", 3, "dp"),
    Row("qoda-dp2.5", "QODA, layer-wise DP 2.5 bits", "qoda", "layerwise_adaptive", 2.5, "dp"),
    Row("extra_adam-none", "ExtraAdam, uncompressed (fp32)", "extra_adam", "none", 32),
    Row("extra_adam-dp_eq4", "ExtraAdam, layer-wise DP, bits of global ALQ 4-bit", "extra_adam",
        "layerwise_adaptive", EQUAL_TO_GLOBAL4, "dp"),
)  # fmt: skip


def equal_budget(base: TrainConfig) -> float:
    """Bits per coordinate of one global-ALQ 4-bit message of the default model (every bit on the
    wire), rounded up to 1e-4: the DP rows at this budget send at most as many bytes."""
    import math

    from torch import nn

    from qoda.codec.layerwise import fixed_message_bits
    from qoda.train.compression import layer_plan
    from qoda.train.trainer import build_models

    cfg = base.replace(compression="global_adaptive", bits=4, bit_allocation="uniform")
    generator, critic = build_models(cfg, channels=1 if cfg.dataset == "mnist" else 3)
    players = nn.ModuleDict({"generator": generator, "critic": critic})
    numel = sum(p.numel() for p in players.parameters())
    return math.floor(fixed_message_bits(layer_plan(cfg, players)) / numel * 1e4) / 1e4


def row_config(row: Row, seed: int, steps: int, workers: int, out: Path, base: TrainConfig, eq4: float) -> TrainConfig:
    bits = eq4 if row.bits == EQUAL_TO_GLOBAL4 else row.bits
    extra: dict[str, Any] = dict(ADAM_LR) if row.optimizer == "extra_adam" else {}
    if row.compression != "none":
        extra["bits"] = int(bits) if float(bits).is_integer() else float(bits)
        extra["bit_allocation"] = row.bit_allocation
    return base.replace(
        optimizer=row.optimizer, compression=row.compression, steps=steps, workers=workers, seed=seed,
        out=str(out / f"{row.name}-s{seed}"), progress=False, eval_every=max(steps // 4, 1), checkpoint_every=steps,
        sample_every=steps, overwrite=True, **extra,
    )  # fmt: skip


def _finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The report of a finished run of exactly ``cfg`` in its folder, else None."""
    folder = Path(cfg.out)
    try:
        report = json.loads((folder / "report.json").read_text())
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if cfg.trajectory_diff(saved) or report.get("steps") != cfg.steps or saved.get("workers") != cfg.workers:
        return None
    return report


KEEP = ("fid", "fid_raw", "quant_variance", "wire_bits_per_coordinate", "bytes_sent_per_step", "step_seconds",
        "widths", "seconds", "fid_extractor", "fid_samples", "fid_history")  # fmt: skip


def run_quality(
    steps: int, workers: int, out: Path, seeds: int = 3, rows: tuple[Row, ...] = ROWS,
    base: TrainConfig | None = None, json_path: Path | None = None, log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    from qoda.train.launch import train

    base = base or TrainConfig()
    eq4 = equal_budget(base)
    runs: list[dict[str, Any]] = []
    for seed in range(seeds):  # seed-major: an interrupted study has every row at the first seeds
        for row in rows:
            cfg = row_config(row, seed, steps, workers, out, base, eq4)
            report = _finished(cfg)
            if report is None:
                log(f"training {row.name} seed {seed} ({steps} steps, {workers} workers) ...")
                report = train(cfg)
                assert report is not None
            else:
                log(f"reusing {cfg.out}")
            runs.append({"row": row.name, "seed": seed, **{k: report.get(k) for k in KEEP}})
            log(f"  FID {report['fid']:.2f} (raw {report['fid_raw']:.2f}), variance {report['quant_variance']:.4g}, "
                f"{report['wire_bits_per_coordinate']:.3f} bits/coordinate")  # fmt: skip
            if json_path is not None:
                write(summarise(runs, rows, steps, workers, seeds, eq4), json_path)
    return summarise(runs, rows, steps, workers, seeds, eq4)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(
    runs: list[dict[str, Any]], rows: tuple[Row, ...], steps: int, workers: int, seeds: int, eq4: float
) -> dict[str, Any]:
    table = []
    for row in rows:
        mine = [r for r in runs if r["row"] == row.name]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "row": row.name,
            "label": row.label,
            "seeds": len(mine),
            "optimizer": row.optimizer,
            "compression": row.compression,
            "bit_allocation": row.bit_allocation,
        }
        for k in ("fid", "fid_raw", "quant_variance", "wire_bits_per_coordinate", "bytes_sent_per_step"):
            entry[k], entry[k + "_sd"] = _mean_sd([float(r[k]) for r in mine])
        entry["widths"] = mine[-1]["widths"]
        steps_seen = sorted({h["step"] for r in mine for h in r["fid_history"] or []})
        entry["fid_history"] = [  # seed means per evaluation (for qoda bench e2e's time to a target FID)
            {"step": t, "fid": statistics.fmean(h["fid"] for r in mine for h in r["fid_history"] if h["step"] == t)}
            for t in steps_seen
        ]
        table.append(entry)
    by = {e["row"]: e for e in table}
    claims: dict[str, Any] = {}
    if {"qoda-global4", "qoda-dp_eq4"} <= set(by):
        g, d = by["qoda-global4"], by["qoda-dp_eq4"]
        claims["dp_eq4_variance_over_global4"] = d["quant_variance"] / g["quant_variance"]
        claims["dp_eq4_bits_over_global4"] = d["wire_bits_per_coordinate"] / g["wire_bits_per_coordinate"]
        claims["target_dp_variance_at_most_half"] = bool(
            claims["dp_eq4_variance_over_global4"] <= 0.5 and abs(claims["dp_eq4_bits_over_global4"] - 1) <= 0.02
        )
    if {"qoda-none", "qoda-dp_eq4"} <= set(by):
        n, d = by["qoda-none"], by["qoda-dp_eq4"]
        claims["dp_eq4_fid_over_none"] = d["fid"] / n["fid"]
        claims["target_dp_fid_near_none"] = bool(
            abs(d["fid"] - n["fid"]) <= max(n["fid_sd"], d["fid_sd"]) or d["fid"] <= 1.05 * n["fid"]
        )
    for low in ("qoda-dp3", "qoda-dp2.5"):
        if {low, "qoda-global4"} <= set(by):
            claims[f"{low}_fid_over_global4"] = by[low]["fid"] / by["qoda-global4"]["fid"]
            claims[f"target_{low}_no_worse_than_global4"] = bool(
                by[low]["fid"] <= by["qoda-global4"]["fid"] + by["qoda-global4"]["fid_sd"]
            )
    return {"benchmark": "quality", "steps": steps, "workers": workers, "seeds": seeds, "dp_eq4_budget": eq4,
            "rows": table, "runs": runs, "claims": claims}  # fmt: skip


def format_quality(res: dict[str, Any]) -> str:
    first = res["runs"][0] if res["runs"] else {"fid_extractor": "?", "fid_samples": "?"}
    lines = [
        f"{res['steps']} steps, {res['workers']} workers, seeds 0..{res['seeds'] - 1}; FID {first['fid_extractor']} "
        f"features, {first['fid_samples']} samples; mean +- standard deviation over seeds",
        "",
        "| row | seeds | FID (EMA) | FID (raw) | quantization variance | bits per coordinate on the wire |",
        "|---|---|---|---|---|---|",
    ]
    for e in res["rows"]:
        qv = "-" if e["quant_variance"] == 0 else f"{e['quant_variance']:.4f} +- {e['quant_variance_sd']:.4f}"
        lines.append(
            f"| {e['label']} | {e['seeds']} | {e['fid']:.1f} +- {e['fid_sd']:.1f} | {e['fid_raw']:.1f} +- "
            f"{e['fid_raw_sd']:.1f} | {qv} | {e['wire_bits_per_coordinate']:.3f} |"
        )
    if res["claims"]:
        lines += ["", "| claim | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res["claims"].items()]
    return "\n".join(lines)


def write(res: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    md = path.with_suffix(".md")
    md.write_text(format_quality(res) + "\n")
    return md
