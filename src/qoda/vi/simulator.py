"""K workers in one process: independent oracle noise and quantization per worker.

The quantized averager runs the very arithmetic of the distributed ``allgather`` mode
(:func:`qoda.comm.aggregate.average_payloads`, same seeds ``(seed, exchange, rank)``), so a
simulated run and a run across real processes give the same iterates bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm.aggregate import average_payloads, derive_seed
from qoda.comm.averager import Averager, CommStats
from qoda.optim import OPTIMIZERS, create_optimizer
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerEntry, LayerPlan
from qoda.vi.problems import DTYPE, PROBLEMS, Noise, VIProblem

#: Hyper-parameters of the suite (operators are scaled to Lipschitz constant ~1); another registered
#: optimizer runs with its own defaults.
DEFAULT_HYPER: dict[str, dict[str, float]] = {
    "qoda": {"lr": 1.0, "precondition": "none"},  # the analysed method (QODA's default is the Adam variant)
    "qgenx": {"lr": 1.0},
    "gda": {"lr": 0.2},
    "eg": {"lr": 0.2},
    "og": {"lr": 0.2},
    "extra_adam": {"lr": 0.01},
    "optimistic_adam": {"lr": 0.01},
    "adam": {"lr": 0.01},
}


class SimulatedWorkers(Averager):
    """An averager standing for ``world`` workers inside one process: :meth:`set_worker_tensors`
    gives it every worker's tensors (``worker_grads``) before each :meth:`average_`."""

    simulates_workers = True

    def __init__(self, world: int) -> None:
        super().__init__()
        self.world = world
        self.worker_grads: list[list[torch.Tensor]] = []

    def set_worker_tensors(self, worker_tensors: Sequence[Sequence[torch.Tensor]]) -> None:
        self.worker_grads = [list(g) for g in worker_tensors]


class ExactAverager(SimulatedWorkers):
    """Unquantized mean of the workers' dual vectors (rank order), 32 bits per coordinate on the wire.

    In-process: ``worker_grads`` are averaged; the tensors given to :meth:`average_` only receive
    the result."""

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        for i, t in enumerate(tensors):
            acc = torch.zeros_like(t)
            for g in self.worker_grads:
                acc += g[i]
            t.copy_(acc / self.world)
        st = CommStats(calls=1, payload_bits=32 * sum(t.numel() for t in tensors))
        self.stats += st
        return st


class SimulatedAverager(SimulatedWorkers):
    """Quantized mean of the workers' dual vectors, as :class:`qoda.comm.aggregate.Aggregator` (allgather).

    In-process, like :class:`ExactAverager`: ``worker_grads`` are quantized (seeds
    ``(seed, step, worker)``) and averaged into the tensors given to :meth:`average_`."""

    def __init__(self, plan: LayerPlan, world: int, seed: int = 0) -> None:
        super().__init__(world)
        self.codec = LayerwiseCodec(plan)
        self.seed = seed

    @property
    def plan(self) -> LayerPlan:
        return self.codec.plan

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        msgs = [
            self.codec.encode_flats(self.codec.gather(g), derive_seed(self.seed, step, k))
            for k, g in enumerate(self.worker_grads)
        ]
        acc = average_payloads(self.codec, [m.data for m in msgs], self.world)
        self.codec.scatter(acc, tensors, accumulate=False)
        st = CommStats(calls=1, payload_bits=msgs[0].code_bits, bytes_sent=len(msgs[0]))
        self.stats += st
        return st


def layerwise_plan(blocks: Sequence[int], bits: int, bucket_size: int = 1024) -> LayerPlan:
    """One type per player block (layer-wise: each block has its own levels), QSGD levels."""
    entries = tuple(LayerEntry(f"player{i}", torch.Size([n]), f"player{i}") for i, n in enumerate(blocks))
    cfg = QuantizerConfig.qsgd(bits, bucket_size)
    return LayerPlan(entries, {e.type_name: cfg for e in entries})


@dataclass(frozen=True)
class RunConfig:
    problem: str = "bilinear"
    method: str = "qoda"
    noise: Noise = field(default_factory=Noise)
    bits: int | None = None  # None: unquantized (fp32 on the wire)
    workers: int = 4
    iterations: int = 2000
    d: int = 40
    seed: int = 0
    hyper: dict | None = None

    def __post_init__(self) -> None:
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem: expected one of {sorted(PROBLEMS)}, got {self.problem!r}")
        if self.method not in OPTIMIZERS:
            raise ValueError(f"method: expected one of {sorted(OPTIMIZERS)}, got {self.method!r}")
        if self.bits is not None and not 2 <= self.bits <= 16:
            raise ValueError(f"bits: must be None or in [2, 16], got {self.bits!r}")
        for name in ("workers", "iterations", "d"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")


def checkpoints(iterations: int, n: int = 24) -> list[int]:
    pts = np.unique(np.round(np.logspace(0, math.log10(iterations), n)).astype(int))
    return [int(p) for p in pts]


def fitted_slope(ts: Sequence[int], gaps: Sequence[float], start_fraction: float = 0.1) -> float:
    """Least-squares slope of log(gap) against log(t) over ``t >= start_fraction * T``."""
    t = np.asarray(ts, dtype=float)
    g = np.asarray(gaps, dtype=float)
    keep = (t >= start_fraction * t.max()) & (g > 0)
    if keep.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(t[keep]), np.log(g[keep]), 1)[0])


def simulate(
    cfg: RunConfig, problem: VIProblem | None = None, averager: Averager | None = None, rank: int | None = None
) -> dict:
    """Run one method on one problem with ``cfg.workers`` simulated workers; return the history.

    Across real processes, pass the process's ``rank`` and a real averager (an
    :class:`~qoda.comm.aggregate.Aggregator` over :func:`layerwise_plan`): the process then
    queries only its own worker's oracle, and the iterates equal the simulated ones.
    """
    prob = problem or PROBLEMS[cfg.problem](d=cfg.d, seed=cfg.seed)
    params = [nn.Parameter(torch.zeros(n, dtype=DTYPE)) for n in prob.blocks]
    if averager is None:
        averager = (
            ExactAverager(cfg.workers)
            if cfg.bits is None
            else SimulatedAverager(layerwise_plan(prob.blocks, cfg.bits), cfg.workers, seed=cfg.seed)
        )
    hyper = {**DEFAULT_HYPER.get(cfg.method, {}), **(cfg.hyper or {})}
    opt = create_optimizer(cfg.method, params, averager=averager, **hyper)
    ranks = range(cfg.workers) if rank is None else [rank]
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * k + 1) for k in ranks]

    def query() -> torch.Tensor:
        z = torch.cat([p.detach() for p in params])
        grads = [list(prob.oracle(z, cfg.noise, g).split(list(prob.blocks))) for g in gens]
        if averager.simulates_workers:
            averager.set_worker_tensors(grads)
        for p, g in zip(params, grads[0], strict=True):
            p.grad = g.clone()
        return z

    marks = set(checkpoints(cfg.iterations))
    ergodic = torch.zeros(prob.dim, dtype=DTYPE)
    rows = []
    two_call = opt.calls_per_iteration == 2
    for t in range(1, cfg.iterations + 1):
        if two_call:
            query()
            opt.extrapolation()
        ergodic += query()  # the point of the (last) oracle call: X_{t+1/2}
        opt.step()
        if t in marks:
            avg = ergodic / t
            last = torch.cat([p.detach() for p in params])
            gap = prob.gap(avg)
            if not math.isfinite(gap) or gap > 1e12:
                rows.append({"t": t, "gap": float("inf"), "gap_last": float("inf"), "distance": float("inf"),
                             "distance_last": prob.distance(torch.cat([p.detach() for p in params])),
                             **opt.counters})  # fmt: skip
                break
            rows.append({
                "t": t, "gap": gap, "gap_last": prob.gap(last), "distance": prob.distance(avg),
                "distance_last": prob.distance(last), "operator_norm": float(prob.operator(last).norm()),
                **opt.counters,
            })  # fmt: skip
    final = rows[-1]
    return {
        "problem": prob.name, "method": cfg.method, "noise": cfg.noise.kind, "sigma": cfg.noise.sigma,
        "bits": cfg.bits or 32, "workers": cfg.workers, "iterations": final["t"],
        "exchanges": final.get("exchanges", 0), "bits_sent": final.get("bits_sent", 0),
        "final_gap": final["gap"], "final_gap_last": final["gap_last"],
        "slope": fitted_slope([r["t"] for r in rows], [r["gap"] for r in rows]),
        "diverged": not math.isfinite(final["gap"]), "history": rows,
    }  # fmt: skip
