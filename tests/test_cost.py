"""qoda.comm.cost: its predictions against the averagers' own accounting on real gloo processes
(2 and 4 ranks, every mode), and its arithmetic."""

import pytest
import torch
from torch import nn

from distributed import run, values
from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm import cost
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerPolicy

MODES = ("fp32", "fp16", "allgather", "two_phase")
STEPS = 2
POWERSGD_START = 2


class Small(nn.Module):
    """Three types (conv, linear, uncompressed), layers of uneven sizes: uneven two-phase chunks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)  # 432 weights: uncompressed (< min_numel)
        self.conv2 = nn.Conv2d(16, 24, 3)  # 3456
        self.fc1 = nn.Linear(50, 70)  # 3500
        self.fc2 = nn.Linear(70, 33)  # 2310


def _plan(coding="fixed"):
    policy = LayerPolicy.by_module_class(
        QuantizerConfig.qsgd(4, 256, coding=coding), {"linear": QuantizerConfig.nuqsgd(3, 100, coding=coding)}
    )
    return policy.plan(Small())


def _inputs(rank, step, shapes):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(s, generator=g) * (1 + rank) for s in shapes]


def _counting(calls):
    """Wrap torch.distributed's collectives so that each call is counted in ``calls[0]``."""
    import torch.distributed as dist

    for name in ("all_gather", "all_to_all_single", "all_reduce", "broadcast", "all_gather_into_tensor"):
        fn = getattr(dist, name)

        def counted(*a, fn=fn, **k):
            calls[0] += 1
            return fn(*a, **k)

        setattr(dist, name, counted)


def _worker(rank, world):
    from qoda.comm.aggregate import Aggregator
    from qoda.comm.baselines import PowerSGDAverager

    plan = _plan()
    shapes = [e.shape for e in plan.entries]
    out, pieces = {"collectives": {}}, None
    calls = [0]
    _counting(calls)
    for mode in MODES:
        agg = Aggregator(plan, mode, seed=3)
        out[mode], out["collectives"][mode] = [], []
        for s in range(STEPS):
            calls[0] = 0
            out[mode].append(agg.average_(_inputs(rank, s, shapes), s).as_dict())
            out["collectives"][mode].append(calls[0])
        if mode == "two_phase":
            pieces = agg.context.layout.pieces
    ps = PowerSGDAverager(shapes, rank=1, start_iter=POWERSGD_START, seed=0)
    out["powersgd"] = [ps.average_(_inputs(rank, s, shapes), s).as_dict() for s in range(POWERSGD_START + 2)]
    return out, pieces


@pytest.mark.parametrize("world", [2, 4])
def test_predicted_bytes_equal_the_averagers_accounting(world):
    plan = _plan()
    results = values(run(_worker, world, timeout=120))
    assert results[0][1] == cost.two_phase_pieces(LayerwiseCodec(plan), world)  # the Aggregator's chunks
    for rank, (measured, _) in enumerate(results):
        for mode in MODES:
            want = cost.exchange_cost(mode, world, plan, rank=rank)
            for st in measured[mode]:
                assert (st["bytes_sent"], st["bytes_received"]) == (want.bytes_sent, want.bytes_received), (mode, rank)
        for step, st in enumerate(measured["powersgd"]):
            want = cost.exchange_cost("powersgd", world, plan, compressing=step >= POWERSGD_START)
            assert (st["bytes_sent"], st["bytes_received"]) == (want.bytes_sent, want.bytes_received), step
    # the ranks of two-phase differ (uneven chunks), and the model's terms are what the table says
    tp = [cost.exchange_cost("two_phase", world, plan, rank=r) for r in range(world)]
    assert len({c.bytes_sent for c in tp}) > 1
    assert all(c.collectives == 2 and c.latency_terms == 2 * (world - 1) for c in tp)
    assert all(c.size_bytes == 0 for c in tp)
    # the collectives the averagers really issued (counted on the processes) are the model's
    for measured, _ in results:
        for mode in MODES:
            want = cost.exchange_cost(mode, world, plan).collectives
            assert measured["collectives"][mode] == [want] * STEPS, mode


def test_costs_per_mode():
    plan = _plan()
    codec = LayerwiseCodec(plan)
    n = sum(e.numel for e in plan.entries)
    m = codec.message_size()
    k = 4
    assert cost.exchange_cost("fp32", k, plan) == cost.ExchangeCost(6 * n, 6 * n, 0, 1, 6)
    assert cost.exchange_cost("fp16", k, plan).bytes_sent == 3 * n
    ag = cost.exchange_cost("allgather", k, plan)
    # fixed width: one all-gather, no size exchange (every size is known from the plan)
    assert ag == cost.ExchangeCost(3 * m, 3 * m, 0, 1, 3)
    assert cost.allgather_message_bytes(k, ag.bytes_sent) == m
    assert ag.payload_bytes == 3 * m and ag.seconds(1e-4, 1e6) == pytest.approx(3e-4 + 3 * m / 1e6)
    # entropy coding: sizes first (one more all-gather, K-1 more latency terms)
    sized = cost.allgather(k, m, sized=True)
    assert sized == cost.ExchangeCost(3 * (m + 8), 3 * (m + 8), 3 * 8, 2, 6)
    assert cost.allgather_message_bytes(k, sized.bytes_sent, sized=True) == m
    # two-phase: one all-to-all and one all-gather, 2(K-1) latency terms (4(K-1) with entropy coding)
    tp = cost.exchange_cost("two_phase", k, plan)
    assert (tp.collectives, tp.latency_terms, tp.size_bytes) == (2, 2 * (k - 1), 0)
    tps = cost.two_phase(k, [m / k] * k, sized=True)
    assert (tps.collectives, tps.latency_terms, tps.size_bytes) == (4, 4 * (k - 1), 2 * (k - 1) * 8)
    ps = cost.exchange_cost("powersgd", k, plan)
    assert ps.collectives == 3 and ps.latency_terms == 18
    assert cost.exchange_cost("powersgd", k, plan, compressing=False) == cost.exchange_cost("fp32", k, plan)
    assert cost.exchange_cost("fp32", 1, plan).seconds(1.0, 1.0) == 0.0
    # every rank's messages, padded to the longest; entropy coding: sizes must be given
    assert cost.allgather(3, [10, 30, 20]) == cost.allgather(3, 30)
    with pytest.raises(ValueError, match="entropy-coded"):
        cost.exchange_cost("allgather", k, _plan("entropy"))
    with pytest.raises(ValueError, match="mode: expected one of"):
        cost.exchange_cost("carrier_pigeon", k, plan)
    with pytest.raises(ValueError, match="needs the plan"):
        cost.exchange_cost("two_phase", k)


def test_two_phase_even_split_moves_twice_the_chunk_share():
    m, k = 1000.0, 5
    c = cost.two_phase(k, [m / k] * k)
    assert c.payload_bytes == pytest.approx(2 * (k - 1) / k * m)
    assert c.bytes_sent == c.bytes_received == pytest.approx(2 * (k - 1) / k * m)
    with pytest.raises(ValueError, match="chunk sizes"):
        cost.two_phase(k, [1.0] * (k - 1))
