"""The averager contract (:class:`qoda.comm.averager.Averager`), checked on every averager in a
1-process gloo world: in-place average, costs, checkpoints, plan, capabilities."""

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from qoda.codec.topk import TopK
from qoda.comm.adaptive import AdaptiveAggregator
from qoda.comm.aggregate import Aggregator
from qoda.comm.averager import Averager, CommStats
from qoda.comm.baselines import LocalAverager, PowerSGDAverager
from qoda.comm.compressed import CompressedAverager
from qoda.comm.overlap import OverlappedAverager
from qoda.quant.adapt import AdaptConfig, RefitSchedule
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerPlan, LayerPolicy
from qoda.vi.simulator import ExactAverager, SimulatedAverager

# L-inf norm: a quantized coordinate is off by at most (largest level gap) x (its bucket's max |v|)
CONFIG = QuantizerConfig.qsgd_inf(4, 64)
ADAPT = AdaptConfig(schedule=RefitSchedule((0, 4), every=100), observe_every=1)  # re-fits at 0 and 4


def _players():
    torch.manual_seed(0)
    return nn.ModuleDict({"first": nn.Linear(40, 64), "second": nn.Linear(64, 32)})


def _plan(module):
    # per_layer: every compressed tensor its own type (disjoint across the overlapped parts); biases go raw
    return LayerPolicy.per_layer(CONFIG).plan(module)


def _part_plans():
    players = _players()
    return [_plan(nn.ModuleDict({name: m})) for name, m in players.named_children()]


SHAPES = [p.shape for p in _players().parameters()]


def _inputs(step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) * (1 + i) for i, s in enumerate(SHAPES)]


class _Simulated(SimulatedAverager):
    """The VI simulator's averager with one worker whose tensors are the call's input."""

    def average_(self, tensors, step):
        self.set_worker_tensors([[t.clone() for t in tensors]])
        return super().average_(tensors, step)


class _Exact(ExactAverager):
    def average_(self, tensors, step):
        self.set_worker_tensors([[t.clone() for t in tensors]])
        return super().average_(tensors, step)


def _overlapped(quantized=True):
    """Two parts on their own groups: adaptive allgather + two-phase, or PowerSGD + fp32 (no plan)."""
    first, second = _part_plans()
    if quantized:
        a = AdaptiveAggregator(first, "allgather", dist.new_group(), seed=5, adapt=ADAPT)
        b = Aggregator(second, "two_phase", dist.new_group(), seed=6)
    else:
        a = PowerSGDAverager(SHAPES[:2], rank=1, start_iter=2, group=dist.new_group(), seed=5)
        b = Aggregator(second, "fp32", dist.new_group())
    return OverlappedAverager([[0, 1], [2, 3]], [a, b], ["first", "second"])


# name -> (builder, how close one call leaves the tensors to its input in a 1-process world)
CASES = {
    "fp32": (lambda: Aggregator(_plan(_players()), "fp32"), "exact"),
    "fp16": (lambda: Aggregator(_plan(_players()), "fp16"), "fp16"),
    "allgather": (lambda: Aggregator(_plan(_players()), "allgather", seed=3), 1),
    "two_phase": (lambda: Aggregator(_plan(_players()), "two_phase", seed=3), 2),
    "adaptive_allgather": (lambda: AdaptiveAggregator(_plan(_players()), "allgather", seed=3, adapt=ADAPT), 1),
    "adaptive_two_phase": (lambda: AdaptiveAggregator(_plan(_players()), "two_phase", seed=3, adapt=ADAPT), 2),
    "powersgd": (lambda: PowerSGDAverager(SHAPES, rank=1, start_iter=2, seed=3), "warm-up"),
    "local": (LocalAverager, "exact"),
    "overlapped": (_overlapped, 2),
    "overlapped_powersgd": (lambda: _overlapped(quantized=False), "warm-up"),
    "simulated": (lambda: _Simulated(_plan(_players()), world=1, seed=3), 1),
    "exact_simulated": (lambda: _Exact(world=1), "exact"),
    "topk": (lambda: CompressedAverager(TopK(SHAPES, 0.25, error_feedback=True), seed=3), "topk"),
}


pytestmark = pytest.mark.usefixtures("gloo_world_1")


def _bucket_bound(x: torch.Tensor, config: QuantizerConfig, quantizations: int) -> torch.Tensor:
    """Per coordinate of ``x``: the largest error ``quantizations`` successive L-inf quantizations
    can make (each is within one level gap times its bucket's max |v|, which never grows)."""
    gap = float(np.diff(np.asarray(config.levels.array, dtype=np.float64)).max())
    flat = x.reshape(-1)
    scale = torch.cat([b.abs().max().expand(b.numel()) for b in flat.split(config.bucket_size)])
    return (quantizations * gap * scale * (1 + 1e-5) + 1e-6).view(x.shape)


def _check_close(avg: Averager, before, after, how, calls_before: int) -> None:
    if how == "exact":
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a, b)
    elif how == "fp16":
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a.half().float(), b)
    elif how == "warm-up":  # PowerSGD: plain all-reduce before start_iter, then a low-rank approximation
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a, b) if calls_before < 2 else bool(torch.isfinite(b).all())
    elif how == "topk":  # the k largest of input + memory (no memory at the first call)
        after_flat = torch.cat([b.reshape(-1) for b in after])
        assert int((after_flat != 0).sum()) == avg.compressor.k
        if calls_before == 0:
            flat = torch.cat([a.reshape(-1) for a in before])
            keep = flat.abs().topk(avg.compressor.k).indices
            assert torch.equal(after_flat, torch.zeros_like(flat).index_copy_(0, keep, flat[keep]))
    else:  # quantized ``how`` times (two-phase: phase 1 and the re-quantization of its average)
        plan = avg.plan
        assert isinstance(plan, LayerPlan)
        for e, a, b in zip(plan.entries, before, after, strict=True):
            if e.type_name is None:  # sent raw
                assert torch.equal(a, b), e.name
            else:
                assert bool(((a - b).abs() <= _bucket_bound(a, plan.configs[e.type_name], how)).all()), e.name
                assert not torch.equal(a, b), e.name  # it was quantized


@pytest.mark.parametrize("name", list(CASES))
def test_average_in_place_costs_and_calls(name):
    build, how = CASES[name]
    avg = build()
    assert isinstance(avg, Averager)
    assert avg.stats == CommStats()
    returned = []
    for step in range(4):
        before = _inputs(step)
        tensors = [t.clone() for t in before]
        st = avg.average_(tensors, step)
        assert isinstance(st, CommStats) and st.calls == 1
        returned.append(st)
        _check_close(avg, before, tensors, how, step)
    assert avg.stats.calls == 4
    assert avg.stats.payload_bits == sum(s.payload_bits for s in returned)
    assert avg.stats.bytes_sent == sum(s.bytes_sent for s in returned)
    if avg.communicates:
        assert avg.stats.payload_bits > 0
    if not avg.communicates:
        assert avg.stats == CommStats(calls=4)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_continues_identically(name):
    build, _ = CASES[name]
    avg = build()
    for step in range(3):
        avg.average_(_inputs(step), step)
    state = avg.state_dict()
    assert set(state) >= {"stats"} and state["stats"]["calls"] == 3
    fresh = build()
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))  # as a checkpoint: a copy, nothing shared
    assert fresh.stats == avg.stats
    plan = avg.plan
    assert (fresh.plan is None) if plan is None else fresh.plan.fingerprint() == plan.fingerprint()
    for step in (3, 4):  # adaptive: step 3 quantizes with the restored levels, step 4 re-fits
        a, b = _inputs(step), _inputs(step)
        sa, sb = avg.average_(a, step), fresh.average_(b, step)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        assert sa.payload_bits == sb.payload_bits and sa.bytes_sent == sb.bytes_sent
    untimed = [{k: v for k, v in x.state_dict()["stats"].items() if not k.endswith("seconds")} for x in (avg, fresh)]
    assert untimed[0] == untimed[1]


def test_plan_capabilities_and_start():
    plan = _plan(_players())
    built = {name: build() for name, (build, _) in CASES.items()}
    for name, avg in built.items():
        expect_plan = name not in ("powersgd", "local", "overlapped_powersgd", "exact_simulated", "topk")
        assert isinstance(avg.plan, LayerPlan) if expect_plan else avg.plan is None, name
        assert avg.communicates is (name != "local"), name
        assert avg.starts_parts is name.startswith("overlapped"), name
        if not avg.starts_parts:
            with pytest.raises(NotImplementedError):
                avg.start(0, _inputs(0), 0)
        assert avg.simulates_workers is name.endswith("simulated"), name
        if not avg.simulates_workers:
            with pytest.raises(NotImplementedError):
                avg.set_worker_tensors([_inputs(0)])
    assert built["fp32"].plan is built["fp32"].codec.plan
    assert built["allgather"].plan.fingerprint() == plan.fingerprint()
    adaptive = built["adaptive_allgather"]
    adaptive.average_(_inputs(0), 0)  # levels fitted at the first call: the plan follows them
    assert adaptive.plan is adaptive.adapter.plan and adaptive.plan.fingerprint() != plan.fingerprint()
    # overlapped: the parts' plans side by side, in tensor order
    merged = built["overlapped"].plan
    assert [e.name for e in merged.entries] == [e.name for p in _part_plans() for e in p.entries]
    assert merged.types == ("first.weight", "second.weight")


def test_overlapped_start_equals_one_exchange():
    avg, ref = _overlapped(), _overlapped()
    for step in range(3):
        x, y = _inputs(step), _inputs(step)
        avg.start(0, x[:2], step)  # the first part in the background
        st, sr = avg.average_(x, step), ref.average_(y, step)
        for a, b in zip(x, y, strict=True):
            assert torch.equal(a, b)
        assert st.calls == sr.calls == 1 and (st.payload_bits, st.bytes_sent) == (sr.payload_bits, sr.bytes_sent)
    assert avg.stats.calls == ref.stats.calls == 3
    assert [a.stats.calls for a in avg.averagers] == [3, 3]


def test_overlapped_plan_rejects_a_type_with_two_settings():
    one = LayerPolicy.global_(CONFIG).plan(nn.Linear(40, 64))
    other = LayerPolicy.global_(QuantizerConfig.qsgd_inf(8, 64)).plan(nn.Linear(64, 32))
    avg = OverlappedAverager([[0, 1], [2, 3]], [Aggregator(one, "fp32"), Aggregator(other, "fp32")], ["a", "b"])
    with pytest.raises(ValueError, match="other settings in part 'b'"):
        _ = avg.plan


def test_adaptive_observe_and_refresh_are_what_average_does():
    """The DDP hook's use (observe during warm-up, refresh at the first compressed step) and
    ``average_`` share one implementation: same levels, same results."""
    plan = _plan(_players())
    whole = AdaptiveAggregator(plan, "allgather", seed=3, adapt=ADAPT)
    split = AdaptiveAggregator(plan, "allgather", seed=3, adapt=ADAPT, check=False)
    assert split.aggregator is None  # built at the first refresh
    for step in range(5):
        a, b = _inputs(step), _inputs(step)
        whole.average_(a, step)
        split.observe(b, step)
        agg = split.refresh(step)
        assert agg is split.aggregator and agg.plan.fingerprint() == split.plan.fingerprint()
        agg.average_(b, step)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    assert whole.adapter.fits == split.adapter.fits == 2
    assert whole.plan.fingerprint() == split.plan.fingerprint()


def test_the_layerwise_codec_through_the_compressor_contract_averages_like_the_aggregator():
    """LayerwiseCodec is a Compressor: averaged by CompressedAverager it gives the allgather
    Aggregator's result bit for bit (same seeds, same bytes, same decode order)."""
    from qoda.codec.layerwise import LayerwiseCodec

    plan = _plan(_players())
    agg, generic = Aggregator(plan, "allgather", seed=3), CompressedAverager(LayerwiseCodec(plan), seed=3)
    for step in range(2):
        a, b = _inputs(step), _inputs(step)
        sa, sb = agg.average_(a, step), generic.average_(b, step)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert sa.payload_bits == sb.payload_bits
    assert repr(generic.compressor) == f"LayerwiseCodec(plan {generic.compressor.plan_id:08x})"
