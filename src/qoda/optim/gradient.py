"""Constant-step baselines: simultaneous GDA, extra-gradient, optimistic gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from qoda.optim.base import Averager, TwoCallOptimizer, VIOptimizer, check_positive


class GDA(VIOptimizer):
    """Simultaneous gradient descent(-ascent): ``X <- X - lr V(X)``.  Diverges on bilinear games."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.1, averager: Averager | None = None) -> None:
        check_positive("lr", lr)
        super().__init__(params, {"lr": lr}, averager)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._call(closure)
        for p, vi, lr in zip(self.params, self._dual(), self._lrs(), strict=True):
            p.sub_(lr * vi)
        self.group["t"] += 1
        return loss


class ExtraGradient(TwoCallOptimizer):
    """Extra-gradient (Korpelevich): ``X' = X - lr V(X)``, ``X <- X - lr V(X')``."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.1, averager: Averager | None = None) -> None:
        check_positive("lr", lr)
        super().__init__(params, {"lr": lr}, averager)

    def _extrapolate(self, v: list[torch.Tensor]) -> None:
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            p.sub_(lr * vi)

    def _update(self, v: list[torch.Tensor]) -> None:
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            p.copy_(self.state[p]["x_t"] - lr * vi)


class OptimisticGradient(VIOptimizer):
    """Optimistic gradient (Popov / OGDA): ``X <- X - 2 lr V_t + lr V_{t-1}``, one call per step."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.1, averager: Averager | None = None) -> None:
        check_positive("lr", lr)
        super().__init__(params, {"lr": lr}, averager)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._call(closure)
        for p, vi, lr in zip(self.params, self._dual(), self._lrs(), strict=True):
            prev = self.state[p].get("prev", vi)
            p.sub_(2 * lr * vi - lr * prev)
            self.state[p]["prev"] = vi
        self.group["t"] += 1
        return loss
