"""Monotone VI problems with known solutions, noise models and the restricted gap.

Every problem has a solution ``z*`` with ``A(z*) = 0`` and a ball ``C = B(z*, R)`` for the
restricted gap ``Gap_C(x) = sup_{z in C} <A(z), x - z>`` (docs/method.md section 1).

Affine problems ``A(z) = G z + q`` (``G = P + K``, ``P`` symmetric PSD, ``K`` skew): with
``z = z* + w``, ``<A(z), x - z> = w^T G^T (x - z*) - w^T P w``, a concave quadratic whose
maximum over ``||w|| <= R`` is found exactly (trust-region subproblem: eigen-decomposition of
``P`` and bisection on the multiplier); for ``P = 0`` it is ``R ||G^T (x - z*)||``.
The non-linear problem's gap is maximised by projected gradient ascent (a lower bound,
reported as such).  Operators are scaled so that their Lipschitz constant is about 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DTYPE = torch.float64


@dataclass(frozen=True)
class Noise:
    """Oracle noise: ``absolute`` (``E||U||^2 = sigma^2``) or ``relative`` (``E||U||^2 = sigma^2 ||A(z)||^2``)."""

    kind: str = "absolute"
    sigma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("absolute", "relative", "none"):
            raise ValueError(f"noise.kind: expected 'absolute', 'relative' or 'none', got {self.kind!r}")
        if not self.sigma >= 0:
            raise ValueError(f"noise.sigma: must be >= 0, got {self.sigma!r}")

    def sample(self, a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.kind == "none" or self.sigma == 0:
            return torch.zeros_like(a)
        xi = torch.randn(a.shape, generator=gen, dtype=a.dtype) / math.sqrt(a.numel())
        scale = self.sigma if self.kind == "absolute" else self.sigma * float(a.norm())
        return scale * xi


@dataclass
class VIProblem:
    name: str
    blocks: tuple[int, ...]  # sizes of the players' variable blocks
    z_star: torch.Tensor
    radius: float
    G: torch.Tensor | None = None  # affine part (None for non-linear problems)
    q: torch.Tensor | None = None
    _eig: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    nonlinear: object | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return sum(self.blocks)

    def operator(self, z: torch.Tensor) -> torch.Tensor:
        if self.nonlinear is not None:
            return self.nonlinear(z)
        return self.G @ z + self.q

    def oracle(self, z: torch.Tensor, noise: Noise, gen: torch.Generator) -> torch.Tensor:
        a = self.operator(z)
        return a + noise.sample(a, gen)

    def distance(self, x: torch.Tensor) -> float:
        return float((x - self.z_star).norm())

    def gap(self, x: torch.Tensor) -> float:
        """Restricted gap on ``B(z*, R)`` (exact for affine problems)."""
        if self.G is None:
            return self._gap_ascent(x)
        g = self.G.T @ (x - self.z_star)
        sym = 0.5 * (self.G + self.G.T)
        if self._eig is None:
            lam, Q = torch.linalg.eigh(sym)
            self._eig = (lam.clamp_min(0.0), Q)
        lam, Q = self._eig
        gp = Q.T @ g
        return _max_concave_quadratic(gp, lam, self.radius)

    def _gap_ascent(self, x: torch.Tensor, iters: int = 80) -> float:
        best = 0.0
        for start in range(2):
            w = (
                torch.zeros_like(x)
                if start == 0
                else torch.randn(x.shape, generator=torch.Generator().manual_seed(start), dtype=DTYPE)
            )
            w = w * (self.radius / max(float(w.norm()), 1e-12)) if start else w
            w.requires_grad_(True)
            for _ in range(iters):
                z = self.z_star + w
                val = self.operator(z) @ (x - z)
                (grad,) = torch.autograd.grad(val, w)
                with torch.no_grad():
                    w += 0.5 * grad
                    n = float(w.norm())
                    if n > self.radius:
                        w *= self.radius / n
            with torch.no_grad():
                z = self.z_star + w
                best = max(best, float(self.operator(z) @ (x - z)))
        return best


def _max_concave_quadratic(g: torch.Tensor, lam: torch.Tensor, radius: float) -> float:
    """``max_{||w|| <= R} g^T w - sum_i lam_i w_i^2`` in eigen-coordinates (``lam >= 0``)."""
    if float(g.norm()) == 0.0:
        return 0.0
    pos = lam > 1e-12
    free = (~pos) & (g.abs() > 0)
    if not bool(free.any()):
        w = torch.where(pos, g / (2 * lam.clamp_min(1e-300)), torch.zeros_like(g))
        if float(w.norm()) <= radius:
            return float(g @ w - (lam * w * w).sum())
    lo, hi = 0.0, float(g.norm()) / (2 * radius)
    for _ in range(200):  # ||w(mu)|| decreases in mu; ||w(hi)|| <= R
        mid = 0.5 * (lo + hi)
        if float((g / (2 * (lam + mid))).norm()) > radius:
            lo = mid
        else:
            hi = mid
    w = g / (2 * (lam + hi))
    return float(g @ w - (lam * w * w).sum())


# ----------------------------------------------------------------------------- constructors
def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def _spectrum(n: int, cond: float) -> torch.Tensor:
    return torch.logspace(0, -math.log10(cond), n, dtype=DTYPE)


def _solution(d: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(d, generator=gen, dtype=DTYPE)
    return z / z.norm() * math.sqrt(d) / 2


def bilinear(d: int = 40, cond: float = 10.0, seed: int = 0) -> VIProblem:
    """``min_x max_y x^T M y + b^T x + c^T y``: ``G = [[0, M], [-M^T, 0]]`` (skew), ``||M|| = 1``."""
    if d < 2 or d % 2:
        raise ValueError(f"d: must be an even integer >= 2, got {d}")
    gen = torch.Generator().manual_seed(seed)
    h = d // 2
    M = _orthogonal(h, gen) @ torch.diag(_spectrum(h, cond)) @ _orthogonal(h, gen).T
    G = torch.zeros(d, d, dtype=DTYPE)
    G[:h, h:], G[h:, :h] = M, -M.T
    z = _solution(d, gen)
    return VIProblem("bilinear", (h, h), z, radius=float(z.norm()), G=G, q=-G @ z)


def strongly_monotone(d: int = 40, mu: float = 0.1, seed: int = 0) -> VIProblem:
    """``G = P + K`` with ``P`` symmetric, eigenvalues in ``[mu, 1]``, and a skew ``K``."""
    gen = torch.Generator().manual_seed(seed)
    Q = _orthogonal(d, gen)
    P = Q @ torch.diag(torch.linspace(mu, 1.0, d, dtype=DTYPE)) @ Q.T
    A = torch.randn(d, d, generator=gen, dtype=DTYPE)
    K = (A - A.T) / (2 * torch.linalg.matrix_norm(A - A.T, 2) / 2)
    G = (P + K) / torch.linalg.matrix_norm(P + K, 2)
    z = _solution(d, gen)
    return VIProblem("strongly_monotone", (d // 2, d - d // 2), z, float(z.norm()), G=G, q=-G @ z)


def monotone_linear(d: int = 40, rank: int | None = None, seed: int = 0) -> VIProblem:
    """``G = P + K``: ``P`` PSD of rank ``d/4`` (so not strongly monotone) plus a skew ``K``."""
    gen = torch.Generator().manual_seed(seed)
    r = rank if rank is not None else max(1, d // 4)
    B = torch.randn(d, r, generator=gen, dtype=DTYPE)
    A = torch.randn(d, d, generator=gen, dtype=DTYPE)
    G = B @ B.T / torch.linalg.matrix_norm(B @ B.T, 2) + (A - A.T) / torch.linalg.matrix_norm(A - A.T, 2)
    G = G / torch.linalg.matrix_norm(G, 2)
    z = _solution(d, gen)
    return VIProblem("monotone_linear", (d // 2, d - d // 2), z, float(z.norm()), G=G, q=-G @ z)


def logistic_game(d: int = 40, m: int = 60, lam: float = 0.5, seed: int = 0) -> VIProblem:
    """Non-linear: ``A(z) = K z + lam W^T sigmoid(W z) + q`` (skew + gradient of a convex
    softplus sum: monotone, not affine), ``q`` chosen so that ``A(z*) = 0``."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=DTYPE)
    K = (A - A.T) / torch.linalg.matrix_norm(A - A.T, 2)
    W = torch.randn(m, d, generator=gen, dtype=DTYPE) / math.sqrt(d)
    z = _solution(d, gen)

    def base(v: torch.Tensor) -> torch.Tensor:
        return K @ v + lam * W.T @ torch.sigmoid(W @ v)

    shift = base(z)

    def op(v: torch.Tensor) -> torch.Tensor:
        return base(v) - shift

    return VIProblem("logistic_game", (d // 2, d - d // 2), z, float(z.norm()), nonlinear=op)


PROBLEMS = {
    "bilinear": bilinear,
    "strongly_monotone": strongly_monotone,
    "monotone_linear": monotone_linear,
    "logistic_game": logistic_game,
}
