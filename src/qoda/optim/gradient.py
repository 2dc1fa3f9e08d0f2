"""Constant-step baselines: simultaneous GDA, extra-gradient, optimistic gradient.

Their updates are linear in the gradient, so complex parameters work as in ``torch.optim.SGD``
(the descent direction of a real loss is ``.grad``, torch's convention)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from qoda.optim.base import Averager, TwoCallOptimizer, VIOptimizer, check_lr


class GDA(VIOptimizer):
    """Simultaneous gradient descent(-ascent): ``X <- X - lr V(X)``.  Diverges on bilinear games."""

    supports_complex = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.1, averager: Averager | None = None) -> None:
        check_lr("lr", lr)
        super().__init__(params, {"lr": lr}, averager)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_lrs()
        loss = self._call(closure)
        v = self._dual()
        if v is None:
            return loss
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            if vi is not None:
                p.sub_(lr * vi)
        self.group["t"] += 1
        return loss


class ExtraGradient(TwoCallOptimizer):
    """Extra-gradient (Korpelevich): ``X' = X - lr V(X)``, ``X <- X - lr V(X')``."""

    supports_complex = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.1, averager: Averager | None = None) -> None:
        check_lr("lr", lr)
        super().__init__(params, {"lr": lr}, averager)

    def _extrapolate(self, v: list[torch.Tensor]) -> None:
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            if vi is not None:
                p.sub_(lr * vi)

    def _update(self, v: list[torch.Tensor]) -> None:
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            if vi is None:
                self._back_to_x_t(p)
            else:
                p.copy_(self.state[p]["x_t"] - lr * vi)


class OptimisticGradient(VIOptimizer):
    """Optimistic gradient (Popov / OGDA): ``X <- X - 2 lr V_t + lr V_{t-1}``, one call per step."""

    supports_complex = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.1, averager: Averager | None = None) -> None:
        check_lr("lr", lr)
        super().__init__(params, {"lr": lr}, averager)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_lrs()
        loss = self._call(closure)
        v = self._dual()
        if v is None:
            return loss
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            if vi is None:
                continue
            prev = self.state[p].get("prev", vi)
            p.sub_(2 * lr * vi - lr * prev)
            self.state[p]["prev"] = vi
        self.group["t"] += 1
        return loss
