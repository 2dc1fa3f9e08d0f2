"""``qoda bench e2e``: training steps of ``qoda train`` over real bandwidth-limited links.

Every (workers, bandwidth) setting builds fresh network namespaces (:mod:`qoda.bench.netns`:
one per worker, veth pairs to a bridge, ``tc tbf`` on both ends of every link) and starts one
process per worker inside them.  The processes form one gloo group over those addresses and
run, one after the other, the same WGAN-GP training iterations (the trainer's default model and
data, :meth:`qoda.train.trainer.Trainer.train_step`) under every configuration of
:data:`CONFIGS`.  A step's time is the slowest rank's (barrier before, max-reduce after); the
figure is the median over the timed steps.  The split into compute, encode, communication and
decode is rank 0's, from the averager's own clocks.

Baselines, stated plainly (the README repeats this):

* ``fp32`` is what data-parallel GAN training runs today: simultaneous Adam (one gradient
  exchange per iteration, the same oracle work per iteration as QODA) with an uncompressed
  fp32 all-reduce.  ``fp16`` and ``powersgd`` compress that same baseline (PyTorch's fp16 cast
  and PowerSGD hook).  ``speedup_vs_fp32`` is over this baseline.
* ``extragradient_fp32`` (ExtraAdam, fp32) and ``qgenx_8bit`` (Q-GenX, global adaptive 8-bit:
  the published baseline) need two oracle calls *and* two exchanges per iteration.
* ``*_overlap`` rows average the generator's gradient on a background thread (own process
  group) while the critic's gradient is computed (:mod:`qoda.comm.overlap`), as DDP overlaps
  its buckets with the backward pass; ``fp32_overlap`` is that fairer baseline.
* ``compute_only`` is the same processes and steps with no communication at all
  (:class:`~qoda.comm.baselines.LocalAverager`); ``compute_only_2call`` the same for the
  two-call methods.  ``compute_only_seconds`` of a row is the bound of its own family.

Time to a target FID is an estimate: the iterations the optimizer needed to reach the target
in ``benchmarks/quality.json`` (same optimizer and compression, 2 workers, 1,500 iterations)
times the step time measured here.  Rows without such a run have ``null``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_WORKERS = (2, 4)
DEFAULT_RATES_MBIT = (1000.0, 300.0, 100.0)
TARGET_FID = 200.0


@dataclass(frozen=True)
class BenchConfig:
    """One row family: trainer options, and whether it communicates at all."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    local: bool = False  # compute-only: no communication
    label: str = ""


CONFIGS: tuple[BenchConfig, ...] = (
    BenchConfig("compute_only", {"optimizer": "qoda", "compression": "none"}, True,
                "no communication, one-call methods (lower bound)"),
    BenchConfig("compute_only_2call", {"optimizer": "extra_adam", "compression": "none"}, True,
                "no communication, two-call methods (lower bound)"),
    BenchConfig("fp32", {"optimizer": "adam", "compression": "none"}, label="Adam, fp32 all-reduce (baseline)"),
    BenchConfig("fp16", {"optimizer": "adam", "compression": "fp16"}, label="Adam, fp16 all-reduce"),
    BenchConfig("powersgd", {"optimizer": "adam", "compression": "powersgd", "powersgd_rank": 1},
                label="Adam, PowerSGD rank 1 (PyTorch hook)"),
    BenchConfig("extragradient_fp32", {"optimizer": "extra_adam", "compression": "none"},
                label="ExtraAdam, fp32 (2 exchanges)"),
    BenchConfig("qgenx_8bit", {"optimizer": "qgenx", "compression": "global_adaptive", "bits": 8},
                label="Q-GenX, global adaptive 8-bit (2 exchanges)"),
    BenchConfig("qoda_fp32", {"optimizer": "qoda", "compression": "none"}, label="QODA, fp32"),
    BenchConfig("qoda_lw4_allgather", {"optimizer": "qoda", "compression": "layerwise_adaptive", "bits": 4,
                                       "mode": "allgather"}, label="QODA, layer-wise 4-bit, allgather"),
    BenchConfig("qoda_lw4_two_phase", {"optimizer": "qoda", "compression": "layerwise_adaptive", "bits": 4,
                                       "mode": "two_phase"}, label="QODA, layer-wise 4-bit, two-phase"),
    # the same with the generator's exchange overlapped with the critic's backward (qoda.comm.overlap)
    BenchConfig("fp32_overlap", {"optimizer": "adam", "compression": "none", "overlap": True},
                label="Adam, fp32 all-reduce, overlapped"),
    BenchConfig("powersgd_overlap", {"optimizer": "adam", "compression": "powersgd", "powersgd_rank": 1,
                                     "overlap": True}, label="Adam, PowerSGD rank 1, overlapped"),
    BenchConfig("qoda_lw4_allgather_overlap", {"optimizer": "qoda", "compression": "layerwise_adaptive", "bits": 4,
                                               "mode": "allgather", "overlap": True},
                label="QODA, layer-wise 4-bit, allgather, overlapped"),
    BenchConfig("qoda_lw4_two_phase_overlap", {"optimizer": "qoda", "compression": "layerwise_adaptive", "bits": 4,
                                               "mode": "two_phase", "overlap": True},
                label="QODA, layer-wise 4-bit, two-phase, overlapped"),
)  # fmt: skip
CONFIG_NAMES = tuple(c.name for c in CONFIGS)


def calls_of(name: str) -> int:
    """Exchanges per iteration of an e2e config (the optimizer registry's ``calls_per_iteration``)."""
    from qoda.optim.factory import OPTIMIZERS
    from qoda.train.config import TrainConfig

    opts = next(c for c in CONFIGS if c.name == name).options
    return OPTIMIZERS[opts.get("optimizer", TrainConfig.optimizer)].calls_per_iteration


def compute_bound_of(name: str) -> str:
    return "compute_only_2call" if calls_of(name) == 2 else "compute_only"


# ---------------------------------------------------------------------------- one worker
def _measure(
    bc: BenchConfig, rank: int, world: int, data: Any, steps: int, warmup: int, batch: int, out: str
) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from qoda.comm.baselines import LocalAverager
    from qoda.train.config import TrainConfig
    from qoda.train.trainer import Trainer

    cfg = TrainConfig(**bc.options, batch_size=batch, steps=10**9, progress=False, out=out, workers=world)
    trainer = Trainer(cfg, rank, world, data, averager=LocalAverager() if bc.local else None)
    times, recs = [], []
    for step in range(warmup + steps):
        if step == warmup:  # costs per exchange over the timed steps only (PowerSGD starts uncompressed)
            before = copy.copy(trainer.averager.stats)
        dist.barrier()
        t = time.perf_counter()
        rec = trainer.train_step()
        elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= warmup:
            times.append(float(elapsed))
            recs.append(rec)
    after = trainer.averager.stats
    calls = max(1, after.calls - before.calls)

    def med(k: str) -> float:
        return statistics.median(r[k] for r in recs)

    return {
        "config": bc.name,
        "label": bc.label,
        "optimizer": cfg.optimizer,
        "compression": "compute_only" if bc.local else cfg.compression,
        "overlap": cfg.overlap,
        "bits": cfg.wire_bits or 32,  # PowerSGD: recorded as 32 (its payload is counted in bytes)
        "mode": cfg.mode if cfg.quantized else "allreduce",
        "exchanges_per_step": 0 if bc.local else calls_of(bc.name),
        "workers": world,
        "steps": steps,
        "batch_per_worker": batch,
        "parameters": trainer.numel,
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "compute_seconds": med("compute_seconds"),
        "encode_seconds": med("encode_seconds"),
        "comm_seconds": med("comm_seconds"),
        "decode_seconds": med("decode_seconds"),
        "bytes_sent_per_exchange": (after.bytes_sent - before.bytes_sent) / calls,
        "payload_bits_per_exchange": (after.payload_bits - before.payload_bits) / calls,
    }


def _latency(reps: int = 30) -> float:
    """Median seconds of a one-float all-reduce: the per-collective latency of this network."""
    import torch
    import torch.distributed as dist

    t = torch.zeros(1)
    times = []
    for _ in range(reps):
        dist.barrier()
        s = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - s)
    return statistics.median(times)


def worker_main(a: argparse.Namespace) -> None:
    from qoda.bench.netns import join_group, leave_group
    from qoda.data.images import load_dataset

    join_group(a)
    data = load_dataset("mnist")
    rows: list[dict[str, Any]] = []
    lat = _latency()
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.configs:
            bc = next(c for c in CONFIGS if c.name == name)
            row = _measure(bc, a.rank, a.world, data, a.steps, a.warmup, a.batch, tmp)
            row.update(bandwidth_mbit=a.rate, allreduce_latency_seconds=lat)
            rows.append(row)
            if a.rank == 0:
                Path(a.out).write_text(json.dumps(rows))
    leave_group()


# ---------------------------------------------------------------------------- orchestration
def run_e2e_bench(
    workers: tuple[int, ...] = DEFAULT_WORKERS,
    rates_mbit: tuple[float, ...] = DEFAULT_RATES_MBIT,
    configs: tuple[str, ...] = CONFIG_NAMES,
    steps: int = 12,
    warmup: int = 3,
    batch: int = 64,
    max_seconds: float = 3600,
    quality: Path | None = Path("benchmarks/quality.json"),
    log=print,
) -> dict[str, Any]:
    """Every (workers, rate) setting in fresh namespaces; returns the result document."""
    from qoda.bench.netns import run_sweep
    from qoda.utils.system import allocator

    unknown = [c for c in configs if c not in CONFIG_NAMES]
    if unknown:
        raise ValueError(f"configs: unknown {unknown}; known: {', '.join(CONFIG_NAMES)}")
    needed = {"fp32", *(compute_bound_of(c) for c in configs)}  # the reference rows of every ratio
    configs = tuple(c for c in CONFIG_NAMES if c in needed or c in configs)
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError("steps and batch must be >= 1, warmup >= 0")
    args = ["--steps", str(steps), "--warmup", str(warmup), "--batch", str(batch), "--configs", *configs]
    rows, skipped = run_sweep("qoda.bench.e2e", workers, rates_mbit, args, max_seconds=max_seconds,
                              setting_seconds=60, log=log)  # fmt: skip
    add_ratios(rows, _fid_steps(quality))
    return {
        "benchmark": "e2e",
        "links": "network namespaces + veth + bridge, tc tbf on both ends of each link",
        "model": "qoda train defaults: DCGAN width 64 on MNIST 32x32, WGAN-GP",
        "batch_per_worker": batch,
        "steps": steps,
        "warmup": warmup,
        "threads_per_worker": 1,
        "cores": os.cpu_count(),
        "allocator": allocator(),
        "target_fid": TARGET_FID,
        "rows": rows,
        "skipped": skipped,
    }


def _fid_steps(quality: Path | None) -> dict[tuple[str, str], int]:
    """Iterations to reach :data:`TARGET_FID` per (optimizer, compression) in a quality run."""
    if quality is None or not Path(quality).exists():
        return {}
    found: dict[tuple[str, str], int] = {}
    for r in json.loads(Path(quality).read_text()).get("rows", []):  # seed means; the first row of a key wins
        hit = [h["step"] for h in r.get("fid_history", []) if h["fid"] <= TARGET_FID]
        if hit:
            found.setdefault((r["optimizer"], r["compression"]), min(hit))
    return found


def add_ratios(rows: list[dict[str, Any]], fid_steps: dict[tuple[str, str], int] | None = None) -> None:
    """Per row: the compute-only bound of its family, speed-up over fp32, ratio to the bound,
    and the estimated seconds to the target FID."""

    def find(name: str, r: dict[str, Any]) -> dict[str, Any] | None:
        return next(
            (b for b in rows if b["config"] == name and b["workers"] == r["workers"]
             and b["bandwidth_mbit"] == r["bandwidth_mbit"]),
            None,
        )  # fmt: skip

    for r in rows:
        base, bound = find("fp32", r), find(compute_bound_of(r["config"]), r)
        r["compute_only_seconds"] = bound["step_seconds"] if bound else None
        r["speedup_vs_fp32"] = base["step_seconds"] / r["step_seconds"] if base else None
        r["ratio_to_compute_only"] = r["step_seconds"] / bound["step_seconds"] if bound else None
        r["comm_share_of_step"] = 1.0 - r["compute_seconds"] / r["step_seconds"] if r["step_seconds"] else None
        n = (fid_steps or {}).get((r["optimizer"], r["compression"]))
        r["seconds_to_target_fid"] = n * r["step_seconds"] if n and r["compression"] != "compute_only" else None


def format_e2e(res: dict[str, Any]) -> str:
    lines = [
        f"{res['model']}, batch {res['batch_per_worker']} per worker, median of {res['steps']} steps, "
        f"1 thread per worker on {res['cores']} cores, allocator: {res['allocator']}",
        "",
        "| workers | Mbit/s | config | step s | compute | encode | comm | decode | vs fp32 | / compute-only |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        sp, rc = r.get("speedup_vs_fp32"), r.get("ratio_to_compute_only")
        lines.append(
            f"| {r['workers']} | {r['bandwidth_mbit']:g} | {r['config']} | {r['step_seconds']:.3f} | "
            f"{r['compute_seconds']:.3f} | {r['encode_seconds']:.4f} | {r['comm_seconds']:.3f} | "
            f"{r['decode_seconds']:.4f} | {'' if sp is None else f'{sp:.2f}x'} | {'' if rc is None else f'{rc:.2f}x'} |"
        )
    for s in res.get("skipped", []):
        lines.append(f"\nskipped: {s}")
    return "\n".join(lines)


def plot_e2e(res: dict[str, Any], path: Path) -> None:
    """Speed-up over fp32 against bandwidth, one panel per worker count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["workers"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, k in zip(axes[0], ks, strict=True):
        for i, name in enumerate(CONFIG_NAMES):
            pts = sorted((r["bandwidth_mbit"], r["speedup_vs_fp32"]) for r in res["rows"]
                         if r["workers"] == k and r["config"] == name and r.get("speedup_vs_fp32"))  # fmt: skip
            if pts:
                style = "--" if name.startswith("compute") else (":" if name.endswith("overlap") else "-")
                ax.plot(*zip(*pts, strict=True), marker="o", label=name, ls=style, color=colors[i % len(colors)])
        ax.set_xscale("log")
        ax.set_xlabel("link bandwidth (Mbit/s, tc tbf)")
        ax.set_ylabel("step speed-up over Adam fp32 all-reduce")
        ax.set_title(f"{k} workers")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worker_args(argv: list[str]) -> argparse.Namespace:
    from qoda.bench.netns import worker_parser

    p = worker_parser()
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--configs", nargs="+", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    worker_main(_worker_args(sys.argv[1:]))
