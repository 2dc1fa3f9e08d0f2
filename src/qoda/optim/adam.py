"""Adam-based GAN optimizers: ExtraAdam (Gidel et al. 2019), OptimisticAdam (Daskalakis et al.
2018) and simultaneous Adam (the usual GAN baseline, one exchange per iteration)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from qoda.optim.base import Averager, TwoCallOptimizer, VIOptimizer, check_betas, check_lr, check_positive, lr_value


def _check_adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0) -> None:
    check_lr("lr", lr)
    check_positive("eps", eps)
    check_positive("weight_decay", weight_decay, allow_zero=True)
    check_betas("betas", betas)


def _decayed(opt: VIOptimizer, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x (1 - lr wd)``: decoupled weight decay (AdamW, Loshchilov & Hutter 2019) from the point
    ``x``, with ``p``'s group's rates; ``x`` itself when ``wd = 0`` or ``p`` has no gradient
    (torch's AdamW skips such parameters)."""
    grp = opt.group_of(p)
    wd = grp.get("weight_decay", 0.0)
    if wd == 0 or p.grad is None:
        return x
    return x * (1.0 - lr_value(grp["lr"]) * wd)


def adam_moments(opt: VIOptimizer, p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Update the moments of ``p`` with ``g`` (hyper-parameters of ``p``'s own group); return the
    bias-corrected ``(m_hat, sqrt(v_hat) + eps)``."""
    grp = opt.group_of(p)
    b1, b2 = grp["betas"]
    st = opt.state[p]
    if "m" not in st:
        st["m"], st["v"], st["k"] = torch.zeros_like(p), torch.zeros_like(p), 0
    st["k"] += 1
    st["m"].mul_(b1).add_(g, alpha=1 - b1)
    st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
    m_hat = st["m"] / (1 - b1 ** st["k"])
    v_hat = st["v"] / (1 - b2 ** st["k"])
    return m_hat, v_hat.sqrt() + grp["eps"]


def _adam_direction(opt: VIOptimizer, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The bias-corrected Adam step ``lr m_hat / (sqrt(v_hat) + eps)`` after updating the moments."""
    m_hat, denom = adam_moments(opt, p, g)
    return lr_value(opt.group_of(p)["lr"]) * m_hat / denom


class ExtraAdam(TwoCallOptimizer):
    """Extra-gradient with Adam steps: both the extrapolation and the update take an Adam step
    from ``X_t`` (moments updated by both gradients).  ``weight_decay`` is decoupled (AdamW):
    both steps start from ``X_t (1 - lr wd)``."""

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.9),
        eps: float = 1e-8, weight_decay: float = 0.0, averager: Averager | None = None,
    ) -> None:  # fmt: skip
        _check_adam(lr, betas, eps, weight_decay)
        super().__init__(
            params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}, averager
        )

    def _extrapolate(self, v: list[torch.Tensor | None]) -> None:
        for p, vi in zip(self.params, v, strict=True):
            if vi is not None:
                p.copy_(_decayed(self, p, p) - _adam_direction(self, p, vi))

    def _update(self, v: list[torch.Tensor | None]) -> None:
        for p, vi in zip(self.params, v, strict=True):
            if vi is None:
                self._back_to_x_t(p)
            else:
                p.copy_(_decayed(self, p, self.state[p]["x_t"]) - _adam_direction(self, p, vi))


class _OneCallAdam(VIOptimizer):
    """Shared constructor of the one-call Adam variants (``weight_decay`` decoupled, as AdamW)."""

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.5, 0.9),
        eps: float = 1e-8, weight_decay: float = 0.0, averager: Averager | None = None,
    ) -> None:  # fmt: skip
        _check_adam(lr, betas, eps, weight_decay)
        super().__init__(
            params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}, averager
        )


class OptimisticAdam(_OneCallAdam):
    """Optimistic Adam: ``X <- X - 2 d_t + d_{t-1}`` with ``d`` the Adam step; one call per step.

    ``d_{t-1}`` is taken at the current ``lr`` (rescaled when a scheduler changed it; after a step
    at ``lr = 0`` the next one starts afresh, ``X <- X - d_t``), so ``lr = 0`` does not move."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_lrs()
        loss = self._call(closure)
        v = self._dual()
        if v is None:
            return loss
        for p, vi in zip(self.params, v, strict=True):
            if vi is None:
                continue
            st, lr = self.state[p], lr_value(self.group_of(p)["lr"])
            d = _adam_direction(self, p, vi)
            prev, used = st.get("prev_dir", d), st.get("prev_lr", lr)
            if used != lr:  # a new lr (a scheduler): the optimistic correction at the current rate
                prev = prev * (lr / used) if used else d
            p.copy_(_decayed(self, p, p) - (2 * d - prev))
            st["prev_dir"], st["prev_lr"] = d, lr
        self.group["t"] += 1
        return loss


class SimultaneousAdam(_OneCallAdam):
    """Simultaneous Adam on both players: ``X <- X - d_t`` with ``d`` the Adam step (one call per step).

    The usual GAN baseline with ``n_critic = 1``; no extrapolation and no optimism, so it has no
    convergence guarantee on monotone games (compare GDA on the bilinear game).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_lrs()
        loss = self._call(closure)
        v = self._dual()
        if v is None:
            return loss
        for p, vi in zip(self.params, v, strict=True):
            if vi is not None:
                p.copy_(_decayed(self, p, p) - _adam_direction(self, p, vi))
        self.group["t"] += 1
        return loss
