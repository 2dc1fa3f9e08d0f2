"""``qoda bench e2e``: training steps of ``qoda train`` over real bandwidth-limited links.

Every (workers, bandwidth) setting builds fresh network namespaces (:mod:`qoda.bench.netns`:
one per worker, veth pairs to a bridge, ``tc tbf`` on both ends of every link) and starts one
process per worker inside them.  The processes form one gloo group over those addresses and
run the same WGAN-GP training iterations (the trainer's default model and data,
:meth:`qoda.train.trainer.Trainer.train_step`) under every configuration of :data:`CONFIGS`.

**Interleaved rounds.**  A shared 2-core VM drifts by 30% within minutes, so timing one
configuration after another compares configurations measured under different loads.  The
configurations are therefore interleaved: ``rounds`` rounds, each timing a block of
``ceil(steps / rounds)`` steps of every configuration, the order rotated by one per round
(A B C, B C A, C A B, ...: :func:`round_orders`), so a drift hits all of them alike and none is
always timed first.  Design: one launch per setting, as before, and inside it one
:class:`~qoda.train.trainer.Trainer` per configuration, built once (same order on every rank:
the overlapped ones create their process groups then) and warmed up once, then reused by every
round.  Switching configuration costs nothing but the cache; the alternatives (processes or
namespaces per round or per configuration) would repeat the ~10 s of process start, group
set-up and warm-up per block, and a fresh trainer would re-fit its levels at step 0 every round.

A step's time is the slowest rank's (barrier before, max-reduce after).  Per configuration the
row holds the median step over all timed steps and its interquartile range, and each round's
block median.  Every ratio (over ``fp32``, the compute-only bound of the family, vs PowerSGD)
is computed per round from the two block medians, then summarised over the rounds: median,
interquartile range and min-max (:func:`summarise`).  The split into compute, encode,
communication and decode is rank 0's, from the averager's own clocks (medians over all steps).

Baselines, stated plainly (the README repeats this):

* ``fp32`` is what data-parallel GAN training runs today: simultaneous Adam (one gradient
  exchange per iteration, the same oracle work per iteration as QODA) with an uncompressed
  fp32 all-reduce.  ``fp16`` and ``powersgd`` compress that same baseline (PyTorch's fp16 cast
  and PowerSGD hook).  ``speedup_vs_fp32`` is over this baseline; ``speedup_vs_powersgd`` is
  PowerSGD's step over the row's (above 1: faster than PowerSGD), when PowerSGD was run.
* ``extragradient_fp32`` (ExtraAdam, fp32) and ``qgenx_8bit`` (Q-GenX, global adaptive 8-bit:
  the published baseline) need two oracle calls *and* two exchanges per iteration.
* ``*_overlap`` rows average the generator's gradient on a background thread (own process
  group) while the critic's gradient is computed (:mod:`qoda.comm.overlap`), as DDP overlaps
  its buckets with the backward pass; ``fp32_overlap`` is that fairer baseline.
* ``*_entropy_*`` rows: the QODA layer-wise configurations with the level indices rANS-coded
  (the trainer's ``coding = "entropy"``, ``--coding entropy``; data-dependent message sizes).
* ``compute_only`` is the same processes and steps with no communication at all
  (:class:`~qoda.comm.baselines.LocalAverager`); ``compute_only_2call`` the same for the
  two-call methods.  ``compute_only_seconds`` of a row is the bound of its own family.

PowerSGD rows also carry ``powersgd_compress_seconds``: the hook alone (error feedback, the
P/Q matmuls, orthogonalisation, decompression) timed on every rank at once, each on a group of
its own (no network), on this model's gradient shapes: the pure compression compute, under
the setting's CPU contention (read by ``qoda bench scaling``).

Time to a target FID is an estimate: the iterations the optimizer needed to reach the target
in ``benchmarks/quality.json`` (same optimizer and compression, 2 workers, 1,500 iterations)
times the step time measured here.  Rows without such a run have ``null``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_WORKERS = (2, 4)
DEFAULT_RATES_MBIT = (1000.0, 300.0, 100.0)
DEFAULT_STEPS = 30  # timed steps per configuration, in all rounds
DEFAULT_ROUNDS = 6
TARGET_FID = 200.0
PSGD_CALIBRATION_CALLS = 20


@dataclass(frozen=True)
class BenchConfig:
    """One row family: trainer options and whether it communicates at all."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    local: bool = False  # compute-only: no communication
    label: str = ""


_LW4 = {"optimizer": "qoda", "compression": "layerwise_adaptive", "bits": 4}
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
    BenchConfig("qoda_lw4_allgather", {**_LW4, "mode": "allgather"}, label="QODA, layer-wise 4-bit, allgather"),
    BenchConfig("qoda_lw4_two_phase", {**_LW4, "mode": "two_phase"}, label="QODA, layer-wise 4-bit, two-phase"),
    # the same with the level indices entropy-coded (rANS; data-dependent sizes)
    BenchConfig("qoda_lw4_entropy_allgather", {**_LW4, "mode": "allgather", "coding": "entropy"},
                label="QODA, layer-wise 4-bit, entropy-coded, allgather"),
    BenchConfig("qoda_lw4_entropy_two_phase", {**_LW4, "mode": "two_phase", "coding": "entropy"},
                label="QODA, layer-wise 4-bit, entropy-coded, two-phase"),
    # the same with the generator's exchange overlapped with the critic's backward (qoda.comm.overlap)
    BenchConfig("fp32_overlap", {"optimizer": "adam", "compression": "none", "player_threads": True},
                label="Adam, fp32 all-reduce, overlapped"),
    BenchConfig("powersgd_overlap", {"optimizer": "adam", "compression": "powersgd", "powersgd_rank": 1,
                                     "player_threads": True}, label="Adam, PowerSGD rank 1, overlapped"),
    BenchConfig("qoda_lw4_allgather_overlap", {**_LW4, "mode": "allgather", "player_threads": True},
                label="QODA, layer-wise 4-bit, allgather, overlapped"),
    BenchConfig("qoda_lw4_two_phase_overlap", {**_LW4, "mode": "two_phase", "player_threads": True},
                label="QODA, layer-wise 4-bit, two-phase, overlapped"),
    BenchConfig("qoda_lw4_entropy_allgather_overlap",
                {**_LW4, "mode": "allgather", "coding": "entropy", "player_threads": True},
                label="QODA, layer-wise 4-bit, entropy-coded, allgather, overlapped"),
    BenchConfig("qoda_lw4_entropy_two_phase_overlap",
                {**_LW4, "mode": "two_phase", "coding": "entropy", "player_threads": True},
                label="QODA, layer-wise 4-bit, entropy-coded, two-phase, overlapped"),
)  # fmt: skip
CONFIG_NAMES = tuple(c.name for c in CONFIGS)


def config(name: str) -> BenchConfig:
    return next(c for c in CONFIGS if c.name == name)


def calls_of(name: str) -> int:
    """Exchanges per iteration of an e2e config (the optimizer registry's ``calls_per_iteration``)."""
    from qoda.optim.factory import OPTIMIZERS
    from qoda.train.config import TrainConfig

    return OPTIMIZERS[config(name).options.get("optimizer", TrainConfig.optimizer)].calls_per_iteration


def compute_bound_of(name: str) -> str:
    return "compute_only_2call" if calls_of(name) == 2 else "compute_only"


# ---------------------------------------------------------------------------- statistics
def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The configurations of every round: round ``r`` is ``names`` rotated left by ``r`` (mod its
    length), so each configuration takes every position once per ``len(names)`` rounds."""
    n = len(names)
    return [[names[(r + i) % n] for i in range(n)] for r in range(rounds)] if n else [[] for _ in range(rounds)]


def steps_per_round(steps: int, rounds: int) -> int:
    """Block length: ``ceil(steps / rounds)``, so at least ``steps`` are timed in all."""
    return -(-steps // rounds)


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3), linear interpolation between order statistics (numpy's default:
    ``Q(p) = x_(1 + p (n - 1))`` on the sorted sample)."""
    if not xs:
        raise ValueError("quartiles: empty sample")
    s = sorted(xs)

    def q(p: float) -> float:
        h = p * (len(s) - 1)
        lo = math.floor(h)
        return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])

    return q(0.25), q(0.5), q(0.75)


def summarise(xs: Sequence[float]) -> dict[str, Any]:
    """Median, interquartile range and min-max of ``xs`` (per-round ratios, or step times)."""
    q1, med, q3 = quartiles(xs)
    return {"median": med, "iqr": [q1, q3], "range": [min(xs), max(xs)], "n": len(xs)}


def round_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per round ``num[r] / den[r]`` over the rounds both have (a stopped run may have fewer)."""
    return [a / b for a, b in zip(num, den, strict=False) if b > 0]


# ---------------------------------------------------------------------------- one worker
def _trainer(bc: BenchConfig, rank: int, world: int, data: Any, batch: int, out: str) -> Any:
    from qoda.comm.baselines import LocalAverager
    from qoda.train.config import TrainConfig
    from qoda.train.trainer import Trainer

    cfg = TrainConfig(**bc.options, batch_size=batch, steps=10**9, progress=False, out=out, workers=world)
    averager = LocalAverager() if bc.local else None
    return Trainer(cfg, rank, world, data, averager=averager)


_COSTS = ("calls", "bytes_sent", "payload_bits")


class _Timed:
    """One configuration's trainer and what its timed blocks measured."""

    def __init__(self, bc: BenchConfig, trainer: Any) -> None:
        self.bc, self.trainer = bc, trainer
        self.times: list[float] = []
        self.rounds: list[float] = []  # block medians
        self.recs: list[dict[str, float]] = []
        self.costs = dict.fromkeys(_COSTS, 0.0)  # over the timed steps only (PowerSGD starts uncompressed)

    def block(self, steps: int) -> None:
        import torch
        import torch.distributed as dist

        before = self.trainer.averager.stats.as_dict()
        times = []
        for _ in range(steps):
            dist.barrier()
            t = time.perf_counter()
            rec = self.trainer.train_step()
            elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(float(elapsed))
            self.recs.append(rec)
        after = self.trainer.averager.stats.as_dict()
        for k in _COSTS:
            self.costs[k] += after[k] - before[k]
        self.times += times
        self.rounds.append(statistics.median(times))

    def row(self, world: int, batch: int, steps_per_round: int) -> dict[str, Any]:
        bc, cfg = self.bc, self.trainer.cfg
        calls = max(1.0, self.costs["calls"])
        q1, med, q3 = quartiles(self.times)

        def med_of(k: str) -> float:
            return statistics.median(r[k] for r in self.recs)

        return {
            "config": bc.name,
            "label": bc.label,
            "optimizer": cfg.optimizer,
            "compression": "compute_only" if bc.local else cfg.compression,
            "coding": cfg.coding if cfg.quantized and not bc.local else None,
            "player_threads": cfg.player_threads,
            "bits": cfg.wire_bits or 32,  # PowerSGD: recorded as 32 (its payload is counted in bytes)
            "mode": cfg.mode if cfg.quantized else "allreduce",
            "exchanges_per_step": 0 if bc.local else calls_of(bc.name),
            "workers": world,
            "steps": len(self.times),
            "rounds": len(self.rounds),
            "steps_per_round": steps_per_round,
            "batch_per_worker": batch,
            "parameters": self.trainer.numel,
            "step_seconds": med,
            "step_seconds_iqr": [q1, q3],
            "round_step_seconds": self.rounds,
            "step_seconds_all": self.times,
            "compute_seconds": med_of("compute_seconds"),
            "encode_seconds": med_of("encode_seconds"),
            "comm_seconds": med_of("comm_seconds"),
            "decode_seconds": med_of("decode_seconds"),
            "bytes_sent_per_exchange": self.costs["bytes_sent"] / calls,
            "payload_bits_per_exchange": self.costs["payload_bits"] / calls,
            # code bits of one rank's message per coordinate (two-phase: its K-1 chunks and its
            # averaged chunk, about one message); headers and size messages excluded
            "payload_bits_per_coordinate": self.costs["payload_bits"] / calls / self.trainer.numel,
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


def _powersgd_compress_seconds(trainer: Any, rank: int, world: int, calls: int = PSGD_CALIBRATION_CALLS) -> float:
    """Median seconds of PyTorch's PowerSGD hook on this model's gradient shapes, every rank at
    once on a group of its own (no network: the compression compute under this CPU contention)."""
    import torch
    import torch.distributed as dist

    from qoda.comm.baselines import PowerSGDAverager

    solo = [dist.new_group([r]) for r in range(world)]  # collective: every rank creates every group
    shapes = [p.shape for p in trainer.players.parameters()]
    avg = PowerSGDAverager(shapes, trainer.cfg.powersgd_rank, 2, solo[rank], seed=rank)
    g = torch.Generator().manual_seed(rank)
    grads = [torch.randn(s, generator=g) for s in shapes]
    times = []
    for step in range(2 + calls):  # the first two exchanges are uncompressed (start_iter 2)
        ts = [x.clone() for x in grads]
        dist.barrier()
        t = time.perf_counter()
        avg.average_(ts, step)
        if step >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker_main(a: argparse.Namespace) -> None:
    from qoda.bench.netns import join_group, leave_group
    from qoda.data.images import load_dataset

    join_group(a)
    data = load_dataset("mnist")
    per_round = steps_per_round(a.steps, a.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        timed = {name: _Timed(config(name), _trainer(config(name), a.rank, a.world, data, a.batch, tmp))
                 for name in a.configs}  # fmt: skip
        for t in timed.values():  # warm-up, once per configuration
            for _ in range(a.warmup):
                t.trainer.train_step()
        psgd = {name: _powersgd_compress_seconds(t.trainer, a.rank, a.world)
                for name, t in timed.items() if t.trainer.cfg.compression == "powersgd"}  # fmt: skip
        lats = []
        for order in round_orders(list(a.configs), a.rounds):
            lats.append(_latency())
            for name in order:
                timed[name].block(per_round)
            rows = []
            for name, t in timed.items():
                row = t.row(a.world, a.batch, per_round)
                row.update(bandwidth_mbit=a.rate, allreduce_latency_seconds=statistics.median(lats))
                if name in psgd:
                    row["powersgd_compress_seconds"] = psgd[name]
                rows.append(row)
            if a.rank == 0:  # after every round: a stopped setting keeps the rounds it finished
                Path(a.out).write_text(json.dumps(rows))
    leave_group()


# ---------------------------------------------------------------------------- orchestration
def run_e2e_bench(
    workers: tuple[int, ...] = DEFAULT_WORKERS,
    rates_mbit: tuple[float, ...] = DEFAULT_RATES_MBIT,
    configs: tuple[str, ...] = CONFIG_NAMES,
    steps: int = DEFAULT_STEPS,
    warmup: int = 3,
    batch: int = 64,
    max_seconds: float = 3600,
    quality: Path | None = Path("benchmarks/quality.json"),
    log: Callable[[str], None] = print,
    rounds: int = DEFAULT_ROUNDS,
) -> dict[str, Any]:
    """Every (workers, rate) setting in fresh namespaces, the configurations interleaved in
    ``rounds`` rounds of ``ceil(steps / rounds)`` timed steps each; returns the result document."""
    from qoda.bench.netns import run_sweep
    from qoda.utils.system import allocator

    unknown = [c for c in configs if c not in CONFIG_NAMES]
    if unknown:
        raise ValueError(f"configs: unknown {unknown}; known: {', '.join(CONFIG_NAMES)}")
    needed = {"fp32", *(compute_bound_of(c) for c in configs)}  # the reference rows of every ratio
    configs = tuple(c for c in CONFIG_NAMES if c in needed or c in configs)
    if steps < 1 or warmup < 0 or batch < 1 or rounds < 1:
        raise ValueError("steps, rounds and batch must be >= 1, warmup >= 0")
    rounds = min(rounds, steps)
    args = ["--steps", str(steps), "--rounds", str(rounds), "--warmup", str(warmup), "--batch", str(batch),
            "--configs", *configs]  # fmt: skip
    rows, skipped = run_sweep("qoda.bench.e2e", workers, rates_mbit, args, max_seconds=max_seconds,
                              setting_seconds=60, log=log)  # fmt: skip
    add_ratios(rows, _fid_steps(quality))
    return {
        "benchmark": "e2e",
        "links": "network namespaces + veth + bridge, tc tbf on both ends of each link",
        "model": "qoda train defaults: DCGAN width 64 on MNIST 32x32, WGAN-GP",
        "batch_per_worker": batch,
        "steps": steps_per_round(steps, rounds) * rounds,
        "rounds": rounds,
        "steps_per_round": steps_per_round(steps, rounds),
        "order": "interleaved: every round times a block of every configuration, the order rotated by one per round",
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


def rounds_of(row: dict[str, Any]) -> list[float]:
    """A row's per-round block medians (a file from before the rounds: its one median)."""
    return list(row.get("round_step_seconds") or [row["step_seconds"]])


#: ratio key -> (reference config or None for the family bound, True if reference / row)
RATIOS: dict[str, tuple[str | None, bool]] = {
    "speedup_vs_fp32": ("fp32", True),
    "ratio_to_compute_only": (None, False),
    "speedup_vs_powersgd": ("powersgd", True),
}


def add_ratios(rows: list[dict[str, Any]], fid_steps: dict[tuple[str, str], int] | None = None) -> None:
    """Per row: the compute-only bound of its family, and every ratio of :data:`RATIOS` per round
    (``fp32 / row``, ``row / bound``, ``powersgd / row``), summarised over the rounds: ``<key>``
    the median, ``<key>_iqr``, ``<key>_range`` and ``<key>_rounds``; ``None`` without the
    reference row.  Also the communication share of the step and the seconds to the target FID."""

    def find(name: str, r: dict[str, Any]) -> dict[str, Any] | None:
        return next(
            (b for b in rows if b["config"] == name and b["workers"] == r["workers"]
             and b["bandwidth_mbit"] == r["bandwidth_mbit"]),
            None,
        )  # fmt: skip

    for r in rows:
        bound = find(compute_bound_of(r["config"]), r)
        r["compute_only_seconds"] = bound["step_seconds"] if bound else None
        for key, (ref_name, ref_over_row) in RATIOS.items():
            ref = find(ref_name or compute_bound_of(r["config"]), r)
            per = (round_ratios(rounds_of(ref), rounds_of(r)) if ref_over_row else
                   round_ratios(rounds_of(r), rounds_of(ref))) if ref else []  # fmt: skip
            s = summarise(per) if per else None
            r[key] = s["median"] if s else None
            r[f"{key}_iqr"], r[f"{key}_range"] = (s["iqr"], s["range"]) if s else (None, None)
            r[f"{key}_rounds"] = per if s else None
        r["comm_share_of_step"] = 1.0 - r["compute_seconds"] / r["step_seconds"] if r["step_seconds"] else None
        n = (fid_steps or {}).get((r["optimizer"], r["compression"]))
        r["seconds_to_target_fid"] = n * r["step_seconds"] if n and r["compression"] != "compute_only" else None


def fmt_spread(value: float | None, spread: Sequence[float] | None, unit: str = "x", digits: int = 2) -> str:
    """``1.23x (IQR 1.15-1.31)``; the value alone without a spread, empty without a value."""
    if value is None:
        return ""
    v = f"{value:.{digits}f}{unit}"
    if not spread or spread[0] == spread[1] == value:
        return v
    return f"{v} (IQR {spread[0]:.{digits}f}-{spread[1]:.{digits}f})"


def format_e2e(res: dict[str, Any]) -> str:
    rounds = res.get("rounds", 1)
    lines = [
        f"{res['model']}, batch {res['batch_per_worker']} per worker, {res['steps']} timed steps per configuration"
        + (f" in {rounds} interleaved rounds of {res.get('steps_per_round')} (order rotated per round)"
           if rounds > 1 else "")
        + f", 1 thread per worker on {res['cores']} cores, allocator: {res['allocator']}",
        "",
        "step s: median over all timed steps (IQR of the steps); ratios: median over the rounds of the "
        "per-round ratio of block medians (IQR over the rounds)",
        "",
        "| workers | Mbit/s | config | step s | compute | encode | comm | decode | vs fp32 | / compute-only "
        "| vs PowerSGD |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in res["rows"]:
        ratios = [fmt_spread(r.get(k), r.get(f"{k}_iqr")) for k in RATIOS]
        lines.append(
            f"| {r['workers']} | {r['bandwidth_mbit']:g} | {r['config']} | "
            f"{fmt_spread(r['step_seconds'], r.get('step_seconds_iqr'), '', 3)} | "
            f"{r['compute_seconds']:.3f} | {r['encode_seconds']:.4f} | {r['comm_seconds']:.3f} | "
            f"{r['decode_seconds']:.4f} | " + " | ".join(ratios) + " |"
        )
    for s in res.get("skipped", []):
        lines.append(f"\nskipped: {s}")
    return "\n".join(lines)


def plot_e2e(res: dict[str, Any], path: Path) -> None:
    """Speed-up over fp32 against bandwidth, one panel per worker count (bars: IQR over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["workers"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, k in zip(axes[0], ks, strict=True):
        for i, name in enumerate(CONFIG_NAMES):
            pts = sorted((r["bandwidth_mbit"], r["speedup_vs_fp32"], *(r.get("speedup_vs_fp32_iqr") or
                          [r["speedup_vs_fp32"]] * 2)) for r in res["rows"]
                         if r["workers"] == k and r["config"] == name and r.get("speedup_vs_fp32"))  # fmt: skip
            if pts:
                x, y, lo, hi = zip(*pts, strict=True)
                style = "--" if name.startswith("compute") else (":" if name.endswith("overlap") else "-")
                err = [[a - b for a, b in zip(y, lo, strict=True)], [b - a for a, b in zip(y, hi, strict=True)]]
                ax.errorbar(x, y, yerr=err, marker="o", label=name, ls=style, color=colors[i % len(colors)],
                            capsize=2)  # fmt: skip
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
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--configs", nargs="+", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    worker_main(_worker_args(sys.argv[1:]))
