"""``qoda bench comm``: gradient averaging over real bandwidth-limited links.

Worker processes run in their own network namespaces (:mod:`qoda.bench.netns`), joined by
a bridge and shaped with ``tc tbf``.  Each measures a DDP step whose backward is trivial, so
the step time is the averaging of one gradient of ``numel`` floats (a ``numel/1024 x 1024``
matrix in one DDP bucket) with: the fp32 all-reduce (DDP default), PyTorch's fp16 and
PowerSGD (rank 1) hooks, and qoda's hook in ``allgather`` and ``two_phase`` modes at 2, 4
and 8 bits.  A step's time is the slowest rank's; the figure is the median over steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

MODES: list[tuple[str, int]] = [("compute_only", 0), ("fp32", 32), ("fp16", 16), ("powersgd", 0)] + [
    (m, b) for m in ("allgather", "two_phase") for b in (2, 4, 8)
]


class _Grad(nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel // 1024, 1024))
        self.register_buffer("c", torch.randn(numel // 1024, 1024, generator=torch.Generator().manual_seed(0)))

    def forward(self) -> torch.Tensor:
        return (self.w * self.c).sum()


def _no_communication(state, bucket):  # unannotated: DDP rejects the string annotations of this module
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _bytes_per_rank(mode: str, shapes: list[torch.Size], world: int, stats: dict | None) -> float:
    """Bytes one rank sends per step: PyTorch's hooks priced by :mod:`qoda.comm.cost`, qoda's as its
    hook counted them."""
    from qoda.comm import cost

    if mode == "compute_only":
        return 0.0
    if mode in ("fp32", "fp16", "powersgd"):  # the DDP default, fp16 and PowerSGD (rank 1, compressing) hooks
        return cost.exchange_cost(mode, world, shapes=shapes, powersgd_rank=1).bytes_sent
    assert stats is not None
    return stats["bytes_sent"] / max(1, stats["calls"])


def _measure(mode: str, bits: int, numel: int, steps: int, warmup: int) -> tuple[float, float, dict | None]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from qoda.comm.ddp_hook import QodaHookState, qoda_hook
    from qoda.quant.config import QuantizerConfig
    from qoda.quant.policy import LayerPolicy

    model = _Grad(numel)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=numel * 4 / 2**20 + 16, broadcast_buffers=False)
    state = None
    if mode == "compute_only":  # the same step with no communication: the floor of every mode
        ddp.register_comm_hook(None, _no_communication)
    elif mode == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif mode == "powersgd":
        ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
        ddp.register_comm_hook(ps, powerSGD_hook.powerSGD_hook)
    elif mode != "fp32":
        state = QodaHookState(
            model, LayerPolicy.global_(QuantizerConfig.qsgd(bits, 1024)), mode=mode, start_iter=0, adapt=None
        )  # fixed levels: the measured configuration
        ddp.register_comm_hook(state, qoda_hook)
    times = []
    for step in range(warmup + steps):
        dist.barrier()
        t = time.perf_counter()
        ddp().backward()
        elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= warmup:
            times.append(float(elapsed))
    stats = state.stats.as_dict() if state else None
    shapes = [p.shape for p in model.parameters()]
    return statistics.median(times), _bytes_per_rank(mode, shapes, dist.get_world_size(), stats), stats


def worker_main(a: argparse.Namespace) -> None:
    from qoda.bench.netns import join_group, leave_group

    join_group(a)
    rows = []
    for numel in a.sizes:
        for mode, bits in MODES:
            steps = a.steps if numel <= (1 << 22) else max(2, a.steps // 2)
            sec, nbytes, stats = _measure(mode, bits, numel, steps, warmup=3 if mode == "powersgd" else 1)
            rows.append({
                "mode": mode, "bits": bits, "workers": a.world, "bandwidth_mbit": a.rate, "numel": numel,
                "seconds": sec, "bytes_per_rank": nbytes, "steps": steps,
                "encode_seconds": None if stats is None else stats["encode_seconds"] / stats["calls"],
                "decode_seconds": None if stats is None else stats["decode_seconds"] / stats["calls"],
            })  # fmt: skip
            if a.rank == 0:
                Path(a.out).write_text(json.dumps(rows))
    leave_group()


def run_comm_bench(
    workers: tuple[int, ...] = (2, 4),
    rates_mbit: tuple[float, ...] = (1000, 100),
    sizes: tuple[int, ...] = (1 << 20, 1 << 22, 1 << 24),
    steps: int = 4,
    max_seconds: float = 3600,
    log=print,
) -> dict:
    """Run every (workers, rate) setting in fresh namespaces; returns the result document."""
    from qoda.bench.netns import run_sweep
    from qoda.utils.system import allocator

    args = ["--steps", str(steps), "--sizes", *map(str, sizes)]
    rows, skipped = run_sweep("qoda.bench.comm", workers, rates_mbit, args, max_seconds=max_seconds,
                              setting_seconds=30, log=log)  # fmt: skip
    for r in rows:
        base = next(
            (b for b in rows if b["mode"] == "fp32" and b["workers"] == r["workers"]
             and b["bandwidth_mbit"] == r["bandwidth_mbit"] and b["numel"] == r["numel"]),
            None,
        )  # fmt: skip
        r["speedup_vs_fp32"] = base["seconds"] / r["seconds"] if base else None
    return {
        "benchmark": "comm",
        "links": "network namespaces + veth + bridge, tc tbf on both ends of each link",
        "threads_per_worker": 1,
        "cores": os.cpu_count(),
        "allocator": allocator(),
        "rows": rows,
        "skipped": skipped,
    }


def format_comm(res: dict) -> str:
    lines = [
        "| workers | Mbit/s | numel | mode | bits | step s | MB/rank | vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        sp = r.get("speedup_vs_fp32")
        lines.append(
            f"| {r['workers']} | {r['bandwidth_mbit']:g} | {r['numel'] / 2**20:g}M | {r['mode']} | "
            f"{r['bits'] or '-'} | {r['seconds']:.3f} | {r['bytes_per_rank'] / 1e6:.2f} | "
            f"{'' if sp is None else f'{sp:.2f}x'} |"
        )
    for s in res.get("skipped", []):
        lines.append(f"\nskipped: {s}")
    return "\n".join(lines)


def _worker_args(argv: list[str]) -> argparse.Namespace:
    from qoda.bench.netns import worker_parser

    p = worker_parser()
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    worker_main(_worker_args(sys.argv[1:]))
