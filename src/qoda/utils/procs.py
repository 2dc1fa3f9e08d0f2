"""Run a function on K gloo processes on 127.0.0.1 with hard time bounds (tests and benchmarks).

``run(fn, K, *args)`` returns ``[(status, value)]`` per rank, ``status`` ``"ok"`` or
``"error"`` (value: the formatted exception).  ``wait_for`` restricts which ranks must report
(for scenarios in which a rank is killed on purpose); ranks still alive at the end are killed.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn, rank, world, port, pg_timeout, queue, args, backend="gloo"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if backend == "nccl":  # one GPU per rank (round robin; NCCL itself refuses two ranks on one GPU)
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )  # fmt: skip
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result, time.time()))
    except BaseException as e:  # reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", time.time()))
    finally:
        # flush the report to the pipe now: a library that aborts the interpreter at exit (seen once
        # in 8 runs with PyTorch's PowerSGD state: "Resource deadlock avoided") must not lose it
        queue.close()
        queue.join_thread()
        if dist.is_initialized():
            dist.destroy_process_group()


def run(
    fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0, pg_timeout: float = 60.0,
    wait_for: Iterable[int] | None = None, times: dict[int, float] | None = None, backend: str = "gloo",
) -> list[tuple[str, Any]]:  # fmt: skip
    """``[fn(rank, world, *args) for rank]`` in a ``backend`` group (nccl: rank r on GPU r mod count);
    raises ``TimeoutError`` if the awaited ranks do not all report within ``timeout``.  Ranks not
    awaited that never report get ``("missing", None)``.
    ``times`` (optional) receives each reporting rank's ``time.time()`` at its report."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, pg_timeout, queue, args, backend)) for r in range(world)
    ]
    for p in procs:
        p.start()
    awaited = set(range(world) if wait_for is None else wait_for)
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while not awaited <= set(results):
            rank, status, value, when = queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            results[rank] = (status, value)
            if times is not None:
                times[rank] = when
    except queue_mod.Empty as e:
        raise TimeoutError(f"distributed run did not finish within {timeout} s (got ranks {sorted(results)})") from e
    finally:
        for p in procs:
            p.join(timeout=10 if wait_for is None else 1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results.get(r, ("missing", None)) for r in range(world)]


def values(results: list[tuple[str, Any]]) -> list[Any]:
    errors = [v for s, v in results if s != "ok"]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(map(str, errors)))
    return [v for _, v in results]
