"""Starting workers: under ``torchrun`` (environment variables), or ``--workers N`` local processes.

* torchrun / any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``:
  this process is one worker; the process group uses NCCL on CUDA, gloo otherwise.  Elastic
  restarts (``torchrun --max-restarts``) start the workers again; with ``resume = true`` they
  continue from the last committed checkpoint.
* ``workers = N > 1`` outside torchrun: N worker processes are spawned on 127.0.0.1 (a free
  port is picked); if one fails, the others are stopped and the first error is raised.
* ``workers = 1``: a single process, no process group.

``timeout_seconds`` bounds every collective: a dead or stalled worker makes the others fail
with a clear error after at most that long instead of hanging.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qoda.train import checkpoint
from qoda.train.config import TrainConfig
from qoda.train.trainer import resolve_device, run_worker


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(cfg: TrainConfig, rank: int, world: int) -> None:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    timeout = datetime.timedelta(seconds=cfg.timeout_seconds)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        return
    # Under the elastic agent the store outlives restarts: prefix every key with the restart
    # round, or a restarted worker can read a dead peer's gloo address from the previous round
    # ("Gloo connectFullMesh failed ... Connection refused", measured in `qoda bench faults`).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=(rank == 0 and not agent_store), timeout=timeout)  # fmt: skip
    store = dist.PrefixStore(f"qoda/round-{os.environ['TORCHELASTIC_RESTART_COUNT']}", base)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _spawned(rank: int, cfg: TrainConfig, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    _init(cfg, rank, world)
    try:
        run_worker(cfg, rank, world)
    finally:
        dist.destroy_process_group()


def train(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run ``cfg`` (see the module docstring for how workers start); returns rank 0's report."""
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _init(cfg, rank, world)
        try:
            return run_worker(cfg, rank, world)
        finally:
            dist.destroy_process_group()
    if cfg.resume:  # refuse an incompatible checkpoint before starting anything
        checkpoint.check_compatible(Path(cfg.out), cfg, cfg.workers)
    if cfg.workers == 1:
        return run_worker(cfg, 0, 1)
    try:
        mp.start_processes(_spawned, args=(cfg, cfg.workers, free_port()), nprocs=cfg.workers, join=True,
                           start_method="spawn")  # fmt: skip
    except mp.ProcessRaisedException as e:
        last = [ln for ln in str(e.msg).strip().splitlines() if ln.strip()][-1]
        raise WorkerError(f"worker {e.error_index} failed: {last}") from None
    except mp.ProcessExitedException as e:
        raise WorkerError(f"worker {e.error_index} died (exit code {e.exit_code}); the others were stopped") from None
    return json.loads((Path(cfg.out) / "report.json").read_text())


class WorkerError(RuntimeError):
    """A spawned worker failed; the message is its error's last line."""
