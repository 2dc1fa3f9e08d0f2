"""Compressed collectives across real gloo processes on 127.0.0.1 (2 and 4 ranks)."""

import pickle

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run, values
from netns_check import run_cleanly
from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm.aggregate import AggregationError, Aggregator
from qoda.comm.ddp_hook import QodaHookState, qoda_hook
from qoda.comm.partition import chunk_bounds, chunk_pieces
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerPolicy
from qoda.quant.variance import coordinate_variances, eps_q_config


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)  # 432 weights: uncompressed (< min_numel)
        self.fc1 = nn.Linear(40, 64)
        self.fc2 = nn.Linear(64, 40)


def _policy(bits=4, coding="fixed"):
    return LayerPolicy.by_module_class(
        QuantizerConfig.qsgd(bits, 256, coding=coding), {"linear": QuantizerConfig.nuqsgd(bits, 128, coding=coding)}
    )


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(p.shape, generator=g) * (1 + rank) for p in Tiny().parameters()]


def test_chunking_on_bucket_starts():
    numels = [1000, 10, 300]
    b = chunk_bounds(numels, 128, 4)
    assert b[0] == 0 and b[-1] == 1310 and b == sorted(b)
    starts = {0, 128, 256, 384, 512, 640, 768, 896, 1000, 1010, 1138, 1266, 1310}
    assert set(b) <= starts
    assert chunk_pieces(numels, 896, 1138) == (104, 10, 128)
    assert sum(sum(chunk_pieces(numels, b[c], b[c + 1])) for c in range(4)) == 1310


def _average_worker(rank, world, mode, rounds):
    plan = _policy(4, "entropy" if mode == "two_phase" else "fixed").plan(Tiny())
    agg = Aggregator(plan, mode, seed=7)
    base = _inputs(rank)
    outs = []
    for step in range(rounds):
        ts = [t.clone() for t in base]
        agg.average_(ts, step)
        outs.append(torch.cat([t.reshape(-1) for t in ts]))
    # bitwise identical on every rank
    stacked = torch.stack(outs)
    everyone = [torch.empty_like(stacked) for _ in range(world)]
    dist.all_gather(everyone, stacked)
    assert all(torch.equal(e, stacked) for e in everyone), "ranks disagree"
    return stacked.numpy(), agg.stats.as_dict()


def _phase1_variance(world, coding):
    """Exact variance of (1/K) sum_k Q(x_k) per coordinate, in plan order."""
    plan = _policy(4, coding).plan(Tiny())
    codec = LayerwiseCodec(plan)
    total = torch.zeros(sum(e.numel for e in plan.entries), dtype=torch.float64)
    offsets = np.cumsum([0] + [e.numel for e in plan.entries])
    for r in range(world):
        flats = codec.gather(_inputs(r))
        for g, flat in zip(codec.groups, flats, strict=True):
            if g.config is None:
                continue
            v = coordinate_variances(list(flat.split(list(g.numels))), g.config)
            pos = 0
            for i, n in zip(g.indices, g.numels, strict=True):
                total[offsets[i] : offsets[i] + n] += v[pos : pos + n]
                pos += n
    return (total / world**2).numpy()


@pytest.mark.parametrize(("world", "mode"), [(2, "allgather"), (4, "allgather"), (2, "two_phase"), (4, "two_phase")])
def test_average_identical_everywhere_and_unbiased(world, mode):
    rounds = 150
    res = values(run(_average_worker, world, mode, rounds, timeout=240))
    samples = res[0][0].astype(np.float64)  # (rounds, n): identical on all ranks
    truth = torch.stack([torch.cat([t.reshape(-1) for t in _inputs(r)]) for r in range(world)]).double().mean(0).numpy()
    v1 = _phase1_variance(world, "entropy" if mode == "two_phase" else "fixed")
    mean = samples.mean(0)
    # allgather: exact (one quantization per rank); two-phase adds the re-quantization noise,
    # estimated from the samples
    var = v1 if mode == "allgather" else v1 + samples.var(0, ddof=1)
    exact = var == 0  # uncompressed layers
    assert np.allclose(mean[exact], truth[exact], rtol=1e-6, atol=1e-6)
    z = (mean[~exact] - truth[~exact]) / np.sqrt(var[~exact] / rounds + (1e-6 * np.abs(truth[~exact])) ** 2)
    # ~5k coordinates: P(max |z| > 6) < 1e-5 under the null; mean z^2 is 1 (+- 0.02) with the exact variance
    assert np.abs(z).max() < 6.0
    assert float(np.mean(z**2)) < 1.1
    if mode == "allgather":
        assert float(np.mean(z**2)) > 0.9
    stats = res[0][1]
    assert stats["calls"] == rounds and stats["bytes_sent"] > 0


def _fp_worker(rank, world, modes):
    out = {}
    for mode in modes:
        agg = Aggregator(_policy().plan(Tiny()), mode)
        ts = _inputs(rank)
        agg.average_(ts, 0)
        out[mode] = torch.cat([t.reshape(-1) for t in ts]).numpy()
    return out


def test_uncompressed_modes():
    """fp32 and fp16 (one process group for both)."""
    out = values(run(_fp_worker, 2, ("fp32", "fp16")))
    truth = torch.stack([torch.cat([t.reshape(-1) for t in _inputs(r)]) for r in range(2)]).mean(0).numpy()
    for mode, tol in (("fp32", 1e-6), ("fp16", 2e-3)):
        assert np.array_equal(out[0][mode], out[1][mode]), mode
        assert np.allclose(out[0][mode], truth, rtol=tol, atol=tol), mode


def _bytes_worker(rank, world):
    plan = LayerPolicy.global_(QuantizerConfig.qsgd(4, 1024)).plan(nn.Linear(512, 512, bias=False))
    res = {}
    for mode in ("allgather", "two_phase", "fp32"):
        agg = Aggregator(plan, mode)
        res[mode] = agg.average_([torch.randn(512, 512)], 0).bytes_sent
    return res


def test_two_phase_bytes_do_not_grow_with_workers():
    b2 = values(run(_bytes_worker, 2))[0]
    b4 = values(run(_bytes_worker, 4))[0]
    n = 512 * 512
    one = n * 4 / 8  # one 4-bit vector
    assert b4["allgather"] > 2.5 * b2["allgather"]  # (K-1) payloads
    assert b4["two_phase"] < 1.6 * b2["two_phase"]  # ~2 (K-1)/K payloads
    assert b4["two_phase"] < 2.2 * one
    assert b4["fp32"] == 2 * 3 * n * 4 // 4


def _mismatch_worker(rank, world):
    bits = 4 if rank == 0 else 8
    plan = LayerPolicy.global_(QuantizerConfig.qsgd(bits)).plan(Tiny())
    try:
        Aggregator(plan, "allgather")
    except AggregationError as e:
        return str(e)
    return None


def test_mismatched_settings_raise_on_every_rank():
    msgs = values(run(_mismatch_worker, 2, timeout=60))
    assert all(m is not None and "differ across ranks" in m for m in msgs)


def _corrupt_worker(rank, world, mode):
    plan = _policy().plan(Tiny())
    agg = Aggregator(plan, mode)
    if rank == 1:  # rank 1 sends corrupted bytes
        enc = agg.codec.encode_flats

        def corrupt(*a, **k):
            m = enc(*a, **k)
            m.data[-3] ^= 0x55
            return m

        agg.codec.encode_flats = corrupt
    try:
        agg.average_(_inputs(rank), 0)
    except Exception as e:
        return type(e).__name__ + ": " + str(e)
    return None


@pytest.mark.parametrize("mode", ["allgather", "two_phase"])
def test_corrupted_payload_fails_on_every_rank(mode):
    msgs = values(run(_corrupt_worker, 2, mode, timeout=60))
    assert all(m is not None for m in msgs), msgs
    assert any("corrupted" in m for m in msgs)


# ----------------------------------------------------------------------------- DDP hook
def _regression_data(rank, n=256):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(n, 40, generator=g)
    w = torch.linspace(-1, 1, 40)
    return x, x @ w.unsqueeze(1) + 0.01 * torch.randn(n, 1, generator=g)


class Reg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(40, 64)
        self.out = nn.Linear(64, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def _ddp_worker(rank, world, use_hook, steps, split, adapt=None):
    torch.manual_seed(0)
    model = Reg()
    ddp = nn.parallel.DistributedDataParallel(model)
    state = None
    if use_hook:
        bits = 8 if adapt is None else 4
        policy = LayerPolicy.global_(QuantizerConfig.qsgd(bits, 256), min_numel=64)
        state = QodaHookState(model, policy, mode="two_phase", start_iter=2, adapt=adapt)  # adapt None: fixed levels
        ddp.register_comm_hook(state, qoda_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    x, y = _regression_data(rank)
    losses = []
    for step in range(steps):
        if use_hook and step == split:  # checkpoint the hook state and restore it
            blob = pickle.dumps(state)
            restored = pickle.loads(blob)
            assert restored.process_group is None and restored.iter == state.iter
            restored.bind(model)
            state.__dict__.update(restored.__dict__)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grad_norm2 = max(float(sum(p.grad.square().sum() for p in model.parameters())), 1e-12)
    fits = state.state_dict()["adapter"]["fits"] if state and state.adapt else 0
    return losses, params.numpy(), grad_norm2, (state.stats.as_dict() if state else None), fits


def _ddp_runs(rank, world, runs):
    """Several :func:`_ddp_worker` runs in turn in one process group (each builds its own DDP model)."""
    return [_ddp_worker(rank, world, *args) for args in runs]


def _per_run(results):
    """``[[run_0 of rank 0, rank 1], [run_1 of rank 0, rank 1], ...]`` from :func:`_ddp_runs`' values."""
    return [list(r) for r in zip(*values(results), strict=True)]


def test_ddp_hook_trains_like_the_uncompressed_reference():
    steps = 60
    ref, q = _per_run(run(_ddp_runs, 2, [(False, steps, -1), (True, steps, 30)], timeout=240))
    assert np.array_equal(q[0][1], q[1][1])  # replicas stay identical
    ref_loss, q_loss = ref[0][0][-1], q[0][0][-1]
    assert q_loss < 0.5 * q[0][0][0]  # it trains
    # Descent-lemma noise budget: each step adds at most (lr^2 L / 2) E||n||^2 to the expected
    # loss with E||n||^2 <= 2 eps_Q ||g||^2 (two quantizations); L <= 2 for this MSE on
    # normalised inputs is loose, so we allow L = 10.
    eps = eps_q_config(QuantizerConfig.qsgd(8, 256))
    g2 = max(max(r[2] for r in ref), 1.0)
    budget = steps * 0.05**2 * 10 / 2 * 2 * eps * g2
    assert q_loss <= ref_loss + budget + 1e-4
    assert q[0][3]["calls"] > 0 and q[0][3]["bytes_sent"] > 0


def test_ddp_hook_with_adaptive_levels_resumes_identically():
    from qoda.quant.adapt import AdaptConfig, RefitSchedule

    adapt = AdaptConfig(schedule=RefitSchedule((0, 20), every=20), observe_every=2)
    straight, resumed = _per_run(run(_ddp_runs, 2, [(True, 40, -1, adapt), (True, 40, 25, adapt)], timeout=240))
    assert np.array_equal(straight[0][1], straight[1][1])
    assert np.array_equal(straight[0][1], resumed[0][1])  # checkpointed adapter + hook state: same run
    assert straight[0][0][-1] < 0.5 * straight[0][0][0]
    assert straight[0][4] == 2 and resumed[0][4] == 2  # fitted at the first compressed step and at 20


def test_bandwidth_benchmark_runs_in_its_own_namespaces_and_cleans_up():
    from qoda.bench.comm import run_comm_bench

    res = run_cleanly(
        lambda: run_comm_bench(
            workers=(2,), rates_mbit=(100,), sizes=(1 << 18,), steps=1, max_seconds=120, log=lambda s: None
        )
    )
    assert not res["skipped"], res["skipped"]
    rows = {(r["mode"], r["bits"]): r for r in res["rows"]}
    assert len(rows) == 10
    fp32, q4 = rows[("fp32", 32)], rows[("two_phase", 4)]
    assert rows[("compute_only", 0)]["bytes_per_rank"] == 0
    assert fp32["bytes_per_rank"] == 4 * (1 << 18)  # 2 (K-1)/K * 4n with K = 2
    assert q4["bytes_per_rank"] < fp32["bytes_per_rank"] / 4
    # the link is really limited: fp32 needs its bytes / bandwidth, less what the tbf burst
    # (10 ms of traffic) lets through at once
    assert fp32["seconds"] >= fp32["bytes_per_rank"] * 8 / 100e6 - 0.012


def _nan_worker(rank, world, mode):
    plan = _policy().plan(Tiny())
    agg = Aggregator(plan, mode)
    ts = _inputs(rank)
    if rank == 1:
        ts[2][0, 0] = float("nan")
    try:
        agg.average_(ts, 0)
    except AggregationError as e:
        return str(e)
    return None


@pytest.mark.parametrize("mode", ["allgather", "two_phase"])
def test_non_finite_gradient_on_one_rank_fails_everywhere_without_hanging(mode):
    msgs = values(run(_nan_worker, 2, mode, timeout=60, pg_timeout=30))
    assert msgs[1] is not None and "NaN or Inf" in msgs[1]
    # the failure travels in rank 1's payload (wire format 2): rank 0 names the origin and its reason
    assert msgs[0] is not None and "rank 1 could not encode" in msgs[0] and "NaN or Inf" in msgs[0], msgs


def _adapt_worker(rank, world):
    from qoda.comm.aggregate import allreduce_sum
    from qoda.quant.adapt import AdaptConfig, LevelAdapter, RefitSchedule

    plan = _policy().plan(Tiny())
    adapter = LevelAdapter(plan, AdaptConfig(schedule=RefitSchedule((0,), every=1000)), reduce=allreduce_sum())
    grads = _inputs(rank)
    adapter.observe(0, grads)
    new_plan = adapter.refit(0)
    agg = Aggregator(new_plan, "allgather")  # consistency check passes only if the levels agree
    agg.average_(grads, 0)
    return new_plan.fingerprint()


def test_adapted_levels_agree_across_processes():
    prints = values(run(_adapt_worker, 2, timeout=90))
    assert prints[0] == prints[1] and "fitted" not in prints[0]  # the fingerprint holds level-set ids


# ----------------------------------------------------------------------------- DDP hook: overlap, binding, errors
class Deep(nn.Module):
    """Three linear layers: several DDP buckets with ``bucket_cap_mb=0.1``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 256)
        self.fc2 = nn.Linear(256, 256)
        self.out = nn.Linear(256, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _hook_run(rank, mode, coding, overlap, bound=True, steps=5, nan_at=None, **state_kw):
    """Params after every step (start_iter=2: two fp32 warm-up steps, then quantized), or the error."""
    torch.manual_seed(0)
    model = Deep()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.1)
    policy = LayerPolicy.global_(QuantizerConfig.qsgd(4, 256, coding=coding), min_numel=64)
    state_kw.setdefault("adapt", None)  # fixed levels (the default adapts them)
    state = QodaHookState(policy=policy, mode=mode, start_iter=2, seed=3, overlap=overlap, **state_kw)
    if bound:
        state.register(ddp)
    else:  # built without the model, registered the plain PyTorch way: binds itself to the buckets
        ddp.register_comm_hook(state, qoda_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    x, y = _regression_data(rank, 64)
    traj = []
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        if step == nan_at and rank == 1:
            loss = loss * float("nan")
        try:
            loss.backward()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        opt.step()
        traj.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy())
    return np.stack(traj), state.stats.as_dict(), len(state._aggregators), state.bound


def _error_of(fn):
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _hook_suite_worker(rank, world):
    import io

    from qoda.quant.adapt import AdaptConfig

    res = {}
    for mode, coding in [(m, c) for m in ("allgather", "two_phase") for c in ("fixed", "entropy")]:
        bound = mode == "two_phase"  # allgather: states built without the model, bound to the buckets
        sync = _hook_run(rank, mode, coding, overlap=False, bound=bound)
        over = _hook_run(rank, mode, coding, overlap=True, bound=bound)
        res[mode, coding] = (sync, over)
    for mode in ("allgather", "two_phase"):
        res["nan", mode] = _hook_run(rank, mode, "fixed", overlap=True, nan_at=3)
        # adaptive levels observe the gradients before encoding them: a NaN there must fail collectively too
        res["nan observed", mode] = _hook_run(
            rank, mode, "fixed", overlap=True, nan_at=3, adapt=AdaptConfig(observe_every=1)
        )
        if rank == 1:  # rank 1 sends damaged bytes once compressing (phase 1 in two-phase mode)
            enc = LayerwiseCodec.encode_flats

            def corrupt(self, *a, enc=enc, **k):
                m = enc(self, *a, **k)
                if k.get("tag", 0) <= world:  # allgather message or phase-1 chunk
                    m.data[-3] ^= 0x55
                return m

            LayerwiseCodec.encode_flats = corrupt
        try:
            res["corrupt", mode] = _hook_run(rank, mode, "fixed", overlap=True)
        finally:
            if rank == 1:
                LayerwiseCodec.encode_flats = enc
    # settings that differ across ranks: every rank raises at the first hook call
    res["mismatch"] = _hook_run(rank, "allgather", "fixed", overlap=(rank == 0))
    # a name-dependent policy without a model binding; a state bound to another model
    unbound = QodaHookState(policy=LayerPolicy.by_module_class(QuantizerConfig.qsgd(4)))

    def train_once(state, ddp):
        ddp.register_comm_hook(state, qoda_hook)
        ddp(torch.randn(4, 40)).sum().backward()

    res["unbound"] = _error_of(lambda: train_once(unbound, nn.parallel.DistributedDataParallel(Deep())))
    other = QodaHookState(Deep(), LayerPolicy.global_(QuantizerConfig.qsgd(4)))
    res["other_model"] = _error_of(lambda: train_once(other, nn.parallel.DistributedDataParallel(Deep())))
    # state_dict: loadable with weights_only=True, restores counters and fitted levels
    torch.manual_seed(0)
    model = Deep()
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.1)
    state = QodaHookState(model, LayerPolicy.global_(QuantizerConfig.qsgd(4, 256)), mode="allgather", start_iter=1,
                          adapt=AdaptConfig(observe_every=1))  # fmt: skip
    ddp.register_comm_hook(state, qoda_hook)
    for _ in range(3):
        ddp(torch.randn(8, 40)).sum().backward()
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    fresh = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4, 256)), mode="allgather", start_iter=1,
                          adapt=AdaptConfig(observe_every=1))  # fmt: skip
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    levels = fresh.adapter_state["levels"]
    live = state.summary()["parameters"]
    same = all(tuple(levels[p["type"]]) == p["levels"] for p in live.values() if p["type"] is not None)
    res["state_dict"] = (fresh.iter, fresh.stats.calls == state.stats.calls > 0, same and bool(levels))
    res["wrong_settings"] = _error_of(lambda: QodaHookState(mode="two_phase").load_state_dict(state.state_dict()))
    return res


@pytest.fixture(scope="module")
def hook_suite():
    return values(run(_hook_suite_worker, 2, timeout=150, pg_timeout=30))


@pytest.mark.parametrize(("mode", "coding"), [("allgather", "fixed"), ("allgather", "entropy"),
                                              ("two_phase", "fixed"), ("two_phase", "entropy")])  # fmt: skip
def test_overlapping_hook_equals_the_synchronous_one_bit_for_bit(hook_suite, mode, coding):
    for rank_res in hook_suite:
        sync, over = rank_res[mode, coding]
        assert not isinstance(sync, str) and not isinstance(over, str), (sync, over)
        # fp32 warm-up steps 0-1, then quantized steps 2-4 with the same seeds: identical trajectories
        assert np.array_equal(sync[0], over[0])
        assert sync[2] >= 2 and over[2] == sync[2]  # several buckets: overlap across buckets happened
        assert over[1]["calls"] == sync[1]["calls"] == 3 * sync[2]
        assert over[1]["bytes_sent"] > 0
        assert over[1]["bytes_sent"] == sync[1]["bytes_sent"]  # one protocol (qoda.comm.protocol)
    assert np.array_equal(hook_suite[0][mode, coding][1][0], hook_suite[1][mode, coding][1][0])  # ranks agree
    if mode == "allgather":  # built without the model: bound itself to the buckets (global policy)
        assert hook_suite[0][mode, coding][1][3] is False


@pytest.mark.parametrize("observed", [False, True], ids=["fixed levels", "adaptive, observation step"])
@pytest.mark.parametrize("mode", ["allgather", "two_phase"])
def test_overlapping_hook_fails_every_rank_on_a_nan(hook_suite, mode, observed):
    msgs = [r["nan observed" if observed else "nan", mode] for r in hook_suite]
    assert isinstance(msgs[1], str) and "NaN or Inf" in msgs[1], msgs
    # the failure travels in rank 1's payload: rank 0 names it and its reason
    assert isinstance(msgs[0], str) and "rank 1 could not encode" in msgs[0] and "NaN or Inf" in msgs[0], msgs


@pytest.mark.parametrize("mode", ["allgather", "two_phase"])
def test_overlapping_hook_fails_every_rank_on_a_damaged_payload(hook_suite, mode):
    msgs = [r["corrupt", mode] for r in hook_suite]
    assert all(isinstance(m, str) and "AggregationError" in m for m in msgs), msgs
    assert any("corrupted" in m for m in msgs), msgs


def test_hook_misuse_fails_every_rank_clearly(hook_suite):
    for r in hook_suite:
        assert isinstance(r["mismatch"], str) and "differ across ranks: overlap" in r["mismatch"], r["mismatch"]
        assert r["unbound"] is not None and "state.bind(model)" in r["unbound"]
        assert r["other_model"] is not None and "not in the model bound" in r["other_model"]
        assert r["state_dict"] == (3, True, True)
        assert r["wrong_settings"] is not None and "other settings (mode" in r["wrong_settings"]


HOOK_VARIANTS = (("two_phase", 100), ("allgather", 100), ("fp32", 0))


def _ddp_grads(rank, world):
    """Gradients of 3 backward passes (different data per rank): plain DDP, then the qoda hook in
    warm-up (start_iter beyond the run) and in fp32 mode, each on a fresh DDP model."""
    x, y = _regression_data(rank)
    out = {}
    for variant in (None, *HOOK_VARIANTS):
        torch.manual_seed(0)
        model = Reg()
        ddp = nn.parallel.DistributedDataParallel(model)
        if variant is not None:
            policy = LayerPolicy.global_(QuantizerConfig.qsgd(4, 256), min_numel=64)
            state = QodaHookState(model, policy, mode=variant[0], start_iter=variant[1], adapt=None)
            ddp.register_comm_hook(state, qoda_hook)
        grads = []
        for step in range(3):
            ddp.zero_grad()
            nn.functional.mse_loss(ddp(x[step::3]), y[step::3]).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
        out[variant] = grads
    return out


def test_ddp_hook_in_warm_up_and_fp32_mode_averages_like_allreduce():
    """As PyTorch's own hook tests check: before compression starts (warm-up) and in fp32 mode the
    hook's averaged gradients equal plain DDP's all-reduce average (to float32 summation order)."""
    res = values(run(_ddp_grads, 2, timeout=120))
    for r in range(2):
        for variant in HOOK_VARIANTS:
            for a, b in zip(res[r][None], res[r][variant], strict=True):
                np.testing.assert_allclose(b, a, rtol=2e-6, atol=1e-7, err_msg=str(variant))
            assert np.array_equal(res[0][variant][-1], res[1][variant][-1])  # identical on every rank


def test_optimizer_with_parameters_in_another_order_than_the_plan_names_the_tensor_passed():
    """create_optimizer(..., averager=Aggregator(plan)) given the critic's parameters first: the
    error names the tensor actually passed (by its shape) and the entry the plan expects there."""
    from qoda.optim import create_optimizer

    G, D = torch.nn.Sequential(torch.nn.Linear(16, 32)), torch.nn.Sequential(torch.nn.Linear(32, 4))
    plan = LayerPolicy.per_layer(QuantizerConfig.qsgd(4)).plan(torch.nn.ModuleDict({"G": G, "D": D}))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        opt = create_optimizer("qoda", [{"params": list(D.parameters())}, {"params": list(G.parameters())}],
                               averager=Aggregator(plan), lr=1e-3)  # fmt: skip
        D(G(torch.randn(8, 16))).sum().backward()
        with pytest.raises(ValueError) as e:
            opt.step()
    finally:
        dist.destroy_process_group()
    assert str(e.value).startswith("tensors: tensor 0 has shape (4, 32) (128 elements), the shape of D.0.weight, "
                                   "where the plan has G.0.weight"), str(e.value)  # fmt: skip
