"""``qoda bench quality``: what compression costs in sample quality, at equal steps.

Trains the default WGAN-GP (2 workers, default data) once per row of
``{none, fp16, qsgd 4-bit, layer-wise adaptive 4-bit} x {QODA, ExtraAdam}`` with the same
seed, steps and evaluation, and reports FID, bits per step and step time.  The issue's target:
QODA with layer-wise 4-bit within 10% of unquantized QODA's FID.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qoda.train.config import TrainConfig

COMPRESSIONS = ("none", "fp16", "qsgd", "layerwise_adaptive")
OPTIMIZERS = ("qoda", "extra_adam")
# ExtraAdam: the same Adam rates as the default (Adam-preconditioned) QODA
ADAM_LR = {"lr_g": 2e-4, "lr_d": 2e-4}


def quality_configs(steps: int, workers: int, out: Path, base: TrainConfig | None = None) -> list[TrainConfig]:
    base = base or TrainConfig()
    rows = []
    for opt in OPTIMIZERS:
        for comp in COMPRESSIONS:
            lr = ADAM_LR if opt == "extra_adam" else {}
            rows.append(base.replace(optimizer=opt, compression=comp, steps=steps, workers=workers,
                                     out=str(out / f"{opt}-{comp}"), progress=False, eval_every=max(steps // 4, 1),
                                     checkpoint_every=steps, sample_every=steps, **lr))  # fmt: skip
    return rows


def run_quality(steps: int, workers: int, out: Path, log=print) -> dict[str, Any]:
    from qoda.train.launch import train

    rows = []
    for cfg in quality_configs(steps, workers, out):
        log(f"training {cfg.optimizer} / {cfg.compression} for {steps} steps on {workers} workers ...")
        r = train(cfg)
        assert r is not None
        rows.append({k: r[k] for k in ("optimizer", "compression", "bits", "mode", "steps", "fid", "fid_extractor",
                                       "fid_samples", "bits_per_step", "compression_ratio", "step_seconds",
                                       "seconds", "quant_variance", "fid_history", "allocator")})  # fmt: skip
        log(f"  FID {r['fid']:.2f}, {r['compression_ratio']:.1f}x compression, {r['step_seconds']:.3f} s/step")
    by = {(r["optimizer"], r["compression"]): r for r in rows}
    claims = {}
    for opt in OPTIMIZERS:
        ref, lw = by[(opt, "none")]["fid"], by[(opt, "layerwise_adaptive")]["fid"]
        claims[f"{opt}_layerwise4_over_none"] = lw / ref
    claims["target_qoda_within_10pct"] = claims["qoda_layerwise4_over_none"] <= 1.10
    return {"steps": steps, "workers": workers, "rows": rows, "claims": claims}


def format_quality(res: dict[str, Any]) -> str:
    lines = [
        f"| optimizer | compression | FID ({res['rows'][0]['fid_extractor']}, {res['rows'][0]['fid_samples']} samples)"
        " | FID / uncompressed | MB sent per step per worker | compression |",
        "|---|---|---|---|---|---|",
    ]
    ref = {r["optimizer"]: r["fid"] for r in res["rows"] if r["compression"] == "none"}
    for r in res["rows"]:
        name = {"none": "none (fp32)", "fp16": "fp16", "qsgd": f"QSGD {r['bits']}-bit",
                "layerwise_adaptive": f"layer-wise adaptive {r['bits']}-bit"}[r["compression"]]  # fmt: skip
        lines.append(
            f"| {r['optimizer']} | {name} | {r['fid']:.2f} | {r['fid'] / ref[r['optimizer']]:.3f} | "
            f"{r['bits_per_step'] / 8e6:.3f} | {r['compression_ratio']:.1f}x |"
        )
    return "\n".join(lines)


def write(res: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    md = path.with_suffix(".md")
    md.write_text(format_quality(res) + "\n")
    return md
