"""Monotone variational inequalities: problems with exact gaps, the in-process K-worker
simulator, and the ``qoda vi`` suite."""

from qoda.vi.problems import PROBLEMS, Noise, VIProblem, bilinear, logistic_game, monotone_linear, strongly_monotone
from qoda.vi.simulator import RunConfig, simulate

__all__ = [
    "PROBLEMS", "Noise", "RunConfig", "VIProblem", "bilinear", "logistic_game", "monotone_linear", "simulate",
    "strongly_monotone",
]  # fmt: skip
