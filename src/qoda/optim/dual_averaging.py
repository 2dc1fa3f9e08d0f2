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

from qoda.optim.adam import adam_moments
from qoda.optim.base import Averager, TwoCallOptimizer, VIOptimizer, check_positive

RATES = ("separated", "single")
SCOPES = ("global", "coordinate")
PRECONDITIONERS = ("none", "adam")
#: Default ``lr`` per variant: Adam's usual 1e-3; the analysed rules' constants are scaled by 1.
DEFAULT_LR = {"adam": 1e-3, "none": 1.0}
#: The analysed rules' options and their defaults (rejected with other values under Adam).
ANALYSED_DEFAULTS: dict[str, object] = {
    "c_eta": 1.0, "c_gamma": 1.0, "q": 0.25, "rate": "separated", "scope": "global", "delta": 1.0,
}  # fmt: skip


class QODA(VIOptimizer):
    """Quantized optimistic dual averaging: ONE oracle call and ONE exchange per iteration.

    Two variants, one argument apart:

    * ``QODA(params)`` (default, ``precondition="adam"``, ``lr=1e-3``): the variant for deep
      networks (GANs, adversarial losses), the one ``qoda train`` uses.  The averaged dual vector
      ``Vbar_t`` (still ONE exchange) feeds Adam moments, and the optimistic dual-averaging step
      runs on ``d_t = m_hat / (sqrt(v_hat) + eps)`` with constant rates::

          Y <- Y - d_t;   X_{t+1} = X_1 + lr Y;   X_{t+3/2} = X_{t+1} - lr d_t

      This is the optimistic (Popov) recursion on Adam directions: from the second iteration on,
      the half-iterates move exactly like :class:`OptimisticAdam`'s (``X <- X - 2 d_t + d_{t-1}``);
      only the first step differs (QODA starts with ``Vbar_0 = 0``).

    * ``QODA(params, precondition="none")`` (``lr=1``): the analysed method of reference sections
      3-4, for monotone VIs.  With ``Vbar_t`` the averaged dual vector at the half-iterate::

          Y       <- Y - Vbar_t
          eta     = c_eta   (1 + sum_s ||Vbar_s - Vbar_{s-1}||^2)^(-1/2)
          gamma   = c_gamma (1 + sum_s ||Vbar_s||^2)^(q - 1/2)        (rate="separated")
                  = eta                                               (rate="single")
          X_{t+1}     = X_1 + eta Y
          X_{t+3/2}   = X_{t+1} - gamma Vbar_t       <- the parameters after step()

      Defaults (``rate="separated"``, ``q=1/4``, ``c_eta=c_gamma=1``) are the rule the VI suite
      shows to converge at the claimed rates; ``q=0`` makes the optimistic step vanish too fast.
      ``scope="coordinate"`` applies the same rules per coordinate (sums of squared coordinates,
      ``delta`` in place of the ``1``): a diagonal, AdaGrad-style preconditioner that keeps the
      O(1/T) rate on the VI suite.  On the WGAN neither trains (README: the critic's steps decay
      like ``1/sqrt(t)`` and the generator collapses), hence the Adam default.

    The parameters always hold the half-iterate at which the next oracle is queried.  ``lr``
    scales both rates; the options of the analysed rules (``c_eta``, ``c_gamma``, ``q``, ``rate``,
    ``scope``, ``delta``) are rejected with ``precondition="adam"``, which does not use them.
    A learning-rate change (a scheduler) re-anchors, so the iterate does not jump.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float | None = None,
        c_eta: float = 1.0,
        c_gamma: float = 1.0,
        q: float = 0.25,
        rate: str = "separated",
        scope: str = "global",
        delta: float = 1.0,
        precondition: str = "adam",
        betas: tuple[float, float] = (0.5, 0.9),
        eps: float = 1e-8,
        averager: Averager | None = None,
    ) -> None:
        if precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition: expected one of {PRECONDITIONERS}, got {precondition!r}")
        if lr is None:
            lr = DEFAULT_LR[precondition]
        for name, v in (("lr", lr), ("c_eta", c_eta), ("c_gamma", c_gamma), ("delta", delta), ("eps", eps)):
            check_positive(name, v)
        if precondition == "adam":
            given = {"c_eta": c_eta, "c_gamma": c_gamma, "q": q, "rate": rate, "scope": scope, "delta": delta}
            unused = [k for k, v in given.items() if v != ANALYSED_DEFAULTS[k]]
            if unused:
                raise ValueError(
                    f"{unused[0]}: an option of the analysed adaptive rules, unused with precondition='adam' "
                    "(pass precondition='none' to use them)"
                )
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas: both must be in [0, 1), got {betas!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
        if not isinstance(q, int | float) or not 0.0 <= q < 0.5:
            raise ValueError(f"q: must be in [0, 0.5), got {q!r}")
        if rate not in RATES:
            raise ValueError(f"rate: expected one of {RATES}, got {rate!r}")
        defaults = {"lr": lr, "c_eta": c_eta, "c_gamma": c_gamma, "q": q, "rate": rate, "scope": scope,
                    "delta": delta, "precondition": precondition, "betas": tuple(betas), "eps": eps,
                    "sum_diff": 0.0, "sum_sq": 0.0}  # fmt: skip
        super().__init__(params, defaults, averager)
        for p in self.params:
            self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        st = self.state[p]
        st["anchor"] = p.detach().clone()
        st["y"] = torch.zeros_like(p)
        st["prev"] = torch.zeros_like(p)
        if self.group["scope"] == "coordinate":
            st["sum_diff"] = torch.zeros_like(p)
            st["sum_sq"] = torch.zeros_like(p)

    def _reanchor(self) -> None:
        """Keep the iterate continuous when a group's ``lr`` changes (a scheduler step).

        The iterate is ``X = X_1 + lr f_t Y`` (``f_t`` the rate factor: ``c_eta (1 + S)^(-1/2)``,
        per coordinate ``c_eta (delta + S)^(-1/2)``, or ``1`` with Adam preconditioning), so a new
        ``lr`` would move it by ``(lr' - lr) f_t Y``, the whole path rescaled.  Moving the anchor by
        ``(lr - lr') f_t Y`` keeps ``X`` where it is; later steps use ``lr'``.
        """
        g0 = self.group
        for g, old, new in self._lr_changes():
            for p in g["params"]:
                st = self.state[p]
                if g0["precondition"] == "adam":
                    f: float | torch.Tensor = 1.0
                elif g0["scope"] == "coordinate":
                    f = g0["c_eta"] * (g0["delta"] + st["sum_diff"]).rsqrt()
                else:
                    f = g0["c_eta"] * (1.0 + g0["sum_diff"]) ** -0.5
                st["anchor"].add_((old - new) * f * st["y"])

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
        self._reanchor()
        g = self.group
        if g["precondition"] == "adam":
            self._adam_step(v)
            g["t"] += 1
            return loss
        if g["scope"] == "coordinate":
            self._coordinate_step(v)
            g["t"] += 1
            return loss
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

    def _adam_step(self, v: list[torch.Tensor]) -> None:
        """The Adam-preconditioned iteration (``precondition="adam"``)."""
        for p, vi in zip(self.params, v, strict=True):
            m_hat, denom = adam_moments(self, p, vi)
            d = m_hat / denom
            st = self.state[p]
            lr = self.group_of(p)["lr"]
            st["y"].sub_(d)
            p.copy_(st["anchor"] + lr * st["y"] - lr * d)
            st["prev"] = vi

    def _coordinate_step(self, v: list[torch.Tensor]) -> None:
        """The same iteration with per-coordinate rates (``scope="coordinate"``)."""
        g = self.group
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            st = self.state[p]
            st["sum_diff"].add_((vi - st["prev"]).square())
            st["sum_sq"].add_(vi.square())
            eta = lr * g["c_eta"] * (g["delta"] + st["sum_diff"]).rsqrt()
            gamma = eta if g["rate"] == "single" else lr * g["c_gamma"] * (g["delta"] + st["sum_sq"]).pow(g["q"] - 0.5)
            st["y"].sub_(vi)
            p.copy_(st["anchor"] + eta * st["y"] - gamma * vi)
            st["prev"] = vi


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
            self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
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
        # X_{t+1} = X_1 + lr (1 + S)^(-1/2) Y: a changed lr re-anchors (see QODA._reanchor).
        f = (1.0 + self.group["sum_diff"]) ** -0.5
        for g, old, new in self._lr_changes():
            for p in g["params"]:
                self.state[p]["anchor"].add_((old - new) * f * self.state[p]["y"])
        self.group["sum_diff"] += self._sq([vi - self.state[p]["lead"] for p, vi in zip(self.params, v, strict=True)])
        for p, vi, lr in zip(self.params, v, self._lrs(), strict=True):
            st = self.state[p]
            st["y"].sub_(vi)
            p.copy_(st["anchor"] + self.gamma(lr) * st["y"])
