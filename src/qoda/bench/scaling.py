"""``qoda bench scaling``: the step-time model (:mod:`qoda.comm.step_time`) fed with measurements.

The model (its formulas: :mod:`qoda.comm.step_time`) prices each exchange by its protocol's own
cost and codec work; here it is fed: the compute per oracle call ``C`` (the compute-only rows of
``qoda bench e2e``), the measured message of each aggregation config, the codec speed measured
on this model's messages (see :func:`workload_from`), PowerSGD's floats and its overhead ``P``
(below), and ``alpha`` fitted per measured setting.  Each e2e config is modelled by an exchange
kind (:data:`MODELLED`) and its exchanges per iteration (the optimizer registry)::

    step = C + x * exchange + x finite-check all-reduces

**PowerSGD's overhead** ``P``: PyTorch's hook runs three dependent all-reduces (the 1-D
tensors, then ``P = M Q``, then ``Q = M^T P``) with its compression compute between them
(error feedback, the P/Q matmuls, orthogonalisation, decompression).  ``P`` is the hook's time
beyond the alpha-beta time of its three all-reduces, measured in the 2-worker PowerSGD rows
(one core per worker; ``encode + comm + decode`` of the averager's clocks minus
``cost.powersgd``'s seconds at that row's ``alpha`` and ``beta``), as the effective codec speed
is.  The e2e runs also time the hook alone on one-rank groups (``powersgd_compress_seconds``:
the pure compression compute, reported beside ``P``); on this 2-core VM it is about a sixth of
``P``, the rest being the ranks waiting on each other between the dependent collectives.
Measuring the whole overhead was chosen over a FLOP count (the matmuls are ~4 n r FLOPs, under
a millisecond) because the FLOPs leave out what costs: the serialisation.

``beta`` is the tbf rate times the TCP goodput of a 1500-byte MTU frame, 1448/1538 (IP and
TCP-with-timestamps headers, Ethernet framing; :data:`qoda.comm.step_time.MTU_GOODPUT`):
arithmetic, not fitted.  ``alpha`` is fitted once per measured setting from a one-float
all-reduce (:func:`qoda.comm.step_time.check_latency_terms`).

Validation: every measured e2e row is predicted from its own setting's compute-only time and
latency, and the relative error is reported per row.  Extrapolation to 4-64 workers at
1-100 Gbit/s uses the 2-worker compute time (one core per worker, as one GPU per worker), in
two regimes: the per-worker batch fixed (weak scaling) and the global batch fixed at the
measured 4-worker total (strong scaling, as in the paper, where compute per worker falls as
``1/K``).  Compute is assumed linear in the batch.

**Where the paper stands** (:func:`paper_section`): the published speed-ups are inverted for
the paper's workload, the ResNet WGAN-GP pair at width 128 (``n`` = both players' parameters)
at 1 Gbit/s.  With ``X_c`` the model's non-compute time of a step of config ``c``, the speed-up
``S = (C + X_fp32) / (C + X_qoda)`` is reached at ``C = (X_fp32 - S X_qoda) / (S - 1)`` per
worker and step.  That compute is set against the FLOPs of one QODA oracle call (counted with
PyTorch's FLOP formulas on a forward + backward, gradient penalty included) at the per-GPU
batch of the paper's global batch 1024 (:data:`PAPER_GLOBAL_BATCH`) over ``K`` GPUs, as the
fraction of a V100's fp32 peak it would need.
"""

from __future__ import annotations

import functools
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from qoda.bench.e2e import calls_of, compute_bound_of
from qoda.comm import cost
from qoda.comm.step_time import (
    MTU_GOODPUT,
    Network,
    Workload,
    check_latency_terms,
    exchange_seconds,
    is_entropy,
    iteration_seconds,
)

WORKERS = (4, 8, 12, 16, 32, 64)
RATES_GBIT = (1.0, 2.5, 5.0, 10.0, 100.0)
PAPER = {4: 1.28, 8: 1.83, 12: 2.50, 16: 2.47}  # QODA layer-wise over uncompressed (docs/method.md section 5)
PAPER_WIDTH = 128  # ResNet filters (docs/method.md section 5)
PAPER_GLOBAL_BATCH = 1024  # the Q-GenX code base's global batch (docs/method.md section 5), split over the GPUs
PAPER_RATE_GBIT = 1.0  # the lowest bandwidth of the paper's sweep, where its gains are largest
GPU_NAME = "V100 (SXM2) fp32"
GPU_PEAK_TFLOPS = 15.7
GPU_UTILISATION = 0.4  # an assumed sustained share of peak for 3x3 convolutions at 32x32 in fp32


class ScalingInputError(ValueError):
    """A measurement file is missing or lacks the rows the model needs."""


#: the model's names, read from here by the tests and the CLI as before
__all__ = [
    "MTU_GOODPUT", "Network", "ScalingInputError", "Workload", "exchange_seconds", "format_scaling",
    "is_entropy", "plot_scaling", "run_scaling", "step_seconds",
]  # fmt: skip


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
    "qoda_lw4_entropy_allgather": "allgather:qoda_lw4_entropy",
    "qoda_lw4_entropy_two_phase": "two_phase:qoda_lw4_entropy",
}
#: measured message (``Workload.message_bytes`` key) -> the e2e configs that size it (allgather first)
MESSAGES: dict[str, tuple[str, ...]] = {
    "qoda_lw4": ("qoda_lw4_allgather",),
    "qgenx_8bit": ("qgenx_8bit",),
    "qoda_lw4_entropy": ("qoda_lw4_entropy_allgather", "qoda_lw4_entropy_two_phase"),
}


def modelled(config: str, w: Workload) -> bool:
    """Whether ``w`` holds what ``config``'s exchange needs (an old e2e file has no entropy rows)."""
    kind = MODELLED.get(config)
    return kind is not None and (":" not in kind or kind.partition(":")[2] in w.message_bytes)


def step_seconds(config: str, k: int, net: Network, w: Workload, compute: float) -> float:
    """One iteration of e2e config ``config`` (its exchange kind, its exchanges per iteration)."""
    return iteration_seconds(MODELLED[config], calls_of(config), k, net, w, compute)


# ---------------------------------------------------------------------------- inputs
def _load(path: Path, what: str) -> dict[str, Any]:
    if not Path(path).exists():
        raise ScalingInputError(f"{what}: {path} not found (run `qoda bench {what}` first)")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ScalingInputError(f"{what}: {path} is not valid JSON: {e}") from None


def _row_alpha(r: dict[str, Any]) -> float:
    return r["allreduce_latency_seconds"] / check_latency_terms(r["workers"])


def _bits_per_coordinate(rows: list[dict[str, Any]], cfg: str) -> float | None:
    """Code bits per coordinate of one message (``payload_bits_per_exchange / n``), median over rows."""
    got = [r["payload_bits_per_exchange"] / r["parameters"] for r in rows
           if r["config"] == cfg and r["workers"] > 1 and r.get("payload_bits_per_exchange")]  # fmt: skip
    return statistics.median(got) if got else None


def _messages(rows: list[dict[str, Any]], n: int) -> dict[str, float]:
    """Each measured message per worker (bytes): from the bytes an allgather exchange sent; an
    entropy-coded message measured in two-phase rows only: the fixed-width message plus the
    difference of their code bits."""
    out: dict[str, float] = {}
    for key, cfgs in MESSAGES.items():
        ag = [r for r in rows if r["config"] == cfgs[0] and r["workers"] > 1]
        if ag:
            out[key] = statistics.median(
                cost.allgather_message_bytes(r["workers"], r["bytes_sent_per_exchange"], sized=is_entropy(key))
                for r in ag
            )
        elif is_entropy(key) and "qoda_lw4" in out:
            ent, fixed = _bits_per_coordinate(rows, cfgs[1]), _bits_per_coordinate(rows, "qoda_lw4_two_phase")
            if ent is not None and fixed is not None:
                out[key] = out["qoda_lw4"] + (ent - fixed) * n / 8
    for key in ("qoda_lw4", "qgenx_8bit"):
        if key not in out:
            raise ScalingInputError(f"e2e: no {MESSAGES[key][0]!r} rows: cannot size its message")
    return out


def _codec_row(codec: dict[str, Any], coding: str, bits: int = 4) -> dict[str, Any] | None:
    return next((r for r in codec.get("rows", []) if r.get("coding") == coding and r.get("bits") == bits), None)


def _effective_codec(rows: list[dict[str, Any]], cfg: str, n: int) -> tuple[float, float] | None:
    """Codec GB/s on this model's messages from the 2-worker allgather rows of ``cfg``: one
    message encoded (``encode_seconds``), two decoded (``decode_seconds``)."""
    ag = [r for r in rows if r["config"] == cfg and r["workers"] == 2 and r.get("encode_seconds")]
    if not ag:
        return None
    enc = 4 * n / statistics.median(r["encode_seconds"] for r in ag) / 1e9
    dec = 4 * n * 2 / statistics.median(r["decode_seconds"] for r in ag) / 1e9
    return enc, dec


def powersgd_overhead(rows: list[dict[str, Any]], floats: float) -> float:
    """``P``: median over the 2-worker PowerSGD rows of the hook's time (``encode + comm + decode``)
    minus the alpha-beta time of its all-reduces at that row's latency and rate (at least 0);
    without such rows the pure compression compute (``powersgd_compress_seconds``), else 0."""
    two = [r for r in rows if r["config"] == "powersgd" and r["workers"] == 2 and "comm_seconds" in r]
    if two:
        return max(0.0, statistics.median(
            r["encode_seconds"] + r["comm_seconds"] + r["decode_seconds"]
            - cost.powersgd(2, floats).seconds(_row_alpha(r), Network.of(r["bandwidth_mbit"], 0).beta)
            for r in two
        ))  # fmt: skip
    compress = [r["powersgd_compress_seconds"] for r in rows if r.get("powersgd_compress_seconds")]
    return statistics.median(compress) if compress else 0.0


def workload_from(e2e: dict[str, Any], codec: dict[str, Any]) -> Workload:
    """Sizes, codec speed and PowerSGD's overhead.  The codec speed is the *effective* one on this
    model's messages, measured in the 2-worker allgather rows (each worker on its own core;
    ``encode_seconds`` per exchange for one message, ``decode_seconds`` for K of them): it
    includes the per-layer and per-segment overheads of a 0.6M-parameter model's 22 small
    tensors, which the kernel throughput of ``qoda bench codec`` (one 16M-float tensor) does not.
    Both are reported.  Entropy-coded messages: the same from their own rows, else the codec
    bench's entropy rows at 4 bits (kernel throughput)."""
    rows = e2e.get("rows", [])
    fp32 = [r for r in rows if r["config"] == "fp32"]
    if not fp32:
        raise ScalingInputError("e2e: no fp32 rows")
    n = int(fp32[0]["parameters"])
    ps = [r for r in rows if r["config"] == "powersgd"]
    floats = statistics.median(r["payload_bits_per_exchange"] / 32 for r in ps) if ps else float("nan")
    messages = _messages(rows, n)
    fixed = _effective_codec(rows, "qoda_lw4_allgather", n)
    # no 2-worker allgather measurement: the kernel throughput (optimistic for small layers)
    enc, dec = fixed or (float(codec["encode_gbps"]), float(codec["decode_gbps"]))
    codecs: dict[str, tuple[float, float]] = {}
    if "qoda_lw4_entropy" in messages:
        ent = _effective_codec(rows, "qoda_lw4_entropy_allgather", n)
        bench = _codec_row(codec, "entropy")
        if ent is None and bench is None:
            raise ScalingInputError("codec: no entropy row at 4 bits and no 2-worker entropy allgather row")
        codecs["qoda_lw4_entropy"] = ent or (float(bench["encode_gbps"]), float(bench["decode_gbps"]))  # type: ignore[index]
    return Workload(
        parameters=n,
        message_bytes=messages,
        powersgd_floats=floats,
        encode_gbps=enc,
        decode_gbps=dec,
        codec_gbps=codecs,
        powersgd_overhead_seconds=powersgd_overhead(rows, floats) if ps else 0.0,
    )


def validate(e2e: dict[str, Any], w: Workload) -> list[dict[str, Any]]:
    """Predict every measured row from its own setting's compute-only time and latency."""
    rows = e2e["rows"]
    out = []
    for r in rows:
        if not modelled(r["config"], w):
            continue
        k, rate = r["workers"], r["bandwidth_mbit"]
        bound = next((b for b in rows if b["config"] == compute_bound_of(r["config"]) and b["workers"] == k
                      and b["bandwidth_mbit"] == rate), None)  # fmt: skip
        if bound is None:
            continue
        net = Network.of(rate, _row_alpha(r))
        cores = int(e2e.get("cores") or k)
        share = replace(w, cpu_share=min(1.0, cores / k))  # K processes on fewer cores
        pred = step_seconds(r["config"], k, net, share, bound["step_seconds"])
        out.append({
            "config": r["config"], "workers": k, "bandwidth_mbit": rate, "measured_seconds": r["step_seconds"],
            "measured_iqr": r.get("step_seconds_iqr"),
            "predicted_seconds": pred, "error": pred / r["step_seconds"] - 1.0,
            "alpha_seconds": net.alpha,
        })  # fmt: skip
    return out


def _best(t: dict[str, float], prefix: str) -> tuple[float, str]:
    ag, tp = t.get(f"{prefix}_allgather"), t.get(f"{prefix}_two_phase")
    if ag is None or tp is None:
        return float("nan"), ""
    return (ag, "allgather") if ag <= tp else (tp, "two_phase")


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
                t = {c: step_seconds(c, k, net, w, c2 if calls_of(c) == 2 else c1) for c in MODELLED if modelled(c, w)}
                best, mode = _best(t, "qoda_lw4")
                ent, ent_mode = _best(t, "qoda_lw4_entropy")
                rows.append({
                    "regime": regime, "workers": k, "bandwidth_gbit": g, "step_seconds": t,
                    "compute_seconds": c1,
                    "qoda_speedup_vs_fp32": t["fp32"] / best,
                    "qoda_speedup_vs_extragradient_fp32": t["extragradient_fp32"] / best,
                    "best_qoda_mode": mode,
                    "qoda_entropy_speedup_vs_fp32": t["fp32"] / ent if ent_mode else None,
                    "best_qoda_entropy_mode": ent_mode or None,
                })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- the paper's workload
@functools.lru_cache(maxsize=4)
def paper_parameters(width: int = PAPER_WIDTH) -> tuple[int, int]:
    """Parameters of ``ResNetGenerator(ch=width)`` and ``ResNetCritic(ch=width)`` (3 channels)."""
    from qoda.gan.models import ResNetCritic, ResNetGenerator

    return (sum(p.numel() for p in ResNetGenerator(ch=width).parameters()),
            sum(p.numel() for p in ResNetCritic(ch=width).parameters()))  # fmt: skip


def count_flops(fn: Any) -> int:
    """FLOPs of the matmuls and convolutions (forward and backward) ``fn()`` runs, by PyTorch's
    formulas (:data:`torch.utils.flop_counter.flop_registry`; ``2 * MACs``).  A dispatch mode of
    its own: ``FlopCounterMode``'s module tracker refuses the gradient penalty's ``autograd.grad``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with _Count() as counter:
        fn()
    return counter.total


@functools.lru_cache(maxsize=4)
def paper_flops_per_sample(width: int = PAPER_WIDTH) -> int:
    """FLOPs per sample of one QODA oracle call on the ResNet pair (32x32 RGB): generator and
    critic forward, the gradient penalty's double backward, both players' gradients
    (:func:`qoda.train.game.wgan_gp_operator`, penalty weight 10).  Counted at batch 2: every
    counted op is linear in the batch."""
    import torch

    from qoda.gan.models import LATENT, ResNetCritic, ResNetGenerator
    from qoda.train.game import wgan_gp_operator

    g = torch.Generator().manual_seed(0)
    gen, critic = ResNetGenerator(ch=width), ResNetCritic(ch=width)
    real, z = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, LATENT, generator=g)
    return count_flops(lambda: wgan_gp_operator(gen, critic, real, z, 10.0, g)) // 2


def paper_workload(w: Workload, codec: dict[str, Any], width: int = PAPER_WIDTH) -> Workload:
    """The paper's exchange: ``n`` = the ResNet pair's parameters; each message at this project's
    measured bits per coordinate (whole message, ``8 m / n`` of :func:`workload_from`); codec at
    the kernel throughput of ``qoda bench codec`` (layers of 147k weights: kernel-sized), entropy
    at its 4-bit row; PowerSGD's floats from the shapes, its overhead as measured here."""
    from qoda.comm.baselines import powersgd_payload_floats
    from qoda.gan.models import ResNetCritic, ResNetGenerator

    n = sum(paper_parameters(width))
    shapes = [p.shape for m in (ResNetGenerator(ch=width), ResNetCritic(ch=width)) for p in m.parameters()]
    codecs: dict[str, tuple[float, float]] = {}
    ent = _codec_row(codec, "entropy")
    if "qoda_lw4_entropy" in w.message_bytes and ent is not None:
        codecs["qoda_lw4_entropy"] = (float(ent["encode_gbps"]), float(ent["decode_gbps"]))
    messages = {k: m * n / w.parameters for k, m in w.message_bytes.items() if not is_entropy(k) or k in codecs}
    return Workload(
        parameters=n, message_bytes=messages, powersgd_floats=float(powersgd_payload_floats(shapes, 1)),
        encode_gbps=float(codec["encode_gbps"]), decode_gbps=float(codec["decode_gbps"]), codec_gbps=codecs,
        powersgd_overhead_seconds=w.powersgd_overhead_seconds,
    )  # fmt: skip


def compute_for_speedup(speedup: float, x_base: float, x_qoda: float) -> float | None:
    """Compute per step ``C`` at which ``(C + x_base) / (C + x_qoda) = speedup``; ``None`` when no
    ``C >= 0`` gives it (the speed-up exceeds the communication-bound ``x_base / x_qoda``)."""
    if speedup <= 1.0:
        return None if speedup < 1.0 or x_base != x_qoda else 0.0
    c = (x_base - speedup * x_qoda) / (speedup - 1.0)
    return c if c >= 0 else None


def rate_for_speedup(speedup: float, compute: float, k: int, alpha: float, w: Workload) -> float | None:
    """Link rate (Gbit/s, tbf) at which QODA's best mode is ``speedup`` x fp32 with ``compute`` per
    step.  Every step time is ``a + b u`` in ``u = 1 / beta``, so ``u`` solves
    ``S (C + a_q + b_q u) = C + a_f + b_f u``; ``None`` when no finite rate gives it."""

    def line(config: str) -> tuple[float, float]:
        a = step_seconds(config, k, Network(alpha, 1e30), w, compute)
        return a, step_seconds(config, k, Network(alpha, 1.0), w, compute) - a

    a_f, b_f = line("fp32")
    a_q, b_q = min(line("qoda_lw4_allgather"), line("qoda_lw4_two_phase"), key=lambda ab: ab[1])
    den = b_f - speedup * b_q
    u = (speedup * a_q - a_f) / den if den > 0 else -1.0
    return 8 / (u * MTU_GOODPUT * 1e9) if u > 0 else None


def paper_section(w: Workload, codec: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Per published point: the compute per step that reproduces it at 1 Gbit/s on the paper's
    workload, the FLOPs per GPU and step at batch 1024 / K, and the V100 share it would need."""
    pw = paper_workload(w, codec)
    gen, crit = paper_parameters()
    per_sample = paper_flops_per_sample()
    net = Network.of(PAPER_RATE_GBIT * 1000, alpha)
    peak = GPU_PEAK_TFLOPS * 1e12
    out = []
    for k, published in PAPER.items():
        x = {c: step_seconds(c, k, net, pw, 0.0) for c in ("fp32", "qoda_lw4_allgather", "qoda_lw4_two_phase")}
        x_q, mode = _best(x, "qoda_lw4")
        batch = PAPER_GLOBAL_BATCH / k
        flops = per_sample * batch
        c_need = compute_for_speedup(published, x["fp32"], x_q)
        c_gpu = flops / (peak * GPU_UTILISATION)
        util = flops / (c_need * peak) if c_need else None
        out.append({
            "workers": k, "published_speedup": published, "per_gpu_batch": batch,
            "non_compute_fp32_seconds": x["fp32"], "non_compute_qoda_seconds": x_q, "best_qoda_mode": mode,
            "max_model_speedup": x["fp32"] / x_q,
            "compute_seconds_needed": c_need, "flops_per_gpu_step": flops,
            "implied_tflops": flops / c_need / 1e12 if c_need else None, "implied_utilisation": util,
            "verdict": _verdict(util),
            "compute_seconds_at_assumed_utilisation": c_gpu,
            "model_speedup_at_assumed_utilisation": (c_gpu + x["fp32"]) / (c_gpu + x_q),
            "rate_gbit_for_published_at_assumed_utilisation": rate_for_speedup(published, c_gpu, k, alpha, pw),
        })  # fmt: skip
    return {
        "model": f"ResNetGenerator(ch={PAPER_WIDTH}) + ResNetCritic(ch={PAPER_WIDTH}), 32x32 RGB, WGAN-GP",
        "generator_parameters": gen, "critic_parameters": crit, "parameters": gen + crit,
        "flops_per_sample": per_sample, "global_batch": PAPER_GLOBAL_BATCH, "bandwidth_gbit": PAPER_RATE_GBIT,
        "alpha_seconds": alpha, "gpu": GPU_NAME, "gpu_peak_tflops": GPU_PEAK_TFLOPS,
        "assumed_utilisation": GPU_UTILISATION,
        "bits_per_coordinate": {k: 8 * m / pw.parameters for k, m in pw.message_bytes.items()},
        "rows": out,
    }  # fmt: skip


def _verdict(util: float | None) -> str:
    if util is None:
        return "unreachable: above the model's communication-bound speed-up"
    if util > 1.0:
        return "impossible: more than the GPU's peak"
    if util > 0.6:
        return "implausible: over 60% of fp32 peak"
    if util > 0.3:
        return "plausible: 30-60% of fp32 peak"
    return "plausible: under 30% of fp32 peak"


# ---------------------------------------------------------------------------- the command
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
            "model_strong_1gbit_entropy": strong[1.0]["qoda_entropy_speedup_vs_fp32"],
        })  # fmt: skip
    errs = [abs(c["error"]) for c in checks]
    compress = [r["powersgd_compress_seconds"] for r in rows if r.get("powersgd_compress_seconds")]
    ent = _codec_row(codec, "entropy")
    return {
        "benchmark": "scaling",
        "model": "alpha-beta; see qoda.bench.scaling",
        "inputs": {
            "parameters": w.parameters,
            "message_bytes": w.message_bytes,
            "message_bits_per_coordinate": {k: 8 * m / w.parameters for k, m in w.message_bytes.items()},
            "code_bits_per_coordinate": {c: _bits_per_coordinate(rows, c) for c in MODELLED if modelled(c, w)},
            "powersgd_floats": w.powersgd_floats,
            "powersgd_overhead_seconds": w.powersgd_overhead_seconds,
            "powersgd_compress_seconds": statistics.median(compress) if compress else None,
            "encode_gbps": w.encode_gbps,
            "decode_gbps": w.decode_gbps,
            "entropy_encode_gbps": w.codec_gbps.get("qoda_lw4_entropy", (None, None))[0],
            "entropy_decode_gbps": w.codec_gbps.get("qoda_lw4_entropy", (None, None))[1],
            "kernel_encode_gbps": float(codec["encode_gbps"]),
            "kernel_decode_gbps": float(codec["decode_gbps"]),
            "kernel_entropy_encode_gbps": float(ent["encode_gbps"]) if ent else None,
            "kernel_entropy_decode_gbps": float(ent["decode_gbps"]) if ent else None,
            "cores": e2e.get("cores"),
            "allocator": e2e.get("allocator"),
            "rounds": e2e.get("rounds", 1),
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
        "paper_workload": paper_section(w, codec, alpha),
    }


def _gbit(v: float | None) -> str:
    return "none" if v is None else f"{v:.2f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def format_scaling(res: dict[str, Any]) -> str:
    inp = res["inputs"]
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
        f"PowerSGD's overhead beyond its all-reduces: {inp['powersgd_overhead_seconds'] * 1e3:.1f} ms per exchange "
        "(2-worker rows)"
        + (f", of which the compression compute alone is {inp['powersgd_compress_seconds'] * 1e3:.1f} ms"
           if inp.get("powersgd_compress_seconds") else "")
        + ".  Message bits per coordinate: "
        + ", ".join(f"{k} {v:.2f}" for k, v in inp["message_bits_per_coordinate"].items()),
        "",
        "This project's model (DCGAN width 64, measured compute): QODA layer-wise 4-bit (best mode) "
        "over Adam fp32, predicted:",
        "",
        "| regime | workers | " + " | ".join(f"{g:g} Gbit/s" for g in RATES_GBIT) + " |",
        "|---|---|" + "---|" * len(RATES_GBIT),
    ]  # fmt: skip
    for regime in ("weak", "strong"):
        for k in WORKERS:
            cells = [r for r in res["predictions"] if r["regime"] == regime and r["workers"] == k]
            lines.append(
                f"| {regime} | {k} | "
                + " | ".join(f"{r['qoda_speedup_vs_fp32']:.2f}x ({r['best_qoda_mode'][0]})" for r in cells)
                + " |"
            )
    if any(r.get("qoda_entropy_speedup_vs_fp32") for r in res["predictions"]):
        lines += ["", "The same, entropy-coded QODA (strong scaling):", "",
                  "| workers | " + " | ".join(f"{g:g} Gbit/s" for g in RATES_GBIT) + " |",
                  "|---|" + "---|" * len(RATES_GBIT)]  # fmt: skip
        for k in WORKERS:
            cells = [r for r in res["predictions"] if r["regime"] == "strong" and r["workers"] == k]
            ent = [f"{r['qoda_entropy_speedup_vs_fp32']:.2f}x ({r['best_qoda_entropy_mode'][0]})" for r in cells]
            lines.append(f"| {k} | " + " | ".join(ent) + " |")
    lines += ["", "Published (reference section 5) vs this project's model (strong scaling):", "",
              "| GPUs | published | model 1 Gbit/s | 2.5 Gbit/s | 5 Gbit/s | model 1 Gbit/s vs ExtraAdam "
              "| entropy-coded 1 Gbit/s |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in res["paper"]:
        lines.append(
            f"| {p['workers']} | {p['published_speedup']:.2f}x | {p['model_strong_1gbit']:.2f}x | "
            f"{p['model_strong_2.5gbit']:.2f}x | {p['model_strong_5gbit']:.2f}x | "
            f"{p['model_strong_1gbit_vs_extragradient']:.2f}x | {_x(p.get('model_strong_1gbit_entropy'))} |"
        )
    pw = res.get("paper_workload")
    if pw:
        lines += [
            "",
            f"Where the paper stands: its workload, {pw['model']}: {pw['parameters']:,} parameters "
            f"({pw['generator_parameters']:,} + {pw['critic_parameters']:,}), "
            f"{pw['flops_per_sample'] / 1e9:.2f} GFLOP per sample and oracle call; global batch "
            f"{pw['global_batch']} split over the GPUs; {pw['bandwidth_gbit']:g} Gbit/s, alpha "
            f"{pw['alpha_seconds'] * 1e6:.0f} us; compute per GPU and step that reproduces each published "
            f"speed-up, and the {pw['gpu']} share ({pw['gpu_peak_tflops']:g} TFLOP/s peak) it needs:",
            "",
            "| GPUs | published | batch/GPU | fp32 comm s | QODA comm s | model max | compute s needed "
            f"| TFLOP/GPU-step | implied TFLOP/s | share of peak | verdict | at {pw['assumed_utilisation']:.0%} "
            "of peak: compute s, model speed-up, Gbit/s giving the published one |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in pw["rows"]:
            need = r["compute_seconds_needed"]
            lines.append(
                f"| {r['workers']} | {r['published_speedup']:.2f}x | {r['per_gpu_batch']:.0f} | "
                f"{r['non_compute_fp32_seconds']:.3f} | {r['non_compute_qoda_seconds']:.3f} ({r['best_qoda_mode'][0]}) "
                f"| {r['max_model_speedup']:.2f}x | {'' if need is None else f'{need:.3f}'} | "
                f"{r['flops_per_gpu_step'] / 1e12:.2f} | "
                f"{'' if r['implied_tflops'] is None else format(r['implied_tflops'], '.1f')} | "
                f"{'' if r['implied_utilisation'] is None else format(r['implied_utilisation'], '.0%')} | "
                f"{r['verdict']} | {r['compute_seconds_at_assumed_utilisation']:.3f} s, "
                f"{r['model_speedup_at_assumed_utilisation']:.2f}x, "
                f"{_gbit(r['rate_gbit_for_published_at_assumed_utilisation'])} |"
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
        ax.set_title(f"{regime} scaling (this project's model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
