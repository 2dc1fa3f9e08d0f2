import sys
import time

import pytest
import torch
from torch import nn

from qoda.report.digits import DigitsCNN, load_digits_tensors


@pytest.fixture(scope="module")
def gloo_world_1():
    """A 1-process gloo group on an in-memory store (no port, no environment variables), shared by
    the tests of a module that ask for it."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """One FID-extractor cache for the whole session (child processes inherit it), never ~/.cache."""
    import os

    os.environ["QODA_CACHE"] = str(tmp_path_factory.mktemp("qoda-cache"))
    yield


#: Imports of the tests that start worker processes (the gloo runner, ``qoda train``, the CLI,
#: the benchmarks), found in a test module's source.
_SPAWNING = ("distributed import run", "qoda.utils.procs", "qoda.train.launch", "qoda.cli import", "qoda.bench")


def _spawns(path) -> bool:
    return any(mark in path.read_text() for mark in _SPAWNING)


_REFERENCE_PATH = """
import torch
from qoda.codec.segment import decode, decode_into, encode, encode_tensor
from qoda.quant.config import QuantizerConfig
from qoda.quant.kernels.warmup import warm_up
from qoda.quant.quantizer import quantize
def reference_path(coding):
    cfg = QuantizerConfig.qsgd(2, 64, coding=coding)
    xs = [torch.linspace(-1.0, 1.0, 300), torch.ones(7)]
    q = quantize(xs, cfg, 1)
    enc = encode(q)
    encode_tensor(xs, cfg, 1)
    decode(enc.tobytes(), cfg, [t.shape for t in xs]).dequantize()
    for accumulate in (True, False):
        decode_into(enc.data, cfg, torch.zeros(q.numel), accumulate=accumulate)
"""

#: numba compiles one kernel at a time, in one thread: on a cold cache these two processes compile
#: side by side (two cores) what the suite compiled one after the other: the fused message kernels
#: of a training job and the entropy coder's kernels (both on their production path and on the
#: per-segment reference path the in-process codec tests call), and the reference path's
#: fixed-width kernels (its most expensive compilations, ~half of the total).
_WARM_UP_JOBS = (
    _REFERENCE_PATH + "warm_up(('fixed', 'entropy'), (True, False))\nreference_path('entropy')\n",
    _REFERENCE_PATH + "reference_path('fixed')\n",
)


def _warm_up_in_parallel() -> None:
    """Run :data:`_WARM_UP_JOBS` in child processes at once (each fills numba's on-disk cache);
    a job that fails or hangs only costs its time: the kernels it missed compile on first use."""
    import subprocess
    import tempfile
    from contextlib import ExitStack

    env = _child_env(OMP_NUM_THREADS="1")
    with ExitStack() as stack:
        # logs in files, not pipes: a full pipe would stall its job until the other one ends
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in _WARM_UP_JOBS]
        jobs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=log)
                for code, log in zip(_WARM_UP_JOBS, logs, strict=True)]  # fmt: skip
        for job, log in zip(jobs, logs, strict=True):
            try:
                job.wait(timeout=900)
            except subprocess.TimeoutExpired:
                job.kill()
                job.wait()
            if job.returncode:
                log.seek(0)
                err = log.read().decode(errors="replace")[-300:]
                print(f"\na kernel warm-up process failed (its kernels compile on first use): {err}", file=sys.stderr)


#: Tests whose first run in a fresh Inductor cache is mostly compilation (the C++ code of the device
#: codec's compiled layouts, ~60 s of CPU): when other tests run before them, a background process
#: runs them first, on the core the mostly single-threaded tests leave idle, and fills the on-disk
#: cache; the test itself then compiles through that cache and checks the very same generated code.
_PRECOMPILED = ("test_device_codec.py::test_compiled_same_bytes",)
#: Tests that must run before the first of them for the background process to have a core to itself.
_PRECOMPILE_AFTER = 100
_precompiling: list = []


def _child_env(*paths: str, **settings: str) -> dict[str, str]:
    import os
    from pathlib import Path

    import qoda

    path = os.pathsep.join(filter(None, (str(Path(qoda.__file__).parents[1]), *paths, os.environ.get("PYTHONPATH"))))
    return {**os.environ, **settings, "PYTHONPATH": path}


def _start_precompiling(session) -> None:
    import subprocess

    items = [(i, item) for i, item in enumerate(session.items) if item.nodeid.split("[")[0].endswith(_PRECOMPILED)]
    if not items or items[0][0] < _PRECOMPILE_AFTER:
        return
    calls = [(item.module.__name__, item.originalname, dict(item.callspec.params)) for _, item in items]
    code = f"import importlib\nfor m, f, kw in {calls!r}:\n    getattr(importlib.import_module(m), f)(**kw)\n"
    # this process's thread settings: Inductor's generated code (and so its cache key) depends on them
    env = _child_env(str(session.config.rootpath), *{str(item.path.parent) for _, item in items})
    _precompiling.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))  # fmt: skip


def pytest_runtest_setup(item):
    """Before a test of :data:`_PRECOMPILED`, wait for the background compilation (if it is still
    running) rather than compile the same code beside it."""
    import subprocess

    if not item.nodeid.split("[")[0].endswith(_PRECOMPILED):
        return
    for job in _precompiling:
        try:  # within the test's own time limit (300 s); past it the test compiles on its own
            job.wait(timeout=200)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait()


def pytest_sessionfinish(session):
    for job in _precompiling:
        if job.poll() is None:
            job.kill()
            job.wait()


def pytest_collection_finish(session):
    """Compile the codec kernels here, once, when a selected test starts worker processes (in the
    processes of :data:`_WARM_UP_JOBS`, side by side), then start :data:`_PRECOMPILED`'s compilation.

    Workers started later load them from numba's on-disk cache; without this every worker of
    the first such tests compiled them itself on a cold cache (minutes on a loaded machine),
    inside the tests' wall-clock timeouts."""
    if not any(_spawns(path) for path in {item.path for item in session.items}):
        return
    from qoda.quant.kernels.warmup import warm_up

    start = time.monotonic()
    _warm_up_in_parallel()
    warm_up(("fixed", "entropy"), (True, False))  # loads what the jobs compiled (compiles what they missed)
    if time.monotonic() - start > 2.0:
        print(f"\ncodec kernels compiled for the multi-process tests in {time.monotonic() - start:.0f} s",
              file=sys.stderr)  # fmt: skip
    _start_precompiling(session)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def real_gradients():
    """Gradients of the digits CNN at initialisation and after 100 SGD steps."""
    torch.manual_seed(0)
    xtr, ytr, _, _ = load_digits_tensors()
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for step in range(101):
        model.zero_grad()
        idx = torch.randint(0, len(ytr), (64,))
        nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        if step in (0, 100):
            grads.append([p.grad.clone() for p in model.parameters() if p.dim() > 1])
        opt.step()
    return grads
