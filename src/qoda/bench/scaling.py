"""``qoda bench scaling``: an alpha-beta model of a training step, fed with measurements.

Per iteration a worker computes its oracle calls (``C``, measured: the compute-only rows of
``qoda bench e2e``) and runs ``x`` exchanges (1 for Adam/QODA, 2 for the extra-gradient
methods).  With ``K`` workers, per-message latency ``alpha`` and link goodput ``beta`` bytes/s,
one exchange costs what :mod:`qoda.comm.cost` says its protocol costs (the same arithmetic as
the averagers' own byte counts): ``latency_terms * alpha + payload_bytes / beta``, plus, for
the quantized modes, the codec times ``E(n) = 4n / enc`` and ``D(n) = 4n / dec`` for ``n``
parameters (measured on this model's messages, see :func:`workload_from`; divided by the CPU
share ``min(1, cores / K)`` when K processes share fewer cores)::

    fp32, fp16, PowerSGD   cost.fp32 / cost.fp16 / cost.powersgd (f floats, measured)
    qoda allgather         cost.allgather(K, m) + E(n) + K D(n)       (every worker decodes all K)
    qoda two-phase         cost.two_phase(K, K chunks of m / K) + (1 + 1/K) E(n) + 2 D(n)
                           (decode + re-encode the own chunk; chunk headers neglected)

    step = C + x * exchange + x finite-check all-reduces (latency terms of cost.ring_allreduce)

with ``m`` the measured quantized message of one worker (bytes) and ``f`` PowerSGD's floats.

``beta`` is the tbf rate times the TCP goodput of a 1500-byte MTU frame, 1448/1538 (IP and
TCP-with-timestamps headers, Ethernet framing): arithmetic, not fitted.  ``alpha`` is fitted
once per measured setting from a one-float all-reduce (the latency terms of ``cost.ring_allreduce``).

Validation: every measured e2e row is predicted from its own setting's compute-only time and
latency, and the relative error is reported per row.  Extrapolation to 4-64 workers at
1-100 Gbit/s uses the 2-worker compute time (one core per worker, as one GPU per worker), in
two regimes: the per-worker batch fixed (weak scaling) and the global batch fixed at the
measured 4-worker total (strong scaling, as in the paper, where compute per worker falls as
``1/K``).  Compute is assumed linear in the batch.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qoda.bench.e2e import calls_of, compute_bound_of
from qoda.comm import cost

MTU_GOODPUT = 1448 / 1538  # TCP payload per Ethernet frame on a 1500-byte MTU
WORKERS = (4, 8, 12, 16, 32, 64)
RATES_GBIT = (1.0, 2.5, 5.0, 10.0, 100.0)
PAPER = {4: 1.28, 8: 1.83, 12: 2.50, 16: 2.47}  # QODA layer-wise over uncompressed (reference, section 5)


class ScalingInputError(ValueError):
    """A measurement file is missing or lacks the rows the model needs."""


@dataclass(frozen=True)
class Network:
    alpha: float  # seconds per message
    beta: float  # bytes per second (goodput)

    @classmethod
    def of(cls, rate_mbit: float, alpha: float) -> Network:
        return cls(alpha, rate_mbit * 1e6 / 8 * MTU_GOODPUT)


@dataclass(frozen=True)
class Workload:
    """What one exchange moves and costs, from the measurements."""

    parameters: int  # n
    message_bytes: dict[str, float]  # quantized message per worker, per aggregation config
    powersgd_floats: float  # floats per worker in PowerSGD's all-reduces
    encode_gbps: float  # codec on this model's messages, one uncontended core (GB/s of float32 input)
    decode_gbps: float
    cpu_share: float = 1.0  # cores per worker process when fewer cores than workers (codec runs slower)


def exchange_cost(kind: str, k: int, w: Workload) -> cost.ExchangeCost:
    """Bytes and latency terms of one exchange of ``kind`` (see :func:`exchange_seconds`) among ``k``
    workers, from the measured sizes."""
    n = float(w.parameters)  # real-valued: a ring's bytes are a mean over ranks, not rounded down
    if kind == "fp32":
        return cost.fp32(k, n)
    if kind == "fp16":
        return cost.fp16(k, n)
    if kind == "powersgd":
        return cost.powersgd(k, w.powersgd_floats)
    mode, _, cfg = kind.partition(":")
    if mode not in ("allgather", "two_phase") or cfg not in w.message_bytes:
        raise ValueError(f"kind: unknown exchange {kind!r}")
    m = w.message_bytes[cfg]
    if mode == "allgather":
        return cost.allgather(k, m)
    return cost.two_phase(k, [m / k] * k)  # an even split of the message (chunk headers neglected)


def exchange_seconds(kind: str, k: int, net: Network, w: Workload) -> float:
    """One exchange of ``kind`` (``fp32``, ``fp16``, ``powersgd``, ``allgather:<cfg>``,
    ``two_phase:<cfg>``) among ``k`` workers: network time, and codec time for the quantized modes."""
    if k == 1:
        return 0.0
    network = exchange_cost(kind, k, w).seconds(net.alpha, net.beta)
    enc = 4 * w.parameters / (w.encode_gbps * 1e9 * w.cpu_share)
    dec = 4 * w.parameters / (w.decode_gbps * 1e9 * w.cpu_share)
    mode = kind.partition(":")[0]
    if mode == "allgather":  # encode one message, decode all K
        return network + enc + k * dec
    if mode == "two_phase":  # encode the K chunks and the own average; decode K own chunks, the K averages
        return network + (1 + 1 / k) * enc + 2 * dec
    return network


def _check_latency(k: int) -> int:
    """Latency terms of the finite-gradient check (one small all-reduce per oracle call), and of
    the one-float all-reduce ``alpha`` is fitted from."""
    return cost.ring_allreduce(k, 4).latency_terms


#: e2e config -> exchange kind it is modelled by; its exchanges per iteration come from the
#: optimizer registry and its compute bound from the e2e bench (:func:`qoda.bench.e2e.calls_of`).
MODELLED: dict[str, str] = {
    "fp32": "fp32",
    "fp16": "fp16",
    "powersgd": "powersgd",
    "extragradient_fp32": "fp32",
    "qgenx_8bit": "allgather:qgenx_8bit",
    "qoda_fp32": "fp32",
    "qoda_lw4_allgather": "allgather:qoda_lw4",
    "qoda_lw4_two_phase": "two_phase:qoda_lw4",
}


def step_seconds(config: str, k: int, net: Network, w: Workload, compute: float) -> float:
    kind, x = MODELLED[config], calls_of(config)
    checks = x * _check_latency(k) * net.alpha  # the per-call finite-gradient all-reduce
    return compute + x * exchange_seconds(kind, k, net, w) + checks


# ---------------------------------------------------------------------------- inputs
def _load(path: Path, what: str) -> dict[str, Any]:
    if not Path(path).exists():
        raise ScalingInputError(f"{what}: {path} not found (run `qoda bench {what}` first)")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ScalingInputError(f"{what}: {path} is not valid JSON: {e}") from None


def workload_from(e2e: dict[str, Any], codec: dict[str, Any]) -> Workload:
    """Sizes and codec speed.  The codec speed is the *effective* one on this model's messages,
    measured in the 2-worker allgather rows (each worker on its own core; ``encode_seconds``
    per exchange for one message, ``decode_seconds`` for K of them): it includes the per-layer
    and per-segment overheads of a 0.6M-parameter model's 22 small tensors, which the kernel
    throughput of ``qoda bench codec`` (one 16M-float tensor) does not.  Both are reported."""
    rows = e2e.get("rows", [])

    def message(cfg: str) -> float:
        # each worker's message, from the bytes an allgather exchange sent
        cands = [r for r in rows if r["config"] == cfg and r["workers"] > 1]
        if not cands:
            raise ScalingInputError(f"e2e: no {cfg!r} rows: cannot size its message")
        return statistics.median(
            cost.allgather_message_bytes(r["workers"], r["bytes_sent_per_exchange"]) for r in cands
        )

    ps = [r for r in rows if r["config"] == "powersgd"]
    fp32 = [r for r in rows if r["config"] == "fp32"]
    if not fp32:
        raise ScalingInputError("e2e: no fp32 rows")
    n = int(fp32[0]["parameters"])
    ag = [r for r in rows if r["config"] == "qoda_lw4_allgather" and r["workers"] == 2 and r.get("encode_seconds")]
    if ag:
        enc = 4 * n / statistics.median(r["encode_seconds"] for r in ag) / 1e9
        dec = 4 * n * 2 / statistics.median(r["decode_seconds"] for r in ag) / 1e9
    else:  # no 2-worker allgather measurement: the kernel throughput (optimistic for small layers)
        enc, dec = float(codec["encode_gbps"]), float(codec["decode_gbps"])
    return Workload(
        parameters=n,
        message_bytes={"qoda_lw4": message("qoda_lw4_allgather"), "qgenx_8bit": message("qgenx_8bit")},
        powersgd_floats=statistics.median(r["payload_bits_per_exchange"] / 32 for r in ps) if ps else float("nan"),
        encode_gbps=enc,
        decode_gbps=dec,
    )


def validate(e2e: dict[str, Any], w: Workload) -> list[dict[str, Any]]:
    """Predict every measured row from its own setting's compute-only time and latency."""
    rows = e2e["rows"]
    out = []
    for r in rows:
        if r["config"] not in MODELLED:
            continue
        k, rate = r["workers"], r["bandwidth_mbit"]
        bound = next((b for b in rows if b["config"] == compute_bound_of(r["config"]) and b["workers"] == k
                      and b["bandwidth_mbit"] == rate), None)  # fmt: skip
        if bound is None:
            continue
        net = Network.of(rate, r["allreduce_latency_seconds"] / _check_latency(k))
        cores = int(e2e.get("cores") or k)
        share = replace(w, cpu_share=min(1.0, cores / k))  # K processes on fewer cores
        pred = step_seconds(r["config"], k, net, share, bound["step_seconds"])
        out.append({
            "config": r["config"], "workers": k, "bandwidth_mbit": rate, "measured_seconds": r["step_seconds"],
            "predicted_seconds": pred, "error": pred / r["step_seconds"] - 1.0,
            "alpha_seconds": net.alpha,
        })  # fmt: skip
    return out


def predict(
    w: Workload, compute_1call: float, compute_2call: float, alpha: float, per_worker_batch: int, strong_total: int
) -> list[dict[str, Any]]:
    """Step times and speed-ups for :data:`WORKERS` x :data:`RATES_GBIT`, both regimes."""
    rows = []
    for regime in ("weak", "strong"):
        for k in WORKERS:
            scale = 1.0 if regime == "weak" else strong_total / (k * per_worker_batch)
            c1, c2 = compute_1call * scale, compute_2call * scale
            for g in RATES_GBIT:
                net = Network.of(g * 1000, alpha)
                t = {c: step_seconds(c, k, net, w, c2 if calls_of(c) == 2 else c1) for c in MODELLED}
                best = min(t["qoda_lw4_allgather"], t["qoda_lw4_two_phase"])
                mode = "allgather" if t["qoda_lw4_allgather"] <= t["qoda_lw4_two_phase"] else "two_phase"
                rows.append({
                    "regime": regime, "workers": k, "bandwidth_gbit": g, "step_seconds": t,
                    "compute_seconds": c1,
                    "qoda_speedup_vs_fp32": t["fp32"] / best,
                    "qoda_speedup_vs_extragradient_fp32": t["extragradient_fp32"] / best,
                    "best_qoda_mode": mode,
                })  # fmt: skip
    return rows


def run_scaling(e2e_path: Path, codec_path: Path) -> dict[str, Any]:
    e2e, codec = _load(e2e_path, "e2e"), _load(codec_path, "codec")
    w = workload_from(e2e, codec)
    checks = validate(e2e, w)
    rows = e2e["rows"]
    two = [r for r in rows if r["workers"] == 2]
    c1 = [r["step_seconds"] for r in two if r["config"] == "compute_only"]
    c2 = [r["step_seconds"] for r in two if r["config"] == "compute_only_2call"]
    if not c1 or not c2:
        raise ScalingInputError("e2e: needs 2-worker compute_only and compute_only_2call rows")
    alpha = statistics.median(c["alpha_seconds"] for c in checks) if checks else 50e-6
    batch = int(rows[0].get("batch_per_worker", 64))
    preds = predict(w, statistics.median(c1), statistics.median(c2), alpha, batch, 4 * batch)
    paper = []
    for k, published in PAPER.items():
        strong = {r["bandwidth_gbit"]: r for r in preds if r["regime"] == "strong" and r["workers"] == k}
        weak = {r["bandwidth_gbit"]: r for r in preds if r["regime"] == "weak" and r["workers"] == k}
        paper.append({
            "workers": k, "published_speedup": published,
            **{f"model_strong_{g:g}gbit": strong[g]["qoda_speedup_vs_fp32"] for g in (1.0, 2.5, 5.0)},
            **{f"model_weak_{g:g}gbit": weak[g]["qoda_speedup_vs_fp32"] for g in (1.0, 2.5, 5.0)},
            "model_strong_1gbit_vs_extragradient": strong[1.0]["qoda_speedup_vs_extragradient_fp32"],
        })  # fmt: skip
    errs = [abs(c["error"]) for c in checks]
    return {
        "benchmark": "scaling",
        "model": "alpha-beta; see qoda.bench.scaling",
        "inputs": {
            "parameters": w.parameters,
            "message_bytes": w.message_bytes,
            "powersgd_floats": w.powersgd_floats,
            "encode_gbps": w.encode_gbps,
            "decode_gbps": w.decode_gbps,
            "kernel_encode_gbps": float(codec["encode_gbps"]),
            "kernel_decode_gbps": float(codec["decode_gbps"]),
            "cores": e2e.get("cores"),
            "allocator": e2e.get("allocator"),
            "alpha_seconds": alpha,
            "goodput_fraction": MTU_GOODPUT,
            "compute_1call_seconds": statistics.median(c1),
            "compute_2call_seconds": statistics.median(c2),
            "per_worker_batch": batch,
            "strong_global_batch": 4 * batch,
        },
        "validation": checks,
        "max_abs_error": max(errs) if errs else None,
        "rows_within_15_percent": sum(e <= 0.15 for e in errs),
        "rows_validated": len(errs),
        "predictions": preds,
        "paper": paper,
    }


def format_scaling(res: dict[str, Any]) -> str:
    lines = [
        "Model vs measurement (qoda bench e2e):",
        "",
        "| workers | Mbit/s | config | measured s | predicted s | error |",
        "|---|---|---|---|---|---|",
    ]
    for c in res["validation"]:
        lines.append(
            f"| {c['workers']} | {c['bandwidth_mbit']:g} | {c['config']} | {c['measured_seconds']:.3f} | "
            f"{c['predicted_seconds']:.3f} | {c['error']:+.1%} |"
        )
    lines += [
        f"\n{res['rows_within_15_percent']} of {res['rows_validated']} rows within 15%; "
        f"largest error {res['max_abs_error']:.1%}"
        if res["max_abs_error"] is not None
        else "",
        "",
        "QODA layer-wise 4-bit (best mode) over Adam fp32, predicted:",
        "",
        "| regime | workers | " + " | ".join(f"{g:g} Gbit/s" for g in RATES_GBIT) + " |",
        "|---|---|" + "---|" * len(RATES_GBIT),
    ]
    for regime in ("weak", "strong"):
        for k in WORKERS:
            cells = [r for r in res["predictions"] if r["regime"] == regime and r["workers"] == k]
            lines.append(
                f"| {regime} | {k} | "
                + " | ".join(f"{r['qoda_speedup_vs_fp32']:.2f}x ({r['best_qoda_mode'][0]})" for r in cells)
                + " |"
            )
    lines += ["", "Published (reference section 5) vs model (strong scaling):", "",
              "| GPUs | published | model 1 Gbit/s | 2.5 Gbit/s | 5 Gbit/s | model 1 Gbit/s vs ExtraAdam |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for p in res["paper"]:
        lines.append(
            f"| {p['workers']} | {p['published_speedup']:.2f}x | {p['model_strong_1gbit']:.2f}x | "
            f"{p['model_strong_2.5gbit']:.2f}x | {p['model_strong_5gbit']:.2f}x | "
            f"{p['model_strong_1gbit_vs_extragradient']:.2f}x |"
        )
    return "\n".join(lines)


def plot_scaling(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, regime in zip(axes, ("weak", "strong"), strict=True):
        for g in RATES_GBIT:
            pts = [(r["workers"], r["qoda_speedup_vs_fp32"]) for r in res["predictions"]
                   if r["regime"] == regime and r["bandwidth_gbit"] == g]  # fmt: skip
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{g:g} Gbit/s")
        if regime == "strong":
            ax.plot(list(PAPER), list(PAPER.values()), "k*", ms=10, label="published (GPUs)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_ylabel("QODA layer-wise 4-bit step speed-up over fp32")
        ax.set_title(f"{regime} scaling (model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
