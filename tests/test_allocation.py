"""Layer-wise bit allocation: exact DP, the budget measured on the wire, the adapter with widths."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from qoda.codec.layerwise import LayerwiseCodec, fixed_message_bits
from qoda.quant.adapt import AdaptConfig, LevelAdapter, RefitSchedule
from qoda.quant.allocation import allocate_bits, allocate_plan, uniform_plan, width_type
from qoda.quant.config import QuantizerConfig
from qoda.quant.fitting import MagnitudeStats, fit_alq, fit_amq, levels_for_bits
from qoda.quant.policy import LayerPolicy
from qoda.quant.variance import plan_variance


class Net(nn.Module):
    """Tensors of different sizes; their gradients get very different scales below."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 48)  # 3072
        self.b = nn.Linear(48, 128)  # 6144
        self.c = nn.Conv2d(16, 16, 3)  # 2304
        self.d = nn.Linear(128, 16)  # 2048
        self.e = nn.Linear(4, 4)  # 16 + 4 bias: uncompressed


def _grads(seed: int, model: nn.Module) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = [3.0, 0.02, 0.05, 0.001, 1.0, 0.2, 0.01, 0.1, 1.0, 1.0]
    out = []
    for p, s in zip(model.parameters(), scales, strict=False):
        x = torch.randn(p.shape, generator=g) * s
        out.append(x * (torch.rand(p.shape, generator=g) < 0.3) if p.dim() > 1 else x)  # sparse-ish, heavy tails
    return out


def _stats(plan, grads):
    stats = {}
    for i, e in enumerate(plan.entries):
        if e.type_name is not None:
            st = MagnitudeStats()
            st.update(grads[i], plan.configs[e.type_name])
            stats[e.name] = st
    return stats


@pytest.mark.parametrize("seed", range(20))
def test_dp_is_exact_against_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    numels = rng.integers(1, 40, n)
    widths = sorted(rng.choice(np.arange(2, 9), k, replace=False))
    errors = [[float(rng.random()) * 2.0 ** (-b) * m for b in widths] for m in numels]
    costs = [[int(m * b) for b in widths] for m in numels]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = float(rng.integers(lo, hi + 1))
    picks = allocate_bits(errors, costs, budget)
    assert sum(costs[i][p] for i, p in enumerate(picks)) <= budget
    best = min(
        sum(errors[i][p] for i, p in enumerate(combo))
        for combo in itertools.product(range(k), repeat=n)
        if sum(costs[i][p] for i, p in enumerate(combo)) <= budget
    )
    assert sum(errors[i][p] for i, p in enumerate(picks)) == pytest.approx(best, rel=1e-12, abs=1e-15)


def test_allocation_picks_the_exhaustive_optimum_of_its_objective():
    """Step 2's objective (type levels fitted per width) minimised over every width combination."""
    model = Net()
    plan = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 512)).plan(model)
    grads = _grads(0, model)
    stats = _stats(plan, grads)
    widths = (2, 3, 4)
    budget = 3.2
    alloc = allocate_plan(plan, stats, budget, widths, message_bits=fixed_message_bits)
    units = [e for e in plan.entries if e.type_name is not None]
    summed = MagnitudeStats(counts=sum(stats[e.name].counts for e in units))
    levels = {b: fit_alq(summed, levels_for_bits(b)) for b in widths}

    def objective(ws):
        return sum(stats[e.name].variance(levels[b]) for e, b in zip(units, ws, strict=True))

    numel = sum(e.numel for e in plan.entries)
    feasible = []
    for ws in itertools.product(widths, repeat=len(units)):
        from qoda.quant.allocation import allocated_plan

        p = allocated_plan(plan, {e.name: b for e, b in zip(units, ws, strict=True)}, {})
        if fixed_message_bits(p) <= budget * numel:
            feasible.append((objective(ws), ws))
    best = min(feasible)[0]
    got = objective([alloc.widths[e.name] for e in units])
    # the DP reserves framing for the segments a split may add: it may give up the last few bits
    assert got <= best * 1.02
    assert alloc.message_bits <= budget * numel


@pytest.mark.parametrize("budget", [2.9, 3.3, 4.0, 5.5])
def test_budget_counts_every_bit_on_the_wire_and_is_spent(budget):
    model = Net()
    plan = LayerPolicy.by_module_class(QuantizerConfig.qsgd_inf(4, 256)).plan(model)
    grads = _grads(1, model)
    alloc = allocate_plan(plan, _stats(plan, grads), budget, message_bits=fixed_message_bits)
    numel = sum(g.numel() for g in grads)
    msg = LayerwiseCodec(alloc.plan).encode(grads, seed=3)
    assert 8 * len(msg) == alloc.message_bits  # the codec's real message, every byte
    assert 8 * len(msg) <= budget * numel
    # optimality: any tensor below the widest width could take one more bit for numel bits, so the
    # unspent budget is below the largest tensor's numel plus the framing kept for unused segments
    units = [e for e in plan.entries if e.type_name is not None]
    if any(alloc.widths[e.name] < 8 for e in units):
        assert budget * numel - 8 * len(msg) < max(e.numel for e in units) + 8 * 200
    assert alloc.average_bits == pytest.approx(8 * len(msg) / numel)


def test_allocation_beats_uniform_widths_at_equal_bits():
    model = Net()
    plan = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 512)).plan(model)
    fit_g, grads = _grads(2, model), _grads(3, model)  # fitted on one minibatch, measured on another
    stats = _stats(plan, fit_g)
    summed = MagnitudeStats(counts=sum(s.counts for s in stats.values()))
    uniform = LayerPolicy.global_(
        QuantizerConfig(fit_alq(summed, levels_for_bits(4)), 512, "linf")
    ).plan(model)  # fmt: skip
    numel = sum(g.numel() for g in grads)
    alloc = allocate_plan(plan, stats, fixed_message_bits(uniform) / numel, message_bits=fixed_message_bits)
    assert alloc.message_bits <= fixed_message_bits(uniform)
    # the gradients' energy differs by 300x across tensors: the allocation must pay off clearly
    assert plan_variance(grads, alloc.plan) < 0.5 * plan_variance(grads, uniform)
    assert len(set(alloc.widths.values())) > 1


def test_uniform_plan_on_the_same_gradients_is_the_exact_variance_formula():
    """The reference plan of an allocation: every tensor at 4 bits with the allocation's 4-bit levels,
    its message the 4-bit budget, and ``plan_variance`` on it equal to
    ``sum_i ||bucket(i)||^2 (u_i - l_j)(l_{j+1} - u_i)`` computed here coordinate by coordinate."""
    model = Net()
    plan = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 512)).plan(model)
    grads = _grads(3, model)
    four = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 512)).plan(model)
    numel = sum(g.numel() for g in grads)
    alloc = allocate_plan(plan, _stats(plan, _grads(2, model)), fixed_message_bits(four) / numel,
                          message_bits=fixed_message_bits)  # fmt: skip
    ref = uniform_plan(plan, 4, alloc.type_levels)
    (t,) = ref.types
    assert t == width_type(plan.types[0], 4) and ref.configs[t].levels == alloc.type_levels[plan.types[0], 4]
    assert fixed_message_bits(ref) == fixed_message_bits(four)
    levels = torch.tensor(ref.configs[t].levels.values, dtype=torch.float64)
    expected, total = 0.0, 0.0
    for e, g in zip(ref.entries, grads, strict=True):
        total += float(g.double().square().sum())
        if e.type_name is None:
            continue
        for chunk in g.double().reshape(-1).split(512):  # buckets restart at every tensor
            norm = float(chunk.abs().max())
            u = chunk.abs() / norm if norm > 0 else chunk.abs()
            j = (torch.searchsorted(levels, u, right=True) - 1).clamp(0, len(levels) - 2)
            expected += float((norm**2 * (u - levels[j]) * (levels[j + 1] - u)).sum())
    assert expected > 0
    assert plan_variance(grads, ref, normalized=False) == pytest.approx(expected, rel=1e-12)
    assert plan_variance(grads, ref) == pytest.approx(expected / total, rel=1e-12)


def test_budget_below_the_smallest_message_names_the_field():
    model = Net()
    plan = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 512)).plan(model)
    with pytest.raises(ValueError, match="budget: 2 bits per coordinate cannot hold this plan"):
        allocate_plan(plan, {}, 2.0, message_bits=fixed_message_bits)
    with pytest.raises(ValueError, match="budget"):
        AdaptConfig(allocation="dp")
    with pytest.raises(ValueError, match="budget"):
        AdaptConfig(budget=3.0)
    with pytest.raises(ValueError, match="widths"):
        AdaptConfig(allocation="dp", budget=3.0, widths=(1, 4))
    with pytest.raises(ValueError, match="allocation"):
        AdaptConfig(allocation="greedy")


def test_edge_inputs_all_zero_single_tensor_and_no_compressed_tensor():
    one = nn.Linear(64, 32, bias=False)
    plan = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 512)).plan(one)
    zero = _stats(plan, [torch.zeros(32, 64)])
    a = allocate_plan(plan, zero, 3.0, message_bits=fixed_message_bits)
    assert a.message_bits <= 3.0 * 2048 and list(a.widths) == ["weight"]
    tiny = nn.Linear(4, 4)
    raw = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 512)).plan(tiny)
    assert raw.types == ()
    with pytest.raises(ValueError, match="budget"):  # raw float32 costs 32 bits per coordinate
        allocate_plan(raw, {}, 8.0, message_bits=fixed_message_bits)
    assert allocate_plan(raw, {}, 100.0, message_bits=fixed_message_bits).widths == {}


def _reduce_pair(adapters):
    """A reduce that sums the two workers' statistics (what all_reduce does)."""
    pending = {}

    def make(k):
        def reduce(arr):
            pending[k] = arr
            return pending[0] + pending[1] if len(pending) == 2 else arr

        return reduce

    return make


def test_adapter_with_allocation_is_identical_across_workers_and_resumes():
    model = Net()
    plan = LayerPolicy.by_module_class(QuantizerConfig.qsgd_inf(4, 256)).plan(model)
    cfg = AdaptConfig(schedule=RefitSchedule((0, 4), every=100), observe_every=1, allocation="dp", budget=3.0)
    counts = []

    def summing(arr):
        counts.append(arr)
        return arr

    a = LevelAdapter(plan, cfg, reduce=summing, message_bits=fixed_message_bits)
    b = LevelAdapter(plan, cfg, reduce=summing, message_bits=fixed_message_bits)
    assert a.plan.fingerprint() == b.plan.fingerprint()  # before any statistics: same widths
    assert all(t.endswith("bit") for t in a.plan.types)
    for step in range(5):
        a.observe(step, _grads(10 + step, model))
        b.observe(step, _grads(20 + step, model))
    # all-reduce by hand: both workers fit from the summed statistics
    total = np.stack([a.stats[k].counts + b.stats[k].counts for k in a.stats])
    a.reduce = b.reduce = lambda arr: total
    pa, pb = a.refit(4), b.refit(4)
    assert pa is not None and pa.fingerprint() == pb.fingerprint()
    assert set(a.widths.values()) > {2} or len(set(a.widths.values())) > 1
    assert a.allocation is not None and a.allocation.message_bits <= 3.0 * sum(e.numel for e in plan.entries)
    # checkpoint: a fresh adapter restores widths and levels exactly
    c = LevelAdapter(plan, cfg, message_bits=fixed_message_bits)
    c.load_state_dict(a.state_dict())
    assert c.plan.fingerprint() == a.plan.fingerprint() and c.widths == a.widths
    uniform = LevelAdapter(plan, AdaptConfig(), message_bits=fixed_message_bits)
    with pytest.raises(ValueError, match="bit allocation"):
        uniform.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="widths"):
        c.load_state_dict(uniform.state_dict())


def test_width_type_names_the_width():
    assert width_type("generator.conv", 3) == "generator.conv/3bit"


# ---------------------------------------------------------------------------------------------- across processes
def _dp_adapt(budget=3.0):
    return AdaptConfig(schedule=RefitSchedule((0, 3), every=100), observe_every=1, allocation="dp", budget=budget)


def _dp_agg_worker(rank, world, budget, split):
    from qoda.comm.adaptive import AdaptiveAggregator

    model = Net()
    plan = LayerPolicy.by_module_class(QuantizerConfig.qsgd_inf(4, 256)).plan(model)
    agg = AdaptiveAggregator(plan, "allgather", seed=5, adapt=_dp_adapt(budget))
    out = []
    for step in range(6):
        if step == split:  # checkpoint, then continue in a fresh averager from the checkpoint
            state = agg.state_dict()
            agg = AdaptiveAggregator(plan, "allgather", seed=5, adapt=_dp_adapt(budget))
            agg.load_state_dict(state)
        grads = _grads(100 * rank + step, model)
        agg.average_(grads, step)
        out.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    numel = sum(e.numel for e in plan.entries)
    return agg.plan.fingerprint(), agg.adapter.widths, np.stack(out), agg.stats.bytes_sent, numel


def test_allocated_plan_is_identical_on_every_rank_within_budget_and_resumes_bit_exactly():
    from tests.distributed import run, values

    straight = values(run(_dp_agg_worker, 2, 3.0, -1, timeout=120))
    resumed = values(run(_dp_agg_worker, 2, 3.0, 4, timeout=120))
    (fp0, w0, avg0, sent, numel), (fp1, w1, avg1, _, _) = straight
    assert fp0 == fp1 and w0 == w1 and len(set(w0.values())) > 1  # same widths and levels, not all equal
    assert np.array_equal(avg0, avg1)  # identical averages on every rank
    # allgather, 2 ranks: each call sends one message plus its 8-byte size; every bit within budget
    assert (sent / 6 - 8) * 8 <= 3.0 * numel
    assert resumed[0][0] == fp0 and np.array_equal(resumed[0][2], avg0)  # bit-exact after the resume


def _mismatch_worker(rank, world):
    from qoda.comm.adaptive import AdaptiveAggregator
    from qoda.comm.aggregate import AggregationError

    plan = LayerPolicy.by_module_class(QuantizerConfig.qsgd_inf(4, 256)).plan(Net())
    try:
        AdaptiveAggregator(plan, "allgather", seed=5, adapt=_dp_adapt(3.0 if rank == 0 else 3.5))
    except AggregationError as e:
        return str(e)
    return None


def test_mismatched_bit_allocation_fails_on_every_rank_naming_the_field():
    from tests.distributed import run, values

    msgs = values(run(_mismatch_worker, 2, timeout=60, pg_timeout=30))
    for m in msgs:
        assert m is not None and "budget" in m, m


def _ddp_worker(rank, world, adapt, steps):
    from qoda.comm.ddp_hook import QodaHookState

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 96), nn.Tanh(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    if adapt is not None:
        policy = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 256), min_numel=64)
        QodaHookState(policy=policy, mode="two_phase", start_iter=2, adapt=adapt).register(ddp)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(256, 40, generator=g)
    y = x @ torch.linspace(-1, 1, 40).unsqueeze(1) + 0.01 * torch.randn(256, 1, generator=g)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def _ddp_workers(rank, world, adapts, steps):
    return [_ddp_worker(rank, world, adapt, steps) for adapt in adapts]


def test_ddp_hook_with_bit_allocation_tracks_uncompressed_ddp():
    from tests.distributed import run, values

    steps = 60
    adapt = AdaptConfig(schedule=RefitSchedule((0, 20), every=1000), observe_every=1, allocation="dp", budget=4.5)
    both = values(run(_ddp_workers, 2, (None, adapt), steps, timeout=240))  # one process group for both
    ref, q = [r[0] for r in both], [r[1] for r in both]
    assert np.array_equal(q[0][1], q[1][1])  # replicas identical
    ref_loss, q_loss = ref[0][0][-1], q[0][0][-1]
    assert q_loss < 0.3 * q[0][0][0]  # it trains
    # unbiased noise at ~4.5 bits with fitted levels (relative variance << 0.1 per quantization)
    # costs a small fraction of the loss: within 10% of uncompressed DDP's, plus a 1e-3 floor
    assert q_loss <= 1.1 * ref_loss + 1e-3, (q_loss, ref_loss)


def test_trainer_auto_allocation_is_dp_when_the_budget_holds_the_plan_else_uniform():
    from qoda.train.compression import layer_plan, resolve_allocation
    from qoda.train.config import ConfigError, TrainConfig
    from qoda.train.trainer import build_models

    def plan_of(cfg):
        g, d = build_models(cfg, 1)
        return layer_plan(cfg, nn.ModuleDict({"generator": g, "critic": d}))

    default = TrainConfig()
    assert default.bit_allocation == "auto" and default.allocation == "dp"
    assert resolve_allocation(default, plan_of(default)).bit_allocation == "dp"
    assert TrainConfig(compression="global_adaptive").allocation == "uniform"  # auto: dp for layer-wise only
    tiny = TrainConfig(width=4, bits=3)  # float32 biases and norms alone exceed 3 bits per coordinate
    assert resolve_allocation(tiny, plan_of(tiny)).bit_allocation == "uniform"
    with pytest.raises(ConfigError, match=r"^bits: 3 bits per coordinate cannot hold this plan"):
        explicit = tiny.replace(bit_allocation="dp")
        resolve_allocation(explicit, plan_of(explicit))
    with pytest.raises(ConfigError, match="bit_allocation"):
        TrainConfig(compression="qsgd", bit_allocation="dp")


def _one_type_case(seed: int):
    """5 tensors of one level type (the issue's shape), heavy-tailed gradients of very different scales."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(64, 8 * k, bias=False) for k in (4, 16, 2, 9, 6)])
    plan = LayerPolicy.global_(QuantizerConfig.qsgd_inf(4, 256)).plan(model)
    scales = torch.rand(5, generator=g) * 10.0 ** torch.randint(-2, 2, (5,), generator=g)
    grads = [torch.randn(p.shape, generator=g) ** 3 * s for p, s in zip(model.parameters(), scales, strict=True)]
    stats = {}
    for e, x in zip(plan.entries, grads, strict=True):
        stats[e.name] = MagnitudeStats(128)
        stats[e.name].update(x, plan.configs[e.type_name])
    return plan, stats


@pytest.mark.parametrize("seed", [0, 2])
def test_dp_is_exact_for_the_framing_it_produces(seed):
    """allocate_plan against exhaustive search over all 7^5 width combinations at budgets near
    2.5 bits, every message measured by the codec: plans with fewer segments than the worst case
    must be found when they are better (the issue: [2,5,6,2,6] over [2,5,4,2,8])."""
    from qoda.quant.allocation import WIDTHS, allocated_plan

    plan, stats = _one_type_case(seed)
    units = [e for e in plan.entries if e.type_name is not None]
    numel = sum(e.numel for e in plan.entries)
    summed = MagnitudeStats(128, counts=sum(s.counts for s in stats.values()))
    levels = {b: fit_amq(summed, levels_for_bits(b)) for b in WIDTHS}  # AMQ: fast fits, same DP
    err = np.array([[stats[e.name].variance(levels[b]) for b in WIDTHS] for e in units])
    combos = np.array(list(itertools.product(range(len(WIDTHS)), repeat=len(units))))
    w = np.array(WIDTHS)[combos]
    segments = np.array([len(set(c)) for c in combos.tolist()])
    sizes = np.array([e.numel for e in units])

    def bits_of(ws):
        return fixed_message_bits(allocated_plan(plan, {e.name: int(b) for e, b in zip(units, ws, strict=True)}, {}))

    # the codec's size is affine in the code bits and the number of segments: checked, then used for all
    base, one, two = bits_of([2] * 5), bits_of([3, 2, 2, 2, 2]), bits_of([2, 3, 2, 2, 3])
    framing = one - base - sizes[0]
    assert two - base == sizes[1] + sizes[4] + framing
    bits = base + (w - 2) @ sizes + framing * (segments - 1)
    for k in np.random.default_rng(seed).choice(len(combos), 8, replace=False):
        assert bits[k] == bits_of(w[k])
    objective = err[np.arange(len(units)), combos].sum(axis=1)
    found_fewer = False
    for budget in (2.4, 2.5, 2.6, 2.75):
        ok = bits <= budget * numel
        best = objective[ok].min()
        alloc = allocate_plan(plan, stats, budget, method="amq", message_bits=fixed_message_bits)
        got = [alloc.widths[e.name] for e in units]
        assert alloc.message_bits == bits_of(got) <= budget * numel
        assert sum(stats[e.name].variance(levels[b]) for e, b in zip(units, got, strict=True)) == pytest.approx(
            best, rel=1e-12
        )
        # the optimum would not fit a budget that reserves framing for the worst case (min(5, 7) segments)
        worst = base + (w - 2) @ sizes + framing * (min(len(units), len(WIDTHS)) - 1)
        found_fewer |= best < objective[worst <= budget * numel].min() * (1 - 1e-9)
    assert found_fewer  # a worst-case framing reserve loses on these cases


def test_dp_with_groups_matches_exhaustive_search_on_random_costs():
    """allocate_bits with groups and a segment cost against brute force, small random problems."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        n, k = int(rng.integers(2, 6)), int(rng.integers(2, 5))
        groups = list(rng.integers(0, 2, n))
        numels = rng.integers(1, 40, n)
        widths = sorted(rng.choice(np.arange(2, 9), k, replace=False))
        errors = [[float(rng.random()) * 2.0 ** (-b) * m for b in widths] for m in numels]
        costs = [[int(m * b) for b in widths] for m in numels]
        seg = int(rng.integers(0, 30))

        def cost(combo, groups=groups, costs=costs, seg=seg):
            used = {(groups[i], p) for i, p in enumerate(combo)}
            per_group = {g for g, _ in used}
            return sum(costs[i][p] for i, p in enumerate(combo)) + seg * (len(used) - len(per_group))

        lo = cost([0] * n)
        budget = float(rng.integers(lo, sum(max(c) for c in costs) + 3 * seg + 1))
        picks = allocate_bits(errors, costs, budget, groups=groups, segment_cost=seg)
        assert cost(picks) <= budget
        combos = itertools.product(range(k), repeat=n)
        best = min(sum(errors[i][p] for i, p in enumerate(c)) for c in combos if cost(c) <= budget)
        assert sum(errors[i][p] for i, p in enumerate(picks)) == pytest.approx(best, rel=1e-12, abs=1e-15)


def _loud(seed: int, model: nn.Module, loud: str) -> list[torch.Tensor]:
    """Unit-scale gradients, the parameter ``loud`` 100x louder."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * (100.0 if n == loud else 1.0) for n, p in model.named_parameters()]


def test_refit_rule_reallocates_on_observation_steps_deterministically_and_resumes():
    """The rule of docs/quantization.md: observation (and re-allocation) steps every follow_every-th
    step while following, then every observe_every-th; a re-allocation keeps the last re-fit's levels,
    returns a plan only when the widths change, and restores from a checkpoint mid-follow (no guard:
    the next test)."""
    cfg = AdaptConfig(method="amq", schedule=RefitSchedule((0,), every=1000), observe_every=10, bins=256,
                      allocation="dp", budget=4.5, follow=6, follow_every=2, guard=None)  # fmt: skip
    assert [s for s in range(25) if cfg.observes(s)] == [0, 2, 4, 10, 20]
    assert [s for s in range(25) if cfg.reallocates(s)] == [0, 2, 4, 10, 20]
    assert not AdaptConfig(allocation="dp", budget=3.0, follow=0).reallocates(2)
    assert [s for s in range(12) if AdaptConfig().observes(s)] == [0, 10]  # uniform widths: as before
    with pytest.raises(ValueError, match="follow_every"):
        AdaptConfig(allocation="dp", budget=3.0, follow_every=0)
    model = Net()
    plan = LayerPolicy.by_module_class(QuantizerConfig.qsgd_inf(4, 256)).plan(model)
    a, b = (LevelAdapter(plan, cfg, message_bits=fixed_message_bits) for _ in range(2))
    for ad in (a, b):
        ad.observe(0, _loud(0, model, "b.weight"))
        ad.refit(0)
    assert a.plan.fingerprint() == b.plan.fingerprint()  # the same statistics give the same plan
    before = dict(a.widths)
    assert before["b.weight"] > before["d.weight"]
    a.observe(1, _loud(1, model, "d.weight"))  # not an observation step: ignored
    assert a.refit(1) is None and a.widths == before
    for ad in (a, b):
        ad.observe(2, _loud(2, model, "d.weight"))
    pa, pb = a.refit(2), b.refit(2)
    assert pa is not None and pb is not None and pa.fingerprint() == pb.fingerprint()
    assert a.widths["d.weight"] > a.widths["b.weight"]  # the widths followed
    assert (a.fits, a.reallocations) == (1, 1)  # a re-allocation, not a re-fit
    shared = {(t, b_): lv for (t, b_), lv in a.allocation.type_levels.items()}
    assert all(a.plan.configs[t].levels == shared[t.rsplit("/", 1)[0], a.plan.configs[t].bits] for t in a.plan.types)
    a.observe(4, _loud(4, model, "d.weight"))
    assert a.refit(4) is None and a.reallocations == 1  # the same widths: no new plan
    # a checkpoint mid-follow: the restored adapter decides exactly as the original one
    c = LevelAdapter(plan, cfg, message_bits=fixed_message_bits)
    c.load_state_dict(a.state_dict())
    for ad in (a, c):
        ad.observe(10, _loud(10, model, "a.weight"))
    pa, pc = a.refit(10), c.refit(10)
    assert pa is not None and pc is not None and pa.fingerprint() == pc.fingerprint()
    assert a.state_dict()["type_levels"] == c.state_dict()["type_levels"] and c.reallocations == 2


def test_guard_keeps_uniform_widths_until_two_observations_agree_and_resumes():
    """``AdaptConfig.guard``: a width change is adopted only when it beats the uniform widths (same
    levels) on the current and the previous decision's statistics; a checkpoint holds the previous
    statistics, so a restored adapter guards exactly as the original; no guard follows at once."""
    from qoda.quant.allocation import predicted_variance

    model = Net()
    plan = LayerPolicy.by_module_class(QuantizerConfig.qsgd_inf(4, 256)).plan(model)
    budget = fixed_message_bits(plan) / sum(p.numel() for p in model.parameters()) + 1e-3  # uniform 4 bits fits
    cfg = AdaptConfig(method="amq", schedule=RefitSchedule((0,), every=1000), bins=256, allocation="dp",
                      budget=budget, follow=10, follow_every=2)  # fmt: skip
    uniform = {e.name: 4 for e in plan.entries if e.type_name is not None}
    guarded, free = (LevelAdapter(plan, c, message_bits=fixed_message_bits) for c in (cfg, replace(cfg, guard=None)))
    for ad in (guarded, free):
        ad.observe(0, _loud(0, model, "b.weight"))
        ad.refit(0)  # no previous decision: the current statistics alone
        assert ad.widths["b.weight"] > 4
        ad.observe(2, _loud(2, model, "d.weight"))
        ad.refit(2)
    assert free.widths["d.weight"] > free.widths["b.weight"]  # no guard: follows one step's statistics
    assert guarded.widths == uniform and guarded.guarded == 1  # young change: the uniform widths
    restored = LevelAdapter(plan, cfg, message_bits=fixed_message_bits)
    restored.load_state_dict(guarded.state_dict())
    assert restored.previous_stats is not None and restored.guarded == 1
    for ad in (guarded, restored):
        ad.observe(4, _loud(4, model, "d.weight"))
        assert ad.refit(4) is not None  # two observations agree: adopted
    assert guarded.widths == restored.widths and guarded.widths["d.weight"] > 4
    assert guarded.plan.fingerprint() == restored.plan.fingerprint()
    stats = guarded.previous_stats
    ref = uniform_plan(plan, 4, guarded.allocation.type_levels)
    assert predicted_variance(guarded.plan, stats) <= predicted_variance(ref, stats)
    with pytest.raises(ValueError, match="guard"):
        AdaptConfig(allocation="dp", budget=4.0, guard=1.0)
