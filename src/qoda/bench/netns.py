"""Bandwidth-limited links between worker processes: network namespaces, veth pairs, a bridge, tbf.

Each worker ``i`` lives in namespace ``<tag>w<i>`` with address ``10.213.0.(i+1)/24`` on a veth
whose peer sits in a bridge namespace ``<tag>b``.  Both ends of every veth are shaped with a
token bucket filter (``tc qdisc ... tbf``; ``netem`` is not available here), so each worker's
link carries at most ``rate_mbit`` in each direction, as a switch port would.  Only addresses
inside these namespaces are ever used; everything is removed on exit (also on error).
Requires root and iproute2 (``ip``, ``tc``).

:func:`run_sweep` runs a benchmark's worker module over workers x bandwidth settings (``qoda
bench comm`` and ``qoda bench e2e``); :func:`worker_parser`, :func:`join_group` and
:func:`leave_group` are the worker's side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

SUBNET = "10.213.0"
PORT = 29611  # the group's port on worker 0: every setting has namespaces of its own, so one serves all
ERROR_CHARS = 300  # of a failed worker's stderr, kept (its end: the exception) in reports and logs


class NetnsUnavailable(RuntimeError):
    """The machine cannot create namespaces here (not root, no iproute2, no kernel support)."""


def _run(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` with the reason if namespaces cannot be used."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root, or skip the bandwidth benchmark)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"'{tool}' not found: install iproute2 (apt-get install iproute2)")


class Topology:
    """``with Topology(workers=4, rate_mbit=100) as topo:`` then run commands in ``topo.prefix(i)``."""

    def __init__(self, workers: int, rate_mbit: float, tag: str | None = None) -> None:
        if not 1 <= workers <= 200:
            raise ValueError(f"workers: must be in [1, 200], got {workers}")
        if not rate_mbit > 0:
            raise ValueError(f"rate_mbit: must be positive, got {rate_mbit}")
        check_available()
        self.workers = workers
        self.rate_mbit = rate_mbit
        self.tag = tag or f"q{os.getpid() % 100000}"
        self.bridge = f"{self.tag}b"
        self.names = [f"{self.tag}w{i}" for i in range(workers)]
        self._created: list[str] = []

    def addr(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def ifname(self, i: int) -> str:
        return f"{self.tag}v{i}a"

    def prefix(self, i: int) -> list[str]:
        """Command prefix that runs a program inside worker ``i``'s namespace."""
        return ["ip", "netns", "exec", self.names[i]]

    def _shape(self, ns: str, dev: str) -> None:
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = int(max(16_000, rate_bytes / 100))  # 10 ms of traffic, at least a few packets
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "400ms")  # fmt: skip

    def __enter__(self) -> Topology:
        try:
            _run("ip", "netns", "add", self.bridge)
            self._created.append(self.bridge)
            _run("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.bridge, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                _run("ip", "netns", "add", ns)
                self._created.append(ns)
                a, b = self.ifname(i), f"{self.tag}v{i}b"
                _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
                _run("ip", "link", "set", a, "netns", ns)
                _run("ip", "link", "set", b, "netns", self.bridge)
                _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", a)
                _run("ip", "-n", ns, "link", "set", a, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", self.bridge, "link", "set", b, "master", "br0")
                _run("ip", "-n", self.bridge, "link", "set", b, "up")
                self._shape(ns, a)
                self._shape(self.bridge, b)
        except Exception as e:
            self.close()
            raise NetnsUnavailable(f"could not build the namespace topology: {e}") from e
        return self

    def close(self) -> None:
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._created.clear()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class Loopback:
    """The no-root stand-in for :class:`Topology` (CI-sized smoke runs): every worker on this
    machine's loopback interface, links not rate-limited."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def addr(self, i: int) -> str:
        return "127.0.0.1"

    def ifname(self, i: int) -> str:
        return "lo"

    def prefix(self, i: int) -> list[str]:
        return []

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        return None


def run_workers(topo: Topology | Loopback, commands: list[list[str]], deadline: float) -> str | None:
    """Start ``commands[i]`` inside worker ``i``'s namespace; wait until all exit or ``deadline``
    (``time.monotonic()``).  Returns ``None`` on success, else the first failure (stderr tail, or
    the time bound).  Every process is killed before returning."""
    procs = [
        subprocess.Popen([*topo.prefix(i), *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i, cmd in enumerate(commands)
    ]
    failed = None
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0 and failed is None:
                failed = (p.stderr.read() if p.stderr else "")[-2000:] or f"exit code {p.returncode}"
    except subprocess.TimeoutExpired:
        failed = "run-time bound reached"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stderr:
                p.stderr.close()
    return failed


def _rows(path: Path) -> list[dict[str, Any]]:
    """Rank 0's rows; none if it wrote none (or was killed while writing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []


def run_sweep(
    module: str, workers: Sequence[int], rates_mbit: Sequence[float], worker_args: Sequence[str], *,
    max_seconds: float, setting_seconds: float, log: Callable[[str], None] = print, loopback: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """Run ``python -m module`` on every (workers, rate) setting, each in fresh namespaces.

    Worker ``i`` gets the arguments of :func:`worker_parser` (its rank and interface, the group
    address, the rate, ``--out`` and ``--pg-timeout``) followed by ``worker_args``; rank 0 writes
    its rows, a JSON list, to ``--out`` (as it goes: a stopped setting keeps the rows it finished).
    A setting starts only with at least ``setting_seconds`` left of ``max_seconds``; its group
    timeout is the time left, at least ``2 * setting_seconds``.  Returns every setting's rows and
    one line per setting skipped or stopped.  ``loopback``: no namespaces and no rate limit
    (:class:`Loopback`; the rates are then only labels), for smoke runs without root."""
    if not loopback:
        check_available()
    from qoda.utils.procs import free_port

    deadline = time.monotonic() + max_seconds
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for k in workers:
        for rate in rates_mbit:
            setting = f"{k} workers at {rate:g} Mbit/s"
            left = deadline - time.monotonic()
            if left < setting_seconds:
                skipped.append(f"{setting}: run-time bound reached")
                continue
            topology = Loopback(k) if loopback else Topology(k, rate)
            with topology as topo, tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "rows.json"
                port = free_port() if loopback else PORT
                common = ["--world", str(k), "--master", topo.addr(0), "--port", str(port), "--rate", str(rate),
                          "--out", str(out), "--pg-timeout", str(int(max(2 * setting_seconds, left)))]  # fmt: skip
                cmds = [
                    [sys.executable, "-m", module, "--rank", str(i), "--ifname", topo.ifname(i), *common, *worker_args]
                    for i in range(k)
                ]
                failed = run_workers(topo, cmds, deadline)
                got = _rows(out)
            rows.extend(got)
            why = failed[-ERROR_CHARS:].strip() if failed else ""
            if failed:
                skipped.append(f"{setting}: stopped after {len(got)} rows: {why}")
            log(f"{k} workers, {rate:g} Mbit/s: {len(got)} rows" + (f" ({why})" if failed else ""))
    return rows, skipped


# ---------------------------------------------------------------------------- inside a worker
def worker_parser() -> argparse.ArgumentParser:
    """The arguments every namespace worker takes (benchmarks add their own)."""
    p = argparse.ArgumentParser()
    for name in ("rank", "world", "port", "steps"):
        p.add_argument(f"--{name}", type=int, required=True)
    for name in ("master", "ifname", "out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--pg-timeout", type=int, default=600)
    return p


def join_group(a: argparse.Namespace) -> None:
    """One thread, gloo over this namespace's interface, the group at ``a.master:a.port``."""
    import torch
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = a.ifname
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{a.master}:{a.port}", rank=a.rank, world_size=a.world,
        timeout=timedelta(seconds=a.pg_timeout),
    )  # fmt: skip


def leave_group() -> None:
    """Barrier, destroy the group, and exit without interpreter teardown.

    Call once the results are on disk: destroying DDP reducers and gloo threads at exit
    sporadically ended in "terminate called without an active exception" (about 1 run in 20
    here), which would mark a complete run as failed.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
