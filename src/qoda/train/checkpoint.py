"""Sharded, atomic, all-or-nothing checkpoints of a distributed run.

Layout under ``<out>/checkpoints/``::

    step-000250/common.pt    models, EMA, optimizer, history, config   (written by rank 0)
    step-000250/rank-0.pt    this worker's RNG states, averager state, counters (one per rank)
    latest.json              {"step": 250, "world": 2, "dir": "step-000250", "version": 2}   <- the commit point

Every file is written atomically (temporary file, fsync, rename).  ``latest.json`` is only
replaced after a barrier, once every rank's files are durable, so a crash or kill at any
moment leaves the previous complete checkpoint as the one ``--resume`` finds; the directory
of the checkpoint before it is then removed.  A checkpoint written under another config
(any trajectory field, see :meth:`TrainConfig.fingerprint`) or another world size is refused
with a message naming the differing fields.

Files hold tensors and plain values only (dicts, lists, tuples, numbers, strings, ``None``):
NumPy arrays and NumPy random states are stored as tagged dicts of tensors (:func:`to_plain`)
and rebuilt on load (:func:`from_plain`), and every file is read with
``torch.load(weights_only=True)``, so a checkpoint cannot run code: one that names any other
Python object is refused (:class:`CheckpointError`) without executing it.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from qoda.train.config import ConfigError, TrainConfig
from qoda.utils.atomic import atomic_save, atomic_write_json

# 2: plain values and tensors only, read with weights_only=True (1: pickled NumPy objects)
FORMAT_VERSION = 2
_TAG = "__qoda_plain__"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or incompatible with this run."""


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


# ---------------------------------------------------------------------------------------------- plain values
def to_plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with every NumPy array / random state replaced by a tagged dict of tensors and
    plain values; anything that is neither plain nor one of those raises ``TypeError``."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, torch.Size):
        return tuple(int(v) for v in obj)
    if isinstance(obj, np.generic):  # NumPy scalars: the equal Python number
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf" or obj.dtype == np.uint64:
            raise TypeError(f"{where}: cannot store a NumPy array of dtype {obj.dtype}")
        stored = obj.astype(np.int64) if obj.dtype.kind == "u" and obj.dtype != np.uint8 else obj
        return {_TAG: "ndarray", "dtype": obj.dtype.str, "data": torch.from_numpy(np.ascontiguousarray(stored).copy())}
    if isinstance(obj, np.random.RandomState):
        name, keys, pos, has_gauss, gauss = obj.get_state(legacy=True)
        return {_TAG: "RandomState", "name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}  # fmt: skip
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} (str or int only)")
            out[k] = to_plain(v, f"{where}.{k}")
        if _TAG in out:
            raise TypeError(f"{where}: the key {_TAG!r} is reserved")
        return out
    if type(obj) in (list, tuple):
        return type(obj)(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: cannot store {type(obj).__module__}.{type(obj).__qualname__} in a checkpoint "
                    "(tensors and plain values only)")  # fmt: skip


def from_plain(obj: Any) -> Any:
    """The inverse of :func:`to_plain`."""
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if tag == "ndarray":
            return obj["data"].numpy().astype(np.dtype(obj["dtype"]))
        if tag == "RandomState":
            rs = np.random.RandomState()
            keys = obj["keys"].numpy().astype(np.uint32)
            rs.set_state((obj["name"], keys, obj["pos"], obj["has_gauss"], obj["cached_gaussian"]))
            return rs
        if tag is not None:
            raise CheckpointError(f"unknown stored value type {tag!r}")
        return {k: from_plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(from_plain(v) for v in obj)
    return obj


def read_file(path: Path) -> dict[str, Any]:
    """One checkpoint file: tensors and plain values only (never runs code), NumPy values rebuilt.
    Raises :class:`CheckpointError` naming the file when it is damaged, not a checkpoint, of
    another format version, or names any other Python object."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused the file: nothing of it was executed
        detail = _unpickling_detail(e)
        if "GLOBAL" in detail.upper():
            raise CheckpointError(
                f"checkpoint file {path} holds Python objects other than tensors and plain values (refused, nothing "
                f"of it was run: {detail[:160]}); it was not written by this version of qoda (checkpoint format "
                f"{FORMAT_VERSION}) or it was altered"
            ) from None
        raise CheckpointError(f"checkpoint file {path} is damaged or not a checkpoint: {detail[:160]}") from None
    except Exception as e:  # a truncated or garbage file: torch raises many types
        raise CheckpointError(f"checkpoint file {path} is damaged or not a checkpoint: {_first_line(e)}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint file {path} is not a qoda checkpoint (holds a {type(raw).__name__})")
    if raw.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file {path} has format {raw.get('version')}, this version of qoda reads format "
            f"{FORMAT_VERSION}; continue it with the qoda that wrote it, or start again with --overwrite"
        )
    try:
        return from_plain(raw)
    except (CheckpointError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {path} is damaged: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's messages run to several lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0].split('. ')[0][:200] if lines else ''}"


_BOILERPLATE = ("weights only load failed", "check the documentation", "please file an issue", "(1)", "(2)")


def _unpickling_detail(e: BaseException) -> str:
    """The informative sentence of torch's weights-only refusal (its wording varies between
    versions), e.g. ``Unsupported global: GLOBAL io.open was not an allowed global by default``
    or ``Unsupported operand 181``."""
    lines = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and not ln.lower().startswith(_BOILERPLATE)]
    line = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
    return line.split(". ")[0].rstrip(".") if line else _first_line(e)


# ---------------------------------------------------------------------------------------------- save / load
def save(out: Path, step: int, common: dict[str, Any] | None, per_rank: dict[str, Any], rank: int, world: int) -> None:
    """Collective: every rank writes its shard; rank 0 writes ``common`` and commits."""
    root = checkpoint_root(out)
    d = root / f"step-{step:07d}"
    shard = {"version": FORMAT_VERSION, "step": step, "rank": rank, "world": world, **per_rank}
    atomic_save(to_plain(shard, f"rank-{rank}.pt"), d / f"rank-{rank}.pt")
    if rank == 0:
        assert common is not None
        atomic_save(to_plain({"version": FORMAT_VERSION, "step": step, "world": world, **common}, "common.pt"),
                    d / "common.pt")  # fmt: skip
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        pointer = {"step": step, "world": world, "dir": d.name, "version": FORMAT_VERSION, "config": common["config"]}
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
    version = ptr.get("version", 1)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"resume: the checkpoint at step {ptr['step']} in {out} has format {version} (an older qoda); this "
            f"version reads format {FORMAT_VERSION}: continue it with the qoda that wrote it, or start again with "
            "--overwrite"
        )
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


def _committed(out: Path, cfg: TrainConfig, world: int) -> tuple[dict[str, Any], Path]:
    ptr = check_compatible(out, cfg, world)
    if ptr is None:
        raise CheckpointError(f"resume: no committed checkpoint under {checkpoint_root(out)}")
    return ptr, checkpoint_root(out) / ptr["dir"]


def _load_rank(d: Path, rank: int, common: dict[str, Any]) -> dict[str, Any]:
    mine = read_file(d / f"rank-{rank}.pt")
    if int(mine.get("step", -1)) != int(common["step"]) or int(mine.get("rank", -1)) != rank:
        raise CheckpointError(
            f"resume: checkpoint file {d / f'rank-{rank}.pt'} is of step {mine.get('step')} rank {mine.get('rank')}, "
            f"expected step {common['step']} rank {rank}"
        )
    return mine


def _load_common(out: Path, cfg: TrainConfig, d: Path) -> dict[str, Any]:
    common = read_file(d / "common.pt")
    if not isinstance(common.get("config"), dict) or "step" not in common:
        raise CheckpointError(f"checkpoint file {d / 'common.pt'} is damaged: no config or step")
    _check_config(out, cfg, common["config"])
    return common


def verify(out: Path, cfg: TrainConfig, world: int) -> dict[str, Any]:
    """Read every file of the committed checkpoint (``common.pt`` and each rank's) as :func:`load`
    will, so that a damaged, foreign or incompatible checkpoint is refused before any worker
    starts; returns the pointer.  About a second for the DCGAN pair."""
    ptr, d = _committed(out, cfg, world)
    common = _load_common(out, cfg, d)
    for rank in range(world):
        _load_rank(d, rank, common)
    return ptr


def load(out: Path, cfg: TrainConfig, rank: int, world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(common, per_rank)`` of the committed checkpoint, after compatibility checks."""
    _ptr, d = _committed(out, cfg, world)
    common = _load_common(out, cfg, d)
    return common, _load_rank(d, rank, common)
