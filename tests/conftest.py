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


def pytest_collection_finish(session):
    """Compile the codec kernels here, once, when a selected test starts worker processes.

    Workers started later load them from numba's on-disk cache; without this every worker of
    the first such tests compiled them itself on a cold cache (minutes on a loaded machine),
    inside the tests' wall-clock timeouts."""
    if not any(_spawns(path) for path in {item.path for item in session.items}):
        return
    from qoda.quant.kernels.warmup import warm_up

    start = time.monotonic()
    warm_up(("fixed", "entropy"), (True, False))
    if time.monotonic() - start > 2.0:
        print(f"\ncodec kernels compiled for the multi-process tests in {time.monotonic() - start:.0f} s",
              file=sys.stderr)  # fmt: skip


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
