"""QODA and Q-GenX: (quantized) dual averaging from an anchor, with adaptive rates.

Reference sections 3 and 4.  State per parameter: the anchor ``X_1``, the dual sum ``Y``, the
previous averaged dual vector (QODA: the optimistic offset's direction) and what the optimizer
last wrote into the parameter.  Step-size sums live in the param group.  With an ``averager``
that quantizes (layer-wise), these are the quantized methods; without one, the unquantized ones.

**Re-anchoring** (one rule for outside changes, learning-rate changes and skipped parameters).
The parameter the optimizer writes is a formula of its state,
``P = X_1 + s Y - o U`` (QODA: ``s = lr f_t`` the dual-averaging rate, ``o`` the optimistic
rate, ``U`` the last dual vector or Adam direction; Q-GenX: ``s = gamma_t``, ``o = 0``).  At the
start of an iteration, before the parameter ``p`` is used, the anchor is re-chosen so that the
formula evaluated with the *current* ``lr`` and rate sums gives ``p`` as it now is::

    X_1 <- p - s' Y + o' U                                              (s', o' the current rates)

whenever ``p`` differs from what the optimizer last wrote (weights loaded into the model,
clipping, a hand-set value, DDP's broadcast), the group's ``lr`` differs from the one of that
write (a scheduler; ``lr = 0`` then gives ``X_1 = p`` and a step that does not move), or the
parameter was skipped since (no ``.grad``: the rate sums moved on without it).  With nothing
changed the anchor is left alone, so the trajectory is bit for bit the unchanged method's.  The
next step then moves from ``p`` exactly as it would have moved from the written value: for an
outside change ``p = P + Delta`` the rule is ``X_1 <- X_1 + Delta``, the whole state translated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from qoda.optim.adam import adam_moments
from qoda.optim.base import Averager, TwoCallOptimizer, VIOptimizer, check_betas, check_lr, check_positive, lr_value

# The choices of QODA's options (the first is the default); the trainer's qoda_* options offer these.
RATES = ("separated", "single")
SCOPES = ("global", "coordinate")
PRECONDITIONERS = ("adam", "none")
#: Default ``lr`` per variant: Adam's usual 1e-3; the analysed rules' constants are scaled by 1.
DEFAULT_LR = {"adam": 1e-3, "none": 1.0}
#: The analysed rules' options and their defaults (rejected with other values under Adam).
ANALYSED_DEFAULTS: dict[str, object] = {
    "c_eta": 1.0, "c_gamma": 1.0, "q": 0.25, "rate": RATES[0], "scope": SCOPES[0], "delta": 1.0,
}  # fmt: skip


def unused_analysed_options(precondition: str, options: dict[str, Any]) -> list[str]:
    """The analysed rules' options in ``options`` (names as in :data:`ANALYSED_DEFAULTS`) set to other
    than their defaults although ``precondition = 'adam'`` ignores them: the one statement of that rule."""
    return [k for k, v in options.items() if v != ANALYSED_DEFAULTS[k]] if precondition == "adam" else []


Rate = float | torch.Tensor


class _Anchored:
    """The re-anchoring rule of the module docstring, shared by QODA and Q-GenX.

    Per parameter it keeps ``written`` (the value last written), ``lr`` (the learning rate of that
    write) and ``written_at`` (the iteration count ``t`` once that write is done)."""

    state: Any
    group: dict[str, Any]

    def _coefficients(self, st: dict[str, Any], lr: float) -> tuple[Rate, Rate | None]:
        """``(s, o)`` of ``P = X_1 + s Y - o U`` at the current rate sums and ``lr`` (``o = None``: no offset)."""
        raise NotImplementedError

    def _init_anchor(self, p: torch.Tensor, lr: float) -> None:
        st = self.state[p]
        st["anchor"] = p.detach().clone()
        st["y"] = torch.zeros_like(p)
        self._record(p, p, lr, self.group["t"])

    def _record(self, p: torch.Tensor, value: torch.Tensor, lr: float, at: int) -> None:
        """Remember that ``p`` holds ``value``, written with ``lr``, valid at iteration count ``at``."""
        st = self.state[p]
        if "written" in st:
            st["written"].copy_(value)
        else:
            st["written"] = value.detach().clone()
        st["lr"], st["written_at"] = lr, at

    def _sync_all(self, items: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Re-anchor each ``p`` at ``point`` if anything changed since the optimizer's last write.

        The "changed outside?" flags of all parameters are reduced on their device and read in ONE
        device-to-host transfer, so a GPU step waits once, not once per parameter.  States saved
        before this rule carry no record: taken as unchanged."""
        t = self.group["t"]
        stale, compare = [], []
        for p, point, lr in items:
            st = self.state[p]
            if st.get("written_at", t) != t or st.get("lr", lr) != lr:
                stale.append((p, point, lr))
            elif "written" in st:
                compare.append((p, point, lr))
        if compare:
            device = compare[0][1].device
            flags = torch.stack([point.ne(self.state[p]["written"]).any().to(device) for p, point, _ in compare])
            stale += [item for item, changed in zip(compare, flags.tolist(), strict=True) if changed]
        for p, point, lr in stale:
            st = self.state[p]
            s, o = self._coefficients(st, lr)
            anchor = point - s * st["y"]
            if o is not None:
                anchor = anchor + o * st["prev"]
            st["anchor"] = anchor
            self._record(p, point, lr, t)


class QODA(_Anchored, VIOptimizer):
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

    Changes from outside count: at the start of ``step()`` a parameter that differs from what the
    optimizer last wrote (loaded weights, clipping, a hand-set value), whose group's ``lr``
    changed (a scheduler; ``lr = 0`` is a step that does not move) or that was skipped (no
    ``.grad``) re-anchors, ``X_1 <- p - eta' Y + gamma' U`` with the current rates (``U`` the last
    dual vector, or the last Adam direction ``d``; for Adam ``eta' = gamma' = lr``), so that
    ``X_1 + eta Y - gamma U`` is the parameter as it now is and the step moves from there.
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
        check_lr("lr", lr)
        for name, v in (("c_eta", c_eta), ("c_gamma", c_gamma), ("delta", delta), ("eps", eps)):
            check_positive(name, v)
        given = {"c_eta": c_eta, "c_gamma": c_gamma, "q": q, "rate": rate, "scope": scope, "delta": delta}
        unused = unused_analysed_options(precondition, given)
        if unused:
            raise ValueError(
                f"{unused[0]}: an option of the analysed adaptive rules, unused with precondition='adam' "
                "(pass precondition='none' to use them)"
            )
        check_betas("betas", betas)
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
        st["prev"] = torch.zeros_like(p)
        if self.group["scope"] == "coordinate":
            st["sum_diff"] = torch.zeros_like(p)
            st["sum_sq"] = torch.zeros_like(p)
        self._init_anchor(p, lr_value(self.group_of(p)["lr"]))

    def _coefficients(self, st: dict[str, Any], lr: float) -> tuple[Rate, Rate]:
        """``(eta, gamma)`` of the parameter with state ``st`` at the current sums (Adam: ``(lr, lr)``)."""
        g = self.group
        if g["precondition"] == "adam":
            return lr, lr
        if g["scope"] == "coordinate":
            eta = lr * g["c_eta"] * (g["delta"] + st["sum_diff"]).rsqrt()
            gamma = eta if g["rate"] == "single" else lr * g["c_gamma"] * (g["delta"] + st["sum_sq"]).pow(g["q"] - 0.5)
            return eta, gamma
        return self.rates(lr)

    def rates(self, lr: float | None = None) -> tuple[float, float]:
        """``(eta, gamma)`` for a group with learning rate ``lr`` (default: the first group's)."""
        g = self.group
        lr = lr_value(g["lr"]) if lr is None else lr
        eta = lr * g["c_eta"] * (1.0 + g["sum_diff"]) ** -0.5
        if g["rate"] == "single":
            return eta, eta
        return eta, lr * g["c_gamma"] * (1.0 + g["sum_sq"]) ** (g["q"] - 0.5)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_lrs()
        loss = self._call(closure)
        v = self._dual()
        if v is None:
            return loss
        params, lrs = self.params, self._lrs()
        self._sync_all([(p, p, lr) for p, vi, lr in zip(params, v, lrs, strict=True) if vi is not None])
        g = self.group
        active = [(p, vi, lr) for p, vi, lr in zip(params, v, lrs, strict=True) if vi is not None]
        if g["precondition"] == "adam":
            self._adam_step(active)
        elif g["scope"] == "coordinate":
            self._coordinate_step(active)
        else:
            g["sum_diff"] += self._sq(vi - self.state[p]["prev"] for p, vi, _ in active)
            g["sum_sq"] += self._sq(vi for _, vi, _ in active)
            for p, vi, lr in active:
                eta, gamma = self.rates(lr)
                st = self.state[p]
                st["y"].sub_(vi)
                x_next = st["anchor"] + eta * st["y"]
                p.copy_(x_next - gamma * vi)
                st["prev"] = vi
        for p, _, lr in active:
            self._record(p, p, lr, g["t"] + 1)
        g["t"] += 1
        return loss

    def _adam_step(self, active: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """The Adam-preconditioned iteration (``precondition="adam"``); ``prev`` keeps the direction ``d``."""
        for p, vi, lr in active:
            m_hat, denom = adam_moments(self, p, vi)
            d = m_hat / denom
            st = self.state[p]
            st["y"].sub_(d)
            p.copy_(st["anchor"] + lr * st["y"] - lr * d)
            st["prev"] = d

    def _coordinate_step(self, active: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """The same iteration with per-coordinate rates (``scope="coordinate"``)."""
        for p, vi, lr in active:
            st = self.state[p]
            st["sum_diff"].add_((vi - st["prev"]).square())
            st["sum_sq"].add_(vi.square())
            eta, gamma = self._coefficients(st, lr)
            st["y"].sub_(vi)
            p.copy_(st["anchor"] + eta * st["y"] - gamma * vi)
            st["prev"] = vi


class QGenX(_Anchored, TwoCallOptimizer):
    """Q-GenX: extra-gradient in dual-averaging form, TWO oracle calls and exchanges per iteration.

    ``extrapolation()`` at ``X_t``: ``X_{t+1/2} = X_t - gamma_t Vbar(X_t)``.
    ``step()`` at ``X_{t+1/2}``: ``Y -= Vbar(X_{t+1/2})``, ``X_{t+1} = X_1 + gamma_{t+1} Y`` with
    ``gamma_t = c (1 + sum_s ||Vbar_{s+1/2} - Vbar_s||^2)^(-1/2)``.

    Changes from outside count: at ``extrapolation()`` a parameter that differs from the last
    ``X_{t+1}`` written, whose group's ``lr`` changed, or that was skipped re-anchors,
    ``X_1 <- p - gamma' Y`` (module docstring), so the iteration starts from ``p`` as it is.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, averager: Averager | None = None) -> None:
        check_lr("lr", lr)
        super().__init__(params, {"lr": lr, "sum_diff": 0.0}, averager)
        for p in self.params:
            self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        self._init_anchor(p, lr_value(self.group_of(p)["lr"]))

    def _coefficients(self, st: dict[str, Any], lr: float) -> tuple[Rate, None]:
        return self.gamma(lr), None

    def gamma(self, lr: float | None = None) -> float:
        lr = lr_value(self.group["lr"]) if lr is None else lr
        return lr * (1.0 + self.group["sum_diff"]) ** -0.5

    def _extrapolate(self, v: list[torch.Tensor | None]) -> None:
        items = list(zip(self.params, v, self._lrs(), strict=True))
        self._sync_all([(p, p, lr) for p, vi, lr in items if vi is not None])
        for p, vi, lr in items:
            st = self.state[p]
            if vi is None:  # skipped this iteration: no extrapolation, and step() puts it back at X_t
                st.pop("lead", None)
                continue
            st["lead"] = vi
            p.sub_(self.gamma(lr) * vi)

    def _update(self, v: list[torch.Tensor | None]) -> None:
        lrs = self._lrs()
        active = [(p, vi, lr) for p, vi, lr in zip(self.params, v, lrs, strict=True)
                  if vi is not None and "lead" in self.state[p]]  # fmt: skip
        # an lr changed between the two calls re-anchors at X_t
        self._sync_all([(p, self.state[p]["x_t"], lr) for p, _, lr in active])
        self.group["sum_diff"] += self._sq(vi - self.state[p]["lead"] for p, vi, _ in active)
        moved = set()
        for p, vi, lr in active:
            st = self.state[p]
            st["y"].sub_(vi)
            p.copy_(st["anchor"] + self.gamma(lr) * st["y"])
            self._record(p, p, lr, self.group["t"] + 1)
            moved.add(id(p))
        for p in self.params:
            if id(p) not in moved:
                self._back_to_x_t(p)
