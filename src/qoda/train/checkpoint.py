"""Sharded, atomic, all-or-nothing checkpoints of a distributed run.

Layout under ``<out>/checkpoints/``::

    step-000250/common.pt    models, EMA, optimizer, history, config   (written by rank 0)
    step-000250/rank-0.pt    this worker's RNG states, averager state, counters (one per rank)
    latest.json              {"step": 250, "world": 2, "dir": "step-000250"}   <- the commit point

Every file is written atomically (temporary file, fsync, rename).  ``latest.json`` is only
replaced after a barrier, once every rank's files are durable, so a crash or kill at any
moment leaves the previous complete checkpoint as the one ``--resume`` finds; the directory
of the checkpoint before it is then removed.  A checkpoint written under another config
(any trajectory field, see :meth:`TrainConfig.fingerprint`) or another world size is refused
with a message naming the differing fields.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qoda.train.config import ConfigError, TrainConfig
from qoda.utils.atomic import atomic_save, atomic_write_json

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or incompatible with this run."""


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def save(out: Path, step: int, common: dict[str, Any] | None, per_rank: dict[str, Any], rank: int, world: int) -> None:
    """Collective: every rank writes its shard; rank 0 writes ``common`` and commits."""
    root = checkpoint_root(out)
    d = root / f"step-{step:07d}"
    atomic_save(
        {"version": FORMAT_VERSION, "step": step, "rank": rank, "world": world, **per_rank}, d / f"rank-{rank}.pt"
    )
    if rank == 0:
        assert common is not None
        atomic_save({"version": FORMAT_VERSION, "step": step, "world": world, **common}, d / "common.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        pointer = {"step": step, "world": world, "dir": d.name, "config": common["config"]}
        atomic_write_json(pointer, root / "latest.json")
        for old in root.glob("step-*"):  # keep only the committed one (and never a half-written newer one)
            if old.name != d.name:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()


def latest(out: Path) -> dict[str, Any] | None:
    """The committed checkpoint's pointer, or ``None`` when the run has none."""
    path = checkpoint_root(out) / "latest.json"
    if not path.is_file():
        return None
    try:
        ptr = json.loads(path.read_text())
        int(ptr["step"]), int(ptr["world"]), str(ptr["dir"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint pointer {path} is damaged: {e}") from None
    return ptr


def check_compatible(out: Path, cfg: TrainConfig, world: int) -> dict[str, Any] | None:
    """The committed pointer if ``cfg`` with ``world`` workers may resume from it (``None``: no
    checkpoint); raises with the differing fields otherwise.  Cheap: reads ``latest.json`` only."""
    ptr = latest(out)
    if ptr is None:
        return None
    if int(ptr["world"]) != world:
        raise CheckpointError(
            f"resume: the checkpoint at step {ptr['step']} was written by {ptr['world']} workers, this run has "
            f"{world}; the per-worker data shards and random streams would differ (restart with {ptr['world']})"
        )
    if "config" in ptr:
        _check_config(out, cfg, ptr["config"])
    return ptr


def _check_config(out: Path, cfg: TrainConfig, saved: dict[str, Any]) -> None:
    diff = cfg.trajectory_diff(saved)
    if diff:
        detail = ", ".join(f"{k}={saved.get(k)!r} (now {cfg.to_dict()[k]!r})" for k in diff)
        raise ConfigError(f"resume: the checkpoint in {out} was written with a different config: {detail}")


def load(out: Path, cfg: TrainConfig, rank: int, world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(common, per_rank)`` of the committed checkpoint, after compatibility checks."""
    ptr = check_compatible(out, cfg, world)
    if ptr is None:
        raise CheckpointError(f"resume: no committed checkpoint under {checkpoint_root(out)}")
    d = checkpoint_root(out) / ptr["dir"]
    try:
        common = torch.load(d / "common.pt", map_location="cpu", weights_only=False)
        mine = torch.load(d / f"rank-{rank}.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # torch.load raises many types on a damaged file
        raise CheckpointError(f"resume: checkpoint {d} cannot be read: {e}") from None
    if common.get("version") != FORMAT_VERSION or mine.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"resume: checkpoint {d} has format {common.get('version')}, expected {FORMAT_VERSION}")
    _check_config(out, cfg, common["config"])
    if int(mine["step"]) != int(common["step"]):
        raise CheckpointError(f"resume: checkpoint {d} mixes steps {mine['step']} and {common['step']}")
    return common, mine
