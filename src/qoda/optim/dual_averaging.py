"""QODA and Q-GenX: (quantized) dual averaging from an anchor, with adaptive rates.

Reference sections 3 and 4.  State per parameter: the anchor ``X_1`` (the parameters at
construction), the dual sum ``Y``, and the previous averaged dual vector.  Step-size sums
live in the param group.  With an ``averager`` that quantizes (layer-wise), these are the
quantized methods; without one, the unquantized ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from qoda.optim.base import Averager, TwoCallOptimizer, VIOptimizer, check_positive

RATES = ("separated", "single")


class QODA(VIOptimizer):
    """Quantized optimistic dual averaging: ONE oracle call and ONE exchange per iteration.

    With ``Vbar_t`` the averaged dual vector at the half-iterate ``X_{t+1/2}``::

        Y       <- Y - Vbar_t
        eta     = c_eta   (1 + sum_s ||Vbar_s - Vbar_{s-1}||^2)^(-1/2)
        gamma   = c_gamma (1 + sum_s ||Vbar_s||^2)^(q - 1/2)        (rate="separated")
                = eta                                               (rate="single")
        X_{t+1}     = X_1 + eta Y
        X_{t+3/2}   = X_{t+1} - gamma Vbar_t       <- the parameters after step()

    The parameters always hold the half-iterate at which the next oracle is queried.
    Defaults (``rate="separated"``, ``q=1/4``, ``c_eta=c_gamma=1``) are the rule the VI suite
    shows to converge at the claimed rates; ``q=0`` makes the optimistic step vanish too fast.
    ``lr`` scales both constants (a convenience for deep-learning use).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1.0,
        c_eta: float = 1.0,
        c_gamma: float = 1.0,
        q: float = 0.25,
        rate: str = "separated",
        averager: Averager | None = None,
    ) -> None:
        for name, v in (("lr", lr), ("c_eta", c_eta), ("c_gamma", c_gamma)):
            check_positive(name, v)
        if not isinstance(q, int | float) or not 0.0 <= q < 0.5:
            raise ValueError(f"q: must be in [0, 0.5), got {q!r}")
        if rate not in RATES:
            raise ValueError(f"rate: expected one of {RATES}, got {rate!r}")
        defaults = {"lr": lr, "c_eta": c_eta, "c_gamma": c_gamma, "q": q, "rate": rate, "sum_diff": 0.0, "sum_sq": 0.0}
        super().__init__(params, defaults, averager)
        for p in self.params:
            st = self.state[p]
            st["anchor"] = p.detach().clone()
            st["y"] = torch.zeros_like(p)
            st["prev"] = torch.zeros_like(p)

    def rates(self, lr: float | None = None) -> tuple[float, float]:
        """``(eta, gamma)`` for a group with learning rate ``lr`` (default: the first group's)."""
        g = self.group
        lr = g["lr"] if lr is None else lr
        eta = lr * g["c_eta"] * (1.0 + g["sum_diff"]) ** -0.5
        if g["rate"] == "single":
            return eta, eta
        return eta, lr * g["c_gamma"] * (1.0 + g["sum_sq"]) ** (g["q"] - 0.5)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._call(closure)
        v = self._dual()
        g = self.group
        g["sum_diff"] += self._sq([vi - self.state[p]["prev"] for p, vi in zip(self.params, v, strict=True)])
        g["sum_sq"] += self._sq(v)
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            eta, gamma = self.rates(lr)
            st = self.state[p]
            st["y"].sub_(vi)
            x_next = st["anchor"] + eta * st["y"]
            p.copy_(x_next - gamma * vi)
            st["prev"] = vi
        g["t"] += 1
        return loss


class QGenX(TwoCallOptimizer):
    """Q-GenX: extra-gradient in dual-averaging form, TWO oracle calls and exchanges per iteration.

    ``extrapolation()`` at ``X_t``: ``X_{t+1/2} = X_t - gamma_t Vbar(X_t)``.
    ``step()`` at ``X_{t+1/2}``: ``Y -= Vbar(X_{t+1/2})``, ``X_{t+1} = X_1 + gamma_{t+1} Y`` with
    ``gamma_t = c (1 + sum_s ||Vbar_{s+1/2} - Vbar_s||^2)^(-1/2)``.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, averager: Averager | None = None) -> None:
        check_positive("lr", lr)
        super().__init__(params, {"lr": lr, "sum_diff": 0.0}, averager)
        for p in self.params:
            self.state[p]["anchor"] = p.detach().clone()
            self.state[p]["y"] = torch.zeros_like(p)

    def gamma(self, lr: float | None = None) -> float:
        lr = self.group["lr"] if lr is None else lr
        return lr * (1.0 + self.group["sum_diff"]) ** -0.5

    def _extrapolate(self, v: list[torch.Tensor]) -> None:
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            self.state[p]["lead"] = vi
            p.sub_(self.gamma(lr) * vi)

    def _update(self, v: list[torch.Tensor]) -> None:
        self.group["sum_diff"] += self._sq([vi - self.state[p]["lead"] for p, vi in zip(self.params, v, strict=True)])
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            st = self.state[p]
            st["y"].sub_(vi)
            p.copy_(st["anchor"] + self.gamma(lr) * st["y"])
