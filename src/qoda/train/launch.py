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

Before anything starts, the launcher refuses bad input in one line: every option the config
refuses (:class:`~qoda.train.config.TrainConfig`, the quantizer it implies included), a bit budget
the model's layer plan cannot hold (:func:`check_plan`), ``--device cuda`` without CUDA, an
``--out`` that is a file or already holds a run (unless ``--resume`` or ``--overwrite``),
``--resume`` with nothing to resume, and a committed checkpoint that is
damaged, foreign or of another config (every file is read, :func:`checkpoint.verify`).

SIGINT (Ctrl-C, to the launcher alone or to the whole process group) and SIGTERM stop every
worker within seconds (SIGTERM, then SIGKILL after :data:`GRACE_SECONDS`), keep the last
committed checkpoint and raise :class:`Interrupted` with the step reached and how to resume
(the command line exits 130 / 143).  Spawned workers ignore SIGINT (the launcher stops them)
and get SIGTERM if the launcher dies.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qoda.data.images import CHANNELS
from qoda.quant.kernels.warmup import announce_if_slow, warm_up
from qoda.train import checkpoint, rundir
from qoda.train.compression import layer_plan, resolve_allocation
from qoda.train.config import TrainConfig
from qoda.train.trainer import build_models, resolve_device, run_worker

GRACE_SECONDS = 5.0  # after SIGTERM, workers still alive this long later are SIGKILLed


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


def prepare_kernels(cfg: TrainConfig, announce: bool = True) -> None:
    """Compile the codec kernels ``cfg`` calls, in this process, before any worker starts
    (:mod:`qoda.quant.kernels.warmup`): the workers then load them from numba's on-disk cache
    instead of each compiling them before its first step.  When that takes more than a few
    seconds (a cold cache: a fresh install, or changed kernels) a line says so on stderr."""
    if not cfg.quantized:
        return
    modes = (True, False) if cfg.mode == "two_phase" else (True,)

    def write(message: str) -> None:
        if announce:
            print(f"qoda train: {message}", file=sys.stderr, flush=True)

    with announce_if_slow("compiling the codec kernels (once; numba caches them on disk)...", write):
        warm_up((cfg.coding,), modes)


def _parent_death_signal(sig: int) -> None:
    """Linux: deliver ``sig`` to this process when its parent (the launcher) dies."""
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _spawned(rank: int, cfg: TrainConfig, world: int, port: int, progress: Any) -> None:
    # SIGINT is ignored (inherited from the launcher: Ctrl-C on the group is handled there);
    # SIGTERM (the launcher stopping us, or its death) unwinds quietly: logs flushed, group closed.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _parent_death_signal(signal.SIGTERM)  # torch's spawn sets SIGINT, which this worker ignores
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the launcher died before the line above
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip

    def on_step(step: int) -> None:
        progress.value = step

    try:
        _init(cfg, rank, world)
        try:
            run_worker(cfg, rank, world, on_step=on_step if rank == 0 else None)
        finally:
            dist.destroy_process_group()
    except KeyboardInterrupt:  # stopped by the launcher, which reports; logs and the group are closed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip the interpreter's slow teardown (seconds with torch loaded)


def check_plan(cfg: TrainConfig) -> None:
    """Refuse here, as every worker would when it builds its averager, a bit budget that the
    model's layer plan cannot hold (``ConfigError`` naming ``bits``).  The models are built on the
    meta device (shapes only: no memory, no data read); with ``player_threads`` each player is planned on
    its own, as :func:`~qoda.train.compression.build_averager` does.  The language model
(``--task lm``) is planned as its DDP hook plans it."""
    if not cfg.adaptive:
        return
    if cfg.task == "lm":
        from qoda.lm.task import build_model

        with torch.device("meta"):
            resolve_allocation(cfg, layer_plan(cfg, build_model(cfg)))
        return
    with torch.device("meta"):
        generator, critic = build_models(cfg, CHANNELS[cfg.dataset])
    players = nn.ModuleDict({"generator": generator, "critic": critic})
    parts = [nn.ModuleDict({n: m}) for n, m in players.named_children()] if cfg.player_threads else [players]
    for part in parts:
        resolve_allocation(cfg, layer_plan(cfg, part))


def train(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run ``cfg`` (see the module docstring for how workers start); returns rank 0's report.

    Raises ``ConfigError`` / ``CheckpointError`` on bad input before any worker starts,
    :class:`WorkerError` when a spawned worker fails and :class:`Interrupted` on SIGINT/SIGTERM."""
    resolve_device(cfg.device)  # --device cuda without CUDA: one line, before any process starts
    check_plan(cfg)
    out = Path(cfg.out)
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rundir.check(cfg, strict_resume=False)  # the agent re-runs the same command: --resume = "if any"
        if cfg.overwrite and rank == 0:
            rundir.clear(out)  # before the rendezvous: nobody writes until every rank has joined
        if cfg.resume and rank == 0 and checkpoint.latest(out) is None:
            print(f"qoda train: --resume: no committed checkpoint in {out} yet; starting at step 0", file=sys.stderr)
        prepare_kernels(cfg, announce=rank == 0)
        _init(cfg, rank, world)
        try:
            return run_worker(cfg, rank, world)
        finally:
            dist.destroy_process_group()
    rundir.check(cfg)
    if cfg.resume:  # read every file of the checkpoint: refuse a damaged or incompatible one before starting
        checkpoint.verify(out, cfg, cfg.workers)
    elif cfg.overwrite:
        rundir.clear(out)
    prepare_kernels(cfg)  # once, here: spawned workers load the compiled kernels from the cache
    if cfg.workers == 1:
        return _train_here(cfg)
    return _train_spawned(cfg)


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run; the message says where and how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _interrupted(cfg: TrainConfig, signum: int, step: int) -> Interrupted:
    try:
        ptr = checkpoint.latest(Path(cfg.out))
    except checkpoint.CheckpointError:
        ptr = None
    if ptr is None:
        again = "rerun the same command" if cfg.overwrite else "rerun the same command with --overwrite"
        how = f"last committed checkpoint: none yet; {again} to start again"
    else:
        step = max(step, int(ptr["step"]))  # committed just before the progress counter moved
        again = "rerun the same command" if cfg.resume else "rerun the same command with --resume"
        how = f"last committed checkpoint: step {ptr['step']}; {again}"
    return Interrupted(f"interrupted ({signal.Signals(signum).name}) at step {step}; {how}", signum)


@contextmanager
def _signals(handler: Callable[[int, Any], None] | int, which: tuple[int, ...]) -> Iterator[None]:
    """``handler`` for the signals ``which`` inside the block (main thread only), then the previous ones."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in which}
    for s in which:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _train_here(cfg: TrainConfig) -> dict[str, Any] | None:
    """One worker in this process: SIGINT/SIGTERM unwind the loop (checkpoints are atomic)."""
    got: list[int] = []
    step = [0]

    def on_signal(signum: int, frame: Any) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    def on_step(s: int) -> None:
        step[0] = s

    try:
        with _signals(on_signal, (signal.SIGINT, signal.SIGTERM)):
            return run_worker(cfg, 0, 1, on_step=on_step)
    except KeyboardInterrupt:
        raise _interrupted(cfg, got[0] if got else signal.SIGINT, step[0]) from None


def _train_spawned(cfg: TrainConfig) -> dict[str, Any] | None:
    """``cfg.workers`` processes; the launcher waits, relays SIGINT/SIGTERM and reports the first error."""
    got: list[int] = []
    progress = mp.get_context("spawn").RawValue("q", 0)  # rank 0's completed steps

    def on_signal(signum: int, frame: Any) -> None:
        got.append(signum)

    with _signals(on_signal, (signal.SIGTERM,)), _signals(signal.SIG_IGN, (signal.SIGINT,)):
        # the workers inherit "ignore SIGINT": a Ctrl-C on the whole group reaches them through us
        ctx = mp.start_processes(_spawned, args=(cfg, cfg.workers, free_port(), progress), nprocs=cfg.workers,
                                 join=False, start_method="spawn")  # fmt: skip
    try:
        with _signals(on_signal, (signal.SIGINT, signal.SIGTERM)):
            while not got and not ctx.join(timeout=0.2):
                pass
            if got:
                _stop(ctx.processes, got)
                raise _interrupted(cfg, got[0], int(progress.value))
    except mp.ProcessRaisedException as e:
        last = [ln for ln in str(e.msg).strip().splitlines() if ln.strip()][-1]
        raise WorkerError(f"worker {e.error_index} failed: {last}") from None
    except mp.ProcessExitedException as e:
        raise WorkerError(f"worker {e.error_index} died (exit code {e.exit_code}); the others were stopped") from None
    finally:
        _stop(ctx.processes, got)  # never leave a worker behind (no-op when all have exited)
    return json.loads((Path(cfg.out) / "report.json").read_text())


def _stop(processes: list[Any], got: list[int]) -> None:
    """SIGTERM every live worker, SIGKILL those alive after :data:`GRACE_SECONDS` (or at a second signal)."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline, signals = time.monotonic() + GRACE_SECONDS, len(got)
    while any(p.is_alive() for p in alive) and time.monotonic() < deadline and len(got) <= signals:
        time.sleep(0.05)
    for p in alive:
        if p.is_alive():
            p.kill()
        p.join()


class WorkerError(RuntimeError):
    """A spawned worker failed; the message is its error's last line."""
