"""DDP step time with qoda's hook (synchronous / overlapping) against PyTorch's hooks.

``python -m qoda.bench.hooks [--rate-mbit 100] [--rounds 5] [--steps 5] [--json out.json]``

Every worker process builds one DDP model per method, all from the same weights: an MLP of
``--layers`` ``--width x --width`` linear layers (several DDP buckets, ``--bucket-mb``) and a
real backward on a batch of ``--batch`` rows.  Methods: DDP's fp32 all-reduce, PyTorch's
``fp16_compress_hook`` and ``powerSGD_hook`` (rank 1), and qoda's hook (4-bit QSGD, fixed-width
coding) in ``allgather`` and ``two_phase`` modes, each synchronous and overlapping.  The
methods are **interleaved**: every round runs ``--steps`` timed steps of each method in turn,
so drifts of the machine hit all of them alike.  A step (forward + backward, barrier before)
counts at the slowest rank's time; per round and method the median step is kept; the
figures are the medians over rounds of those, and of the per-round ratios to fp32.

Links: 127.0.0.1 by default; with ``--rate-mbit`` the workers run in network namespaces
joined by links shaped with ``tc tbf`` (:mod:`qoda.bench.netns`, needs root).  Orchestration
only: the hook is :mod:`qoda.comm.ddp_hook`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

METHODS = (
    "fp32", "fp16_hook", "powersgd_r1", "qoda_allgather_sync", "qoda_allgather_overlap",
    "qoda_two_phase_sync", "qoda_two_phase_overlap",
)  # fmt: skip


def _model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods, nn.Linear(width, 1))


def _ddp(method: str, layers: int, width: int, bucket_mb: float, bits: int) -> tuple[nn.Module, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from qoda.comm.ddp_hook import QodaHookState
    from qoda.quant.config import QuantizerConfig
    from qoda.quant.policy import LayerPolicy

    device = _device()
    model = _model(layers, width).to(device)
    if method == "powersgd_r1":  # one bucket: its hook all-reduces from a future callback, which hangs
        bucket_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20 + 16  # on gloo with several buckets
    ids = None if device.type == "cpu" else [device]
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_mb)
    state: Any = None
    if method == "fp16_hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif method == "powersgd_r1":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif method.startswith("qoda_"):
        mode = "two_phase" if "two_phase" in method else "allgather"
        policy = LayerPolicy.global_(QuantizerConfig.qsgd(bits, 1024))
        state = QodaHookState(policy=policy, mode=mode, start_iter=0, overlap=method.endswith("overlap"), adapt=None)
        state.register(ddp)
    return ddp, state


def _device() -> torch.device:
    """The rank's GPU with NCCL (set by :func:`qoda.utils.procs.run`), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _step_seconds(ddp: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    dist.barrier()
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    ddp.zero_grad(set_to_none=False)
    nn.functional.mse_loss(ddp(x), y).backward()
    if cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64, device=x.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def measure(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs inside every worker (the group is up); returns per-method per-round medians."""
    torch.set_num_threads(1)
    methods = cfg["methods"]
    models = {m: _ddp(m, cfg["layers"], cfg["width"], cfg["bucket_mb"], cfg["bits"]) for m in methods}
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(cfg["batch"], cfg["width"], generator=g).to(_device())
    y = torch.randn(cfg["batch"], 1, generator=g).to(_device())
    for m in methods:  # warm-up: DDP rebuilds its buckets after step 0; PowerSGD starts at 2; numba compiles
        for _ in range(cfg["warmup"]):
            _step_seconds(models[m][0], x, y)
    rounds: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(cfg["rounds"]):
        for m in methods:
            rounds[m].append(statistics.median(_step_seconds(models[m][0], x, y) for _ in range(cfg["steps"])))
    stats = {}
    for m, (_, state) in models.items():
        if hasattr(state, "stats"):
            s = state.stats.as_dict()
            stats[m] = {k: v / max(1, s["calls"]) for k, v in s.items() if k != "calls"} | {"calls": s["calls"]}
    buckets = len(models[methods[-1]][1]._aggregators) if methods[-1].startswith("qoda_") else None
    return {"rounds": rounds, "per_call": stats, "buckets": buckets}


def summarize(rounds: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for m, ts in rounds.items():
        row = {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}
        if "fp32" in rounds:
            row["vs_fp32"] = statistics.median(t / b for t, b in zip(ts, rounds["fp32"], strict=True))
        if "qoda_allgather_sync" in rounds and m.startswith("qoda_allgather"):
            row["vs_sync"] = statistics.median(t / b for t, b in zip(ts, rounds["qoda_allgather_sync"], strict=True))
        if "qoda_two_phase_sync" in rounds and m.startswith("qoda_two_phase"):
            row["vs_sync"] = statistics.median(t / b for t, b in zip(ts, rounds["qoda_two_phase_sync"], strict=True))
        out[m] = row
    return out


def format_table(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [
        f"link: {res['link']}; {c['workers']} workers; rounds {c['rounds']} x steps {c['steps']}",
        "| method | median step s | min..max of round medians | vs fp32 | vs sync |",
        "|---|---|---|---|---|",
    ]
    for m, r in res["summary"].items():
        vs_sync = f"{r['vs_sync']:.3f}" if "vs_sync" in r else ""
        span = f"{r['min_s']:.4f}..{r['max_s']:.4f}"
        lines.append(f"| {m} | {r['median_s']:.4f} | {span} | {r.get('vs_fp32', 0):.3f} | {vs_sync} |")
    return "\n".join(lines)


def run_local(cfg: dict[str, Any], timeout: float, backend: str = "gloo") -> dict[str, Any]:
    from qoda.utils.procs import run, values

    res = values(run(measure, cfg["workers"], cfg, timeout=timeout, pg_timeout=timeout, backend=backend))[0]
    return {"link": f"127.0.0.1 (loopback, {backend})", **res}


#: Exit status of a GPU benchmark on a machine without CUDA.
NO_CUDA_EXIT = 3


def require_cuda(what: str) -> None:
    """Exit with :data:`NO_CUDA_EXIT` and one line if CUDA is not available (``what`` needs it)."""
    if not torch.cuda.is_available():
        print(f"{what}: no CUDA device on this machine (torch {torch.__version__}); nothing measured", file=sys.stderr)
        raise SystemExit(NO_CUDA_EXIT)


def run_netns(cfg: dict[str, Any], rate: float, timeout: float) -> dict[str, Any]:
    from qoda.bench.netns import Topology, check_available, run_workers

    check_available()
    k = cfg["workers"]
    with Topology(k, rate) as topo, tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        cfg_file = Path(tmp) / "cfg.json"
        cfg_file.write_text(json.dumps(cfg))
        cmds = [
            [sys.executable, "-m", "qoda.bench.hooks", "--worker", "--rank", str(i), "--world", str(k),
             "--master", topo.addr(0), "--port", "29613", "--ifname", topo.ifname(i), "--rate", str(rate),
             "--steps", str(cfg["steps"]), "--out", str(out), "--pg-timeout", str(int(timeout)),
             "--config", str(cfg_file)]
            for i in range(k)
        ]  # fmt: skip
        failed = run_workers(topo, cmds, time.monotonic() + timeout)
        if failed:
            raise RuntimeError(f"benchmark workers failed: {failed}")
        res = json.loads(out.read_text())
    return {"link": f"{rate:g} Mbit/s (netns + tc tbf)", **res}


def _worker_main(argv: list[str]) -> None:
    from qoda.bench.netns import join_group, leave_group, worker_parser

    p = worker_parser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--config", required=True)
    a = p.parse_args(argv)
    join_group(a)
    res = measure(a.rank, a.world, json.loads(Path(a.config).read_text()))
    if a.rank == 0:
        Path(a.out).write_text(json.dumps(res))
    leave_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qoda.bench.hooks", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate-mbit", type=float, nargs="*", default=[], help="shaped links (netns, root); none: loopback")
    p.add_argument("--no-loopback", action="store_true", help="only the shaped links")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", type=Path)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo",
                   help="nccl: worker r on CUDA device r (needs one device per worker)")
    a = p.parse_args(argv)
    if a.backend == "nccl":
        require_cuda("--backend nccl")
        if torch.cuda.device_count() < a.workers:  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected")
            print(f"--backend nccl: {a.workers} workers need {a.workers} CUDA devices (NCCL refuses two ranks on "
                  f"one GPU), found {torch.cuda.device_count()}", file=sys.stderr)  # fmt: skip
            raise SystemExit(NO_CUDA_EXIT)
        if a.rate_mbit:
            p.error("--rate-mbit: shaped links run gloo over network namespaces; use --backend gloo")
    cfg = {k: getattr(a, k) for k in ("workers", "layers", "width", "batch", "bucket_mb", "bits", "rounds", "steps",
                                       "warmup", "methods")}  # fmt: skip
    results = []
    runs: list[float | None] = ([] if a.no_loopback else [None]) + list(a.rate_mbit)
    for rate in runs:
        t0 = time.monotonic()
        res = run_local(cfg, a.timeout, a.backend) if rate is None else run_netns(cfg, rate, a.timeout)
        res["config"], res["wall_seconds"] = cfg, time.monotonic() - t0
        res["summary"] = summarize(res["rounds"])
        results.append(res)
        print(format_table(res), flush=True)
        print(f"(bytes and seconds per hook call: {json.dumps(res['per_call'])}; buckets: {res['buckets']})\n")
    if a.json:
        doc = {"benchmark": "hooks", "command": " ".join(sys.argv), "results": results}
        a.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker_main(sys.argv[1:])
    else:
        main()
