import pytest
import torch
from torch import nn

from qoda.report.digits import DigitsCNN, load_digits_tensors


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """One FID-extractor cache for the whole session (child processes inherit it), never ~/.cache."""
    import os

    os.environ["QODA_CACHE"] = str(tmp_path_factory.mktemp("qoda-cache"))
    yield


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
