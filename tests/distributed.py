"""Run a function on K gloo processes on 127.0.0.1, with a hard time bound (never a hung suite)."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, pg_timeout, queue, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )  # fmt: skip
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException as e:  # reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn, world: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0) -> list:
    """``[fn(rank, world, *args) for rank]``; raises if a rank failed or the run exceeded ``timeout``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, pg_timeout, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, object]] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            results[rank] = (status, value)
    except Exception as e:
        raise TimeoutError(f"distributed run did not finish within {timeout} s (got ranks {sorted(results)})") from e
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def values(results: list) -> list:
    errors = [v for s, v in results if s != "ok"]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(map(str, errors)))
    return [v for _, v in results]
