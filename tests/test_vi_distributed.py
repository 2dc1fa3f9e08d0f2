"""The VI runs across real processes with the compressed collectives equal the simulated runs."""

import numpy as np
import pytest

from distributed import run, values
from qoda.comm.aggregate import Aggregator
from qoda.vi.problems import PROBLEMS, Noise
from qoda.vi.simulator import RunConfig, layerwise_plan, simulate


def _cfg(method):
    return RunConfig("bilinear", method, Noise("relative", 0.1), bits=4, workers=2, iterations=60, d=10, seed=5)


def _worker(rank, world, method):
    cfg = _cfg(method)
    prob = PROBLEMS[cfg.problem](d=cfg.d, seed=cfg.seed)
    agg = Aggregator(layerwise_plan(prob.blocks, cfg.bits), "allgather", seed=cfg.seed)
    r = simulate(cfg, problem=prob, averager=agg, rank=rank)
    return [h["gap"] for h in r["history"]], r["exchanges"]


@pytest.mark.parametrize("method", ["qoda", "qgenx"])
def test_distributed_run_equals_simulation(method):
    res = values(run(_worker, 2, method, timeout=120))
    sim = simulate(_cfg(method))
    gaps = [h["gap"] for h in sim["history"]]
    assert res[0][0] == res[1][0]  # every rank holds the same iterates
    assert np.array_equal(np.array(res[0][0]), np.array(gaps))  # bit for bit the simulated run
    assert res[0][1] == sim["exchanges"]
