"""The protocol contract (qoda.comm.protocol), worked example: a toy protocol added in this file only.

``RingAllgather`` passes every rank's allgather message around a ring in ``K - 1`` stages and
decodes the ``K`` messages in rank order, so its average equals the built-in allgather's bit for
bit.  Registered by name, it runs in the Aggregator, in the DDP hook (its stages pipelined across
buckets) and in the cost and step-time models, with no other file touched.
"""

from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run, values
from qoda.comm import cost
from qoda.comm.averager import CommStats
from qoda.comm.collective_cost import ExchangeCost
from qoda.comm.protocol import PROTOCOLS, Protocol, charge, protocol_named, register_protocol, to_wire
from qoda.comm.step_time import Network, Workload, exchange_seconds
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerPolicy


@register_protocol
class RingAllgather(Protocol):
    """Stage ``s`` (``0 <= s < K-1``): rank ``r`` sends rank ``r-s``'s message to ``r+1`` and receives
    rank ``r-s-1``'s from ``r-1`` (an all-to-all with one non-empty split each way).  Fixed-width
    coding only (the ring passes messages of the plan's size)."""

    name = "ring_allgather"

    @classmethod
    def stages(cls, k: int) -> int:
        return k - 1

    @classmethod
    def cost(cls, k: int, sizes: Sequence[float], rank: int = 0, sized: bool = False) -> ExchangeCost:
        if sized:
            raise ValueError("ring_allgather: fixed-width coding only")
        moved = (k - 1) * sizes[0]
        return ExchangeCost(moved, moved, 0, k - 1, k - 1)  # one neighbour message per stage

    @classmethod
    def codec_work(cls, k: int) -> tuple[float, float]:
        return 1.0, float(k)

    def first_stage(self) -> dist.Work:
        ctx = self.ctx
        if not ctx.fixed:
            raise ValueError("ring_allgather: fixed-width coding only")
        self.msg, data, _ = ctx.encode_own(self.tensors, self.step, "message")  # a failure message travels too
        self.got = {ctx.rank: to_wire(data, ctx.wire_device)}
        return self._pass()

    def next_stage(self) -> dist.Work:
        self.got[self.source] = self.incoming
        return self._pass()

    def _pass(self) -> dist.Work:
        ctx, s = self.ctx, self.issued
        k, r, size = ctx.world, ctx.rank, ctx.sizes[0]
        self.source = (r - s - 1) % k
        self.incoming = torch.empty(size, dtype=torch.uint8, device=ctx.wire_device)
        out, into = [0] * k, [0] * k
        out[(r + 1) % k], into[(r - 1) % k] = size, size
        return dist.all_to_all_single(
            self.incoming, self.got[(r - s) % k], output_split_sizes=into, input_split_sizes=out, group=ctx.group,
            async_op=True,
        )  # fmt: skip

    def complete(self) -> CommStats:
        ctx, st = self.ctx, self.stats
        self.got[self.source] = self.incoming
        k = ctx.world
        acc = ctx.average_messages(ctx.received([self.got[q] for q in range(k)], ctx.sizes * k))  # rank order
        ctx.codec.scatter(acc, self.tensors, accumulate=False)
        st.payload_bits = self.msg.code_bits if self.msg is not None else 0
        charge(st, self.cost(k, ctx.sizes, ctx.rank))
        return st


POLICY = LayerPolicy.global_(QuantizerConfig.qsgd(4, 128), min_numel=64)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _worker(rank, world):
    from qoda.comm.aggregate import Aggregator
    from qoda.comm.ddp_hook import QodaHookState

    plan = POLICY.plan(Net())
    g = torch.Generator().manual_seed(rank)
    base = [torch.randn(e.shape, generator=g) for e in plan.entries]
    out = {"aggregator": {}, "stats": {}, "hook": {}}
    for mode in ("allgather", "ring_allgather"):
        ts = [t.clone() for t in base]
        out["stats"][mode] = Aggregator(plan, mode, seed=3).average_(ts, step=5).as_dict()
        out["aggregator"][mode] = torch.cat([t.reshape(-1) for t in ts]).numpy()  # numpy: tensors cannot leave
        # the DDP hook: three buckets, the ring's stages issued from later buckets' bodies
        torch.manual_seed(0)
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.005)
        QodaHookState(model, POLICY, mode=mode, start_iter=0, adapt=None).register(ddp)
        x = torch.randn(16, 24, generator=torch.Generator().manual_seed(10 + rank))
        for _ in range(2):
            ddp.zero_grad()
            ddp(x).square().mean().backward()
        out["hook"][mode] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    return out


def test_a_registered_toy_protocol_runs_everywhere_bit_exactly_like_allgather():
    world = 3
    plan = POLICY.plan(Net())
    res = values(run(_worker, world, timeout=120))
    want = cost.exchange_cost("ring_allgather", world, plan)  # the cost model, through the registry
    assert want.bytes_sent == cost.exchange_cost("allgather", world, plan).bytes_sent
    assert want.collectives == world - 1
    for r in res:
        assert np.array_equal(r["aggregator"]["ring_allgather"], r["aggregator"]["allgather"])
        assert np.array_equal(r["hook"]["ring_allgather"], r["hook"]["allgather"])
        assert np.array_equal(r["aggregator"]["ring_allgather"], res[0]["aggregator"]["ring_allgather"])
        st = r["stats"]["ring_allgather"]
        assert (st["bytes_sent"], st["bytes_received"]) == (want.bytes_sent, want.bytes_received)
        assert st["payload_bits"] == r["stats"]["allgather"]["payload_bits"] > 0


def test_the_step_time_model_prices_a_registered_protocol():
    """Same bytes, latency terms and codec work as allgather at fixed width: the same time."""
    w = Workload(parameters=10_000, message_bytes={"lw4": 5_200.0}, powersgd_floats=0.0, encode_gbps=2.0,
                 decode_gbps=4.0)  # fmt: skip
    net = Network(alpha=1e-4, beta=1e7)
    for k in (2, 5):
        ring = exchange_seconds("ring_allgather:lw4", k, net, w)
        assert ring == pytest.approx(exchange_seconds("allgather:lw4", k, net, w))
        assert ring == pytest.approx((k - 1) * 1e-4 + (k - 1) * 5_200 / 1e7 + 4e4 / 2e9 + k * 4e4 / 4e9)


def test_registry_names_and_errors():
    assert PROTOCOLS["ring_allgather"] is RingAllgather
    assert protocol_named("two_phase").stages(4) == 2 and protocol_named("fp16").element_bytes == 2
    with pytest.raises(ValueError, match=r"mode: expected one of \[.*'ring_allgather'.*\], got 'carrier_pigeon'"):
        protocol_named("carrier_pigeon")
    with pytest.raises(ValueError, match="non-empty str name"):
        register_protocol(type("Nameless", (RingAllgather,), {"name": ""}))
