"""The worked example of docs/architecture.md, "A new optimizer": a toy optimizer (Lion descent-ascent)
registered with one entry in ``OPTIMIZERS`` is exported by ``qoda.optim`` and ``qoda``, offered by
``qoda train`` with the trainer options it takes, built by ``create_optimizer`` and held to the generic
optimizer contract (``tests/test_optim_contract.py``) without any other file knowing of it.

The registration happens in a separate interpreter (a pytest plugin module), before the modules that
read the registry are imported: what one line in ``qoda/optim/factory.py`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The optimizer's own file (here a plugin module) and its one registry entry.
LION = '''
import torch

from qoda.optim import factory
from qoda.optim.base import VIOptimizer, check_betas, check_lr


class Lion(VIOptimizer):
    """Lion descent-ascent: u = sign(b1 m + (1 - b1) V), X <- X - lr u, m <- b2 m + (1 - b2) V."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), averager=None):
        check_lr("lr", lr)
        check_betas("betas", betas)
        super().__init__(params, {"lr": lr, "betas": tuple(betas)}, averager)

    @torch.no_grad()
    def step(self, closure=None):
        self._check_lrs()
        loss = self._call(closure)
        v = self._dual()
        if v is None:
            return loss
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            if vi is None:
                continue
            b1, b2 = self.group_of(p)["betas"]
            m = self.state[p].setdefault("m", torch.zeros_like(p))
            p.sub_(lr * torch.sign(b1 * m + (1 - b1) * vi))
            m.mul_(b2).add_(vi, alpha=1 - b2)
        self.group["t"] += 1
        return loss


factory.OPTIMIZERS["lion"] = factory.OptimizerSpec("lion", Lion, "Lion descent-ascent (toy)", trains_gans=True)
'''

CHECKS = """
import json

import toy_lion  # registers "lion"
import torch

import qoda
import qoda.optim
from qoda.cli import train_choices
from qoda.train.config import TrainConfig

Lion = toy_lion.Lion
cfg = TrainConfig(optimizer="lion", nonfinite="skip")  # offered to the GAN trainer; one call, so skip is allowed
x, y = torch.tensor([0.5]), torch.tensor([-2.0])
px, py = x.clone().requires_grad_(), y.clone().requires_grad_()
opt = qoda.create_optimizer("Lion", [px, py], lr=0.1, **cfg.optimizer_kwargs())
px.grad, py.grad = y.clone(), -x.clone()  # bilinear game x * y: V = (y, -x)
opt.step()
print(json.dumps({
    "exported": qoda.optim.Lion is Lion and qoda.Lion is Lion and "Lion" in qoda.__all__,
    "kwargs": cfg.optimizer_kwargs(), "choice": "lion" in train_choices()["optimizer"],
    "calls": opt.calls_per_iteration, "exchanges": opt.group["exchanges"],
    # first step from m = 0: X <- X - lr sign(V)
    "step": [px.item(), py.item()], "expected": [(x - 0.1 * torch.sign(y)).item(), (y - 0.1 * torch.sign(-x)).item()],
}))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "toy_lion.py").write_text(LION)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), str(tmp_path)])}


def test_a_registered_optimizer_is_exported_offered_and_built(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHECKS], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["exported"] and r["choice"]
    assert r["kwargs"] == {"betas": [0.5, 0.9]}  # TrainConfig's betas: the option Lion takes
    assert (r["calls"], r["exchanges"]) == (1, 1)
    assert r["step"] == r["expected"]


def test_a_registered_optimizer_meets_the_generic_contract(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "toy_lion", "-p", "no:cacheprovider", "-k", "lion",
         str(ROOT / "tests" / "test_optim_contract.py")],
        env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-1000:]
