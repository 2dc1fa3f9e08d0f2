"""End-to-end benchmark, the scaling model's arithmetic, and the baseline averagers.

No wall-clock assertions: the model is checked against hand-computed alpha-beta sums, the
benchmark against its own bookkeeping (rows, ratios, namespaces removed).
"""

import json
import math

import numpy as np
import pytest
import torch

from distributed import run, values
from netns_check import run_cleanly
from qoda.bench import scaling
from qoda.bench.e2e import (
    CONFIG_NAMES,
    add_ratios,
    calls_of,
    compute_bound_of,
    fmt_spread,
    format_e2e,
    quartiles,
    round_orders,
    round_ratios,
    steps_per_round,
    summarise,
)
from qoda.bench.scaling import MTU_GOODPUT, Network, Workload, exchange_seconds, step_seconds
from qoda.comm import cost

W = Workload(
    parameters=1_000_000,
    message_bytes={"qoda_lw4": 520_000.0, "qgenx_8bit": 1_010_000.0, "qoda_lw4_entropy": 400_000.0},
    powersgd_floats=30_000.0,
    encode_gbps=4.0,
    decode_gbps=8.0,
    codec_gbps={"qoda_lw4_entropy": (1.0, 2.0)},
    powersgd_overhead_seconds=0.004,
)
ENTROPY_CODEC = {"coding": "entropy", "bits": 4, "encode_gbps": 1.0, "decode_gbps": 2.0}
NET = Network(alpha=1e-4, beta=10e6)


def test_network_goodput_is_rate_times_tcp_framing():
    net = Network.of(100, 2e-5)
    assert net.beta == pytest.approx(100e6 / 8 * 1448 / 1538)
    assert pytest.approx(0.94148, abs=1e-5) == MTU_GOODPUT


@pytest.mark.parametrize("k", [2, 4, 12])
def test_exchange_times_are_the_alpha_beta_sums(k):
    """Bytes and codec terms by hand; the latency terms are the protocol's (qoda.comm.cost)."""
    n, a, b = 1_000_000, 1e-4, 10e6
    enc, dec = 4 * n / 4e9, 4 * n / 8e9
    ring = 2 * (k - 1) / k
    assert exchange_seconds("fp32", k, NET, W) == pytest.approx(2 * (k - 1) * a + ring * 4 * n / b)
    assert exchange_seconds("fp16", k, NET, W) == pytest.approx(2 * (k - 1) * a + ring * 2 * n / b)
    # PowerSGD: three all-reduces plus its measured overhead (compression compute, serialisation)
    assert exchange_seconds("powersgd", k, NET, W) == pytest.approx(6 * (k - 1) * a + ring * 4 * 30_000 / b + 0.004)
    m = 520_000
    lat_ag, lat_tp = cost.allgather(k, m).latency_terms, cost.two_phase(k, [m / k] * k).latency_terms
    assert exchange_seconds("allgather:qoda_lw4", k, NET, W) == pytest.approx(
        lat_ag * a + (k - 1) * m / b + enc + k * dec
    )
    assert exchange_seconds("two_phase:qoda_lw4", k, NET, W) == pytest.approx(
        lat_tp * a + ring * m / b + (1 + 1 / k) * enc + 2 * dec
    )
    # entropy coding: its own message and codec speed, sizes exchanged first (sized: more latency terms)
    me, ee, de = 400_000, 4 * n / 1e9, 4 * n / 2e9
    ag = cost.allgather(k, me, sized=True)
    assert ag.latency_terms > cost.allgather(k, me).latency_terms
    assert exchange_seconds("allgather:qoda_lw4_entropy", k, NET, W) == pytest.approx(
        ag.latency_terms * a + (k - 1) * me / b + ee + k * de
    )
    tp = cost.two_phase(k, [me / k] * k, sized=True)
    assert exchange_seconds("two_phase:qoda_lw4_entropy", k, NET, W) == pytest.approx(
        tp.latency_terms * a + ring * me / b + (1 + 1 / k) * ee + 2 * de
    )
    assert exchange_seconds("fp32", 1, NET, W) == 0.0
    with pytest.raises(ValueError, match="kind"):
        exchange_seconds("carrier_pigeon", k, NET, W)


def test_step_adds_compute_exchanges_and_finite_checks():
    k, c = 4, 0.2
    one = step_seconds("qoda_lw4_two_phase", k, NET, W, c)
    assert one == pytest.approx(c + exchange_seconds("two_phase:qoda_lw4", k, NET, W) + 2 * (k - 1) * 1e-4)
    two = step_seconds("extragradient_fp32", k, NET, W, c)  # two exchanges, two checks
    assert two == pytest.approx(c + 2 * exchange_seconds("fp32", k, NET, W) + 2 * 2 * (k - 1) * 1e-4)
    # allgather's bytes grow with K, two-phase's do not: two-phase wins at scale on a slow link
    slow = Network(1e-5, 1e6)
    assert step_seconds("qoda_lw4_allgather", 64, slow, W, c) > step_seconds("qoda_lw4_two_phase", 64, slow, W, c)


def _synthetic_e2e(k_values=(2, 4), rates=(1000.0, 100.0), alpha=5e-5, compute=0.25):
    """e2e rows whose step times are exactly the model's: validation must give 0 error."""
    rows = []
    for k in k_values:
        for rate in rates:
            net = Network.of(rate, alpha)
            lat = 2 * (k - 1) * alpha
            common = dict(workers=k, bandwidth_mbit=rate, allreduce_latency_seconds=lat, parameters=W.parameters,
                          batch_per_worker=64, payload_bits_per_exchange=32 * W.powersgd_floats,
                          encode_seconds=0.0, comm_seconds=0.0, decode_seconds=0.0)  # fmt: skip
            for name, c in (("compute_only", compute), ("compute_only_2call", 2 * compute)):
                rows.append(dict(common, config=name, step_seconds=c, bytes_sent_per_exchange=0))
            for name in scaling.MODELLED:
                kind = scaling.MODELLED[name]
                c = 2 * compute if calls_of(name) == 2 else compute
                key = kind.partition(":")[2]
                m = W.message_bytes.get(key, 0.0)
                sent = cost.allgather(k, m, sized=scaling.is_entropy(key)).bytes_sent
                row = dict(common, config=name, step_seconds=step_seconds(name, k, net, W, c),
                           bytes_sent_per_exchange=sent)  # fmt: skip
                if name == "powersgd":  # the hook's time: its all-reduces and the overhead
                    row["comm_seconds"] = cost.powersgd(k, W.powersgd_floats).seconds(alpha, net.beta) + 0.004
                rows.append(row)
    return {"rows": rows}


def test_validation_recovers_a_self_consistent_measurement(tmp_path):
    e2e = _synthetic_e2e()
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    codec = {"encode_gbps": W.encode_gbps, "decode_gbps": W.decode_gbps, "rows": [ENTROPY_CODEC]}
    (tmp_path / "codec.json").write_text(json.dumps(codec))
    res = scaling.run_scaling(tmp_path / "e2e.json", tmp_path / "codec.json")
    assert res["inputs"]["message_bytes"] == pytest.approx(W.message_bytes)
    assert res["inputs"]["powersgd_overhead_seconds"] == pytest.approx(0.004)
    assert res["inputs"]["entropy_encode_gbps"] == 1.0  # no 2-worker codec clocks: the codec bench's row
    assert res["rows_validated"] == 2 * 2 * len(scaling.MODELLED)
    assert res["max_abs_error"] == pytest.approx(0.0, abs=1e-12)
    assert res["inputs"]["alpha_seconds"] == pytest.approx(5e-5)
    # strong scaling: compute per worker falls as 1/K from the 4-worker global batch
    strong = {(r["workers"], r["bandwidth_gbit"]): r for r in res["predictions"] if r["regime"] == "strong"}
    assert strong[(16, 1.0)]["compute_seconds"] == pytest.approx(0.25 * 4 / 16)
    weak = {(r["workers"], r["bandwidth_gbit"]): r for r in res["predictions"] if r["regime"] == "weak"}
    assert weak[(16, 1.0)]["compute_seconds"] == pytest.approx(0.25)
    # less bandwidth, more speed-up; and the table holds every published worker count
    assert weak[(8, 1.0)]["qoda_speedup_vs_fp32"] > weak[(8, 100.0)]["qoda_speedup_vs_fp32"] > 0.9
    assert [p["workers"] for p in res["paper"]] == [4, 8, 12, 16]
    assert all(p["model_strong_1gbit_entropy"] > 0 for p in res["paper"])
    text = scaling.format_scaling(res)
    assert "| 4 |" in text and "entropy-coded QODA" in text and "Where the paper stands" in text
    pw = res["paper_workload"]
    assert pw["parameters"] == 1_154_947 + 1_053_825 and len(pw["rows"]) == 4


def test_scaling_names_missing_inputs(tmp_path):
    with pytest.raises(scaling.ScalingInputError, match="e2e: .* not found"):
        scaling.run_scaling(tmp_path / "nope.json", tmp_path / "codec.json")
    (tmp_path / "e2e.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "codec.json").write_text("{}")
    with pytest.raises(scaling.ScalingInputError, match="no fp32 rows"):
        scaling.run_scaling(tmp_path / "e2e.json", tmp_path / "codec.json")


def test_ratios_use_the_bound_of_each_family():
    rows = [
        dict(config=c, workers=4, bandwidth_mbit=100.0, step_seconds=s, compute_seconds=cs, optimizer=o, compression=z)
        for c, s, cs, o, z in [
            ("compute_only", 0.2, 0.2, "qoda", "compute_only"),
            ("compute_only_2call", 0.4, 0.4, "extra_adam", "compute_only"),
            ("fp32", 0.6, 0.2, "adam", "none"),
            ("qoda_lw4_two_phase", 0.24, 0.2, "qoda", "layerwise_adaptive"),
            ("extragradient_fp32", 1.2, 0.4, "extra_adam", "none"),
        ]
    ]
    add_ratios(rows, {("qoda", "layerwise_adaptive"): 1125})
    r = {x["config"]: x for x in rows}
    assert r["qoda_lw4_two_phase"]["speedup_vs_fp32"] == pytest.approx(2.5)
    assert r["qoda_lw4_two_phase"]["ratio_to_compute_only"] == pytest.approx(1.2)
    assert r["extragradient_fp32"]["compute_only_seconds"] == 0.4  # two-call bound
    assert r["extragradient_fp32"]["ratio_to_compute_only"] == pytest.approx(3.0)
    assert r["qoda_lw4_two_phase"]["seconds_to_target_fid"] == pytest.approx(1125 * 0.24)
    assert r["fp32"]["seconds_to_target_fid"] is None  # no quality run of Adam
    assert compute_bound_of("qgenx_8bit") == "compute_only_2call" and compute_bound_of("fp16") == "compute_only"


def test_e2e_bench_runs_in_its_own_namespaces_and_cleans_up():
    from qoda.bench.e2e import run_e2e_bench

    kw = dict(workers=(2,), rates_mbit=(100.0,), configs=("qoda_lw4_two_phase",), steps=1, warmup=0, batch=4)
    res = run_cleanly(lambda: run_e2e_bench(**kw, max_seconds=240, quality=None, log=lambda s: None))
    assert not res["skipped"], res["skipped"]
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {"compute_only", "fp32", "qoda_lw4_two_phase"}  # reference rows added
    q = rows["qoda_lw4_two_phase"]
    for key in ("config", "workers", "bandwidth_mbit", "step_seconds", "compute_only_seconds", "speedup_vs_fp32"):
        assert q[key] is not None, key
    assert q["workers"] == 2 and q["bandwidth_mbit"] == 100.0 and q["exchanges_per_step"] == 1
    assert q["speedup_vs_fp32"] == pytest.approx(rows["fp32"]["step_seconds"] / q["step_seconds"])
    assert rows["compute_only"]["bytes_sent_per_exchange"] == 0 and rows["compute_only"]["exchanges_per_step"] == 0
    assert q["bytes_sent_per_exchange"] < rows["fp32"]["bytes_sent_per_exchange"] / 5  # 4-bit vs 32-bit


def test_unknown_e2e_config_is_named():
    from qoda.bench.e2e import run_e2e_bench

    with pytest.raises(ValueError, match="configs: unknown"):
        run_e2e_bench(configs=("fp64",))
    assert "qoda_lw4_allgather" in CONFIG_NAMES


# ---------------------------------------------------------------------------- baselines
def _powersgd_worker(rank, world, steps):
    from qoda.comm.baselines import PowerSGDAverager

    g = torch.Generator().manual_seed(rank)
    shapes = [torch.Size([64, 32]), torch.Size([32])]
    avg = PowerSGDAverager(shapes, rank=1, start_iter=2, seed=0)
    out = []
    for step in range(steps):
        ts = [torch.randn(s, generator=g) for s in shapes]
        mine = [t.clone() for t in ts]
        avg.average_(ts, step)
        out.append(([t.numpy().copy() for t in ts], [m.numpy() for m in mine]))
    return out, avg.stats.as_dict(), avg.compressed_floats


def test_powersgd_averager_runs_pytorchs_hook_across_processes():
    (r0, st0, floats), (r1, _, _) = values(run(_powersgd_worker, 2, 4, timeout=120))
    assert floats == (64 + 32) * 1 + 32  # P and Q of the matrix, the vector whole
    for step in range(4):
        (avg0, mine0), (avg1, mine1) = r0[step], r1[step]
        for a, b in zip(avg0, avg1, strict=True):
            np.testing.assert_array_equal(a, b)  # every rank gets the same result
        mean = [(x + y) / 2 for x, y in zip(mine0, mine1, strict=True)]
        np.testing.assert_allclose(avg0[1], mean[1], rtol=1e-6, atol=1e-6)  # vectors: exact all-reduce
        if step < 2:  # plain all-reduce before start_iter
            np.testing.assert_allclose(avg0[0], mean[0], rtol=1e-6, atol=1e-6)
        else:  # rank-1 approximation of the (error-corrected) mean: rank 1, not the mean
            assert np.linalg.matrix_rank(avg0[0], tol=1e-4 * np.abs(avg0[0]).max()) == 1
    assert st0["calls"] == 4 and st0["payload_bits"] == 32 * (2 * (64 * 32 + 32) + 2 * floats)


def test_powersgd_config_errors_name_the_field():
    from qoda.train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="powersgd_start_iter"):
        TrainConfig(compression="powersgd", powersgd_start_iter=1)
    with pytest.raises(ConfigError, match="powersgd_rank"):
        TrainConfig(compression="powersgd", powersgd_rank=0)
    assert math.isfinite(TrainConfig(compression="powersgd").powersgd_rank)


def test_codec_time_scales_with_the_cpu_share():
    from dataclasses import replace

    k = 4
    full, half = (
        exchange_seconds("two_phase:qoda_lw4", k, NET, W),
        exchange_seconds("two_phase:qoda_lw4", k, NET, replace(W, cpu_share=0.5)),
    )
    codec = (1 + 1 / k) * 4e6 / 4e9 + 2 * 4e6 / 8e9  # E(n)(1 + 1/K) + 2 D(n) at full speed
    assert half - full == pytest.approx(codec)  # twice the codec time, the network part unchanged
    # the effective codec speed comes from the 2-worker allgather rows when they exist
    e2e = _synthetic_e2e()
    for r in e2e["rows"]:
        if r["config"] == "qoda_lw4_allgather" and r["workers"] == 2:
            r.update(encode_seconds=0.004, decode_seconds=0.002)
    w = scaling.workload_from(e2e, {"encode_gbps": 99.0, "decode_gbps": 99.0, "rows": [ENTROPY_CODEC]})
    assert w.encode_gbps == pytest.approx(4e6 / 0.004 / 1e9) and w.decode_gbps == pytest.approx(8e6 / 0.002 / 1e9)
    # PowerSGD's overhead is divided by the CPU share too
    ps = exchange_seconds("powersgd", k, NET, replace(W, cpu_share=0.5)) - exchange_seconds("powersgd", k, NET, W)
    assert ps == pytest.approx(0.004)


# ---------------------------------------------------------------------------- interleaved rounds
def test_rounds_interleave_and_rotate_the_configurations():
    orders = round_orders(["a", "b", "c"], 4)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    for r in orders:  # every round times every configuration once
        assert sorted(r) == ["a", "b", "c"]
    for pos in range(3):  # over 3 rounds each configuration takes each position once
        assert sorted(o[pos] for o in orders[:3]) == ["a", "b", "c"]
    assert steps_per_round(30, 6) == 5 and steps_per_round(10, 3) == 4 and steps_per_round(1, 1) == 1


def test_quartiles_and_summaries_match_numpy():
    xs = [0.31, 0.29, 0.52, 0.30, 0.33, 0.28, 0.35]
    q1, med, q3 = quartiles(xs)
    assert (q1, med, q3) == pytest.approx(tuple(np.percentile(xs, [25, 50, 75])))
    s = summarise([1.0, 2.0, 3.0, 4.0])
    assert s == {"median": 2.5, "iqr": [1.75, 3.25], "range": [1.0, 4.0], "n": 4}
    assert summarise([2.0]) == {"median": 2.0, "iqr": [2.0, 2.0], "range": [2.0, 2.0], "n": 1}
    assert round_ratios([2.0, 3.0, 4.0], [1.0, 2.0]) == [2.0, 1.5]  # a stopped run: the rounds both have
    with pytest.raises(ValueError, match="empty"):
        quartiles([])


def _rounds_row(config, rounds, optimizer="adam", compression="none", compute=0.1):
    return dict(config=config, workers=4, bandwidth_mbit=100.0, round_step_seconds=rounds,
                step_seconds=float(np.median(rounds)), compute_seconds=compute, optimizer=optimizer,
                compression=compression)  # fmt: skip


def test_ratios_are_per_round_then_summarised():
    drift = [1.0, 1.3, 0.8, 1.5, 1.1]  # the machine's speed per round: hits every configuration alike
    noise = [1, 1.1, 0.9, 1, 1.2]  # QODA's own variation
    rows = [
        _rounds_row("compute_only", [0.2 * d for d in drift], "qoda", "compute_only"),
        _rounds_row("fp32", [0.6 * d for d in drift]),
        _rounds_row("powersgd", [0.3 * d for d in drift], compression="powersgd"),
        _rounds_row("qoda_lw4_two_phase", [0.24 * d * f for d, f in zip(drift, noise, strict=True)],
                    "qoda", "layerwise_adaptive"),
    ]  # fmt: skip
    add_ratios(rows)
    r = {x["config"]: x for x in rows}
    q = r["qoda_lw4_two_phase"]
    per = [2.5 / f for f in [1, 1.1, 0.9, 1, 1.2]]  # fp32 / qoda per round: the drift cancels
    assert q["speedup_vs_fp32_rounds"] == pytest.approx(per)
    assert q["speedup_vs_fp32"] == pytest.approx(float(np.median(per)))
    assert q["speedup_vs_fp32_iqr"] == pytest.approx(list(np.percentile(per, [25, 75])))
    assert q["speedup_vs_fp32_range"] == pytest.approx([min(per), max(per)])
    assert q["ratio_to_compute_only_rounds"] == pytest.approx([1.2 * f for f in [1, 1.1, 0.9, 1, 1.2]])
    assert q["speedup_vs_powersgd"] == pytest.approx(float(np.median([1.25 / f for f in [1, 1.1, 0.9, 1, 1.2]])))
    # the ratio of medians would mix rounds of different load; the per-round one does not
    assert r["fp32"]["speedup_vs_fp32_iqr"] == pytest.approx([1.0, 1.0])
    assert r["powersgd"]["speedup_vs_powersgd"] == pytest.approx(1.0)
    # without PowerSGD in the run, no ratio to it
    rows2 = [x for x in rows if x["config"] != "powersgd"]
    add_ratios(rows2)
    assert rows2[-1]["speedup_vs_powersgd"] is None and rows2[-1]["speedup_vs_powersgd_iqr"] is None


def test_format_prints_medians_with_their_spread():
    assert fmt_spread(1.234, [1.15, 1.31]) == "1.23x (IQR 1.15-1.31)"
    assert fmt_spread(1.2, None) == "1.20x" and fmt_spread(None, None) == ""
    assert fmt_spread(0.3214, [0.3, 0.35], "", 3) == "0.321 (IQR 0.300-0.350)"
    rows = [_rounds_row("compute_only", [0.2, 0.22], "qoda", "compute_only"), _rounds_row("fp32", [0.5, 0.6])]
    for x in rows:
        x.update(step_seconds_iqr=[0.2, 0.3], encode_seconds=0.0, comm_seconds=0.0, decode_seconds=0.0)
    add_ratios(rows)
    res = dict(model="m", batch_per_worker=64, steps=4, rounds=2, steps_per_round=2, cores=2, allocator="glibc",
               rows=rows, skipped=[])  # fmt: skip
    text = format_e2e(res)
    assert "in 2 interleaved rounds of 2" in text
    assert "| 4 | 100 | compute_only | 0.210 (IQR 0.200-0.300) |" in text
    assert "| 2.61x (IQR 2.56-2.67) |" in text  # per round 0.5 / 0.2 and 0.6 / 0.22, then their median


def test_old_single_median_files_still_read():
    """Rows of a file from before the rounds (one median, no round_step_seconds)."""
    rows = [
        dict(config="fp32", workers=2, bandwidth_mbit=100.0, step_seconds=0.6, compute_seconds=0.2,
             optimizer="adam", compression="none"),
        dict(config="compute_only", workers=2, bandwidth_mbit=100.0, step_seconds=0.2, compute_seconds=0.2,
             optimizer="qoda", compression="compute_only"),
    ]  # fmt: skip
    add_ratios(rows)
    assert rows[1]["speedup_vs_fp32"] == pytest.approx(3.0)
    assert rows[1]["speedup_vs_fp32_rounds"] == pytest.approx([3.0])
    e2e = _synthetic_e2e()
    for r in e2e["rows"]:
        for key in ("encode_seconds", "comm_seconds", "decode_seconds"):
            r.pop(key)  # an e2e file without the averager's clocks
        r.pop("powersgd_compress_seconds", None)
    w = scaling.workload_from(e2e, {"encode_gbps": 3.0, "decode_gbps": 6.0, "rows": [ENTROPY_CODEC]})
    assert w.encode_gbps == 3.0 and w.powersgd_overhead_seconds == 0.0


# ---------------------------------------------------------------------------- PowerSGD's term
def test_powersgd_overhead_is_the_hook_time_beyond_its_allreduces():
    f = 10_000.0
    rows = []
    for rate, extra in ((1000.0, 0.007), (300.0, 0.008), (100.0, 0.010)):
        alpha = 1e-4
        net = cost.powersgd(2, f).seconds(alpha, Network.of(rate, alpha).beta)
        rows.append(dict(config="powersgd", workers=2, bandwidth_mbit=rate, allreduce_latency_seconds=2 * alpha,
                         encode_seconds=0.0005, comm_seconds=net + extra - 0.001, decode_seconds=0.0005))  # fmt: skip
    rows.append(dict(rows[0], workers=4, comm_seconds=1.0))  # 4-worker rows are not used
    assert scaling.powersgd_overhead(rows, f) == pytest.approx(0.008)  # the median
    # no 2-worker rows: the measured compression compute alone
    only4 = [dict(rows[-1], powersgd_compress_seconds=0.0015), dict(rows[-1], powersgd_compress_seconds=0.0025)]
    assert scaling.powersgd_overhead(only4, f) == pytest.approx(0.002)
    assert scaling.powersgd_overhead([], f) == 0.0


# ---------------------------------------------------------------------------- the paper's workload
def test_paper_workload_parameters_by_hand():
    """ResNet pair at width 128 (3x3 convs with bias, GroupNorm(1, C) affine, 32x32 RGB)."""
    c = 128
    conv3 = c * c * 9 + c
    gen = (128 * 16 * c + 16 * c) + 3 * (2 * conv3 + 2 * 2 * c) + 2 * c + (c * 3 * 9 + 3)
    first = (3 * c * 9 + c) + conv3 + (3 * c + c)  # block 1: 3 -> 128, down, 1x1 skip
    critic = first + (2 * conv3 + c * c + c) + 2 * (2 * conv3) + (c + 1)  # block 2 down (1x1 skip); 3, 4 identity
    assert scaling.paper_parameters(c) == (gen, critic) == (1_154_947, 1_053_825)


def test_flop_count_matches_the_convolution_formula():
    import torch

    from qoda.gan.models import LATENT, ResNetGenerator

    g = ResNetGenerator(ch=128)
    with torch.no_grad():
        one = scaling.count_flops(lambda: g(torch.zeros(1, LATENT)))
        two = scaling.count_flops(lambda: g(torch.zeros(2, LATENT)))
    macs3 = 128 * 128 * 9
    by_hand = 2 * (128 * 2048) + 2 * 2 * macs3 * (8 * 8 + 16 * 16 + 32 * 32) + 2 * 32 * 32 * 3 * 128 * 9
    assert one == by_hand == 800_325_632 and two == 2 * one


def test_compute_and_rate_that_reproduce_a_speedup():
    x_f, x_q, s = 0.14, 0.03, 2.0
    c = scaling.compute_for_speedup(s, x_f, x_q)
    assert (c + x_f) / (c + x_q) == pytest.approx(s) and c == pytest.approx(0.08)
    assert scaling.compute_for_speedup(10.0, x_f, x_q) is None  # above x_f / x_q: no compute gives it
    k, alpha, compute = 8, 1e-4, 0.05
    g = scaling.rate_for_speedup(1.5, compute, k, alpha, W)
    net = Network.of(g * 1000, alpha)
    t = {c: step_seconds(c, k, net, W, compute) for c in ("fp32", "qoda_lw4_allgather", "qoda_lw4_two_phase")}
    assert t["fp32"] / min(t["qoda_lw4_allgather"], t["qoda_lw4_two_phase"]) == pytest.approx(1.5)
    assert scaling.rate_for_speedup(1e6, compute, k, alpha, W) is None


def test_paper_section_inverts_the_published_speedups():
    codec = {"encode_gbps": 4.0, "decode_gbps": 8.0, "rows": [ENTROPY_CODEC]}
    sec = scaling.paper_section(W, codec, 1e-4)
    pw = scaling.paper_workload(W, codec)
    assert pw.parameters == 2_208_772
    assert pw.message_bytes["qoda_lw4"] == pytest.approx(520_000 * 2_208_772 / 1_000_000)  # same bits/coordinate
    net = Network.of(1000, 1e-4)
    for r in sec["rows"]:
        k, c = r["workers"], r["compute_seconds_needed"]
        assert r["per_gpu_batch"] == 1024 / k
        assert r["flops_per_gpu_step"] == pytest.approx(sec["flops_per_sample"] * 1024 / k)
        if c is not None:
            best = min(step_seconds(m, k, net, pw, c) for m in ("qoda_lw4_allgather", "qoda_lw4_two_phase"))
            assert step_seconds("fp32", k, net, pw, c) / best == pytest.approx(r["published_speedup"])
            assert r["implied_utilisation"] == pytest.approx(r["flops_per_gpu_step"] / c / 15.7e12)
    assert 9e9 < sec["flops_per_sample"] < 1e10  # ~7 forward passes of the pair (penalty's double backward)


# ---------------------------------------------------------------------------- entropy-coded rows
def test_entropy_message_from_two_phase_rows_only():
    e2e = _synthetic_e2e(k_values=(2,), rates=(100.0,))
    rows = [r for r in e2e["rows"] if r["config"] != "qoda_lw4_entropy_allgather"]
    for r in rows:
        if r["config"] == "qoda_lw4_two_phase":
            r["payload_bits_per_exchange"] = 4.0 * W.parameters
        if r["config"] == "qoda_lw4_entropy_two_phase":
            r["payload_bits_per_exchange"] = 3.0 * W.parameters
    w = scaling.workload_from({"rows": rows}, {"encode_gbps": 4.0, "decode_gbps": 8.0, "rows": [ENTROPY_CODEC]})
    assert w.message_bytes["qoda_lw4_entropy"] == pytest.approx(520_000 - W.parameters / 8)  # one bit less each
    with pytest.raises(scaling.ScalingInputError, match="entropy"):
        scaling.workload_from({"rows": rows}, {"encode_gbps": 4.0, "decode_gbps": 8.0})
    old = [r for r in rows if "entropy" not in r["config"]]  # a file from before the entropy rows
    w = scaling.workload_from({"rows": old}, {"encode_gbps": 4.0, "decode_gbps": 8.0})
    assert "qoda_lw4_entropy" not in w.message_bytes and not scaling.modelled("qoda_lw4_entropy_two_phase", w)


def _entropy_worker(rank, world):
    import torch
    from torch import nn

    from qoda.bench.e2e import config
    from qoda.quant.config import Coding
    from qoda.train.compression import build_averager
    from qoda.train.config import TrainConfig
    from qoda.train.trainer import build_models

    cfg = TrainConfig(**config("qoda_lw4_entropy_two_phase").options, workers=world)
    avg = build_averager(cfg, nn.ModuleDict(dict(zip(("generator", "critic"), build_models(cfg, 1), strict=True))))
    shapes = [e.shape for e in avg.plan.entries]
    g = torch.Generator().manual_seed(rank)
    st = avg.average_([torch.randn(s, generator=g) for s in shapes], 0)
    codings = {c.coding for c in avg.plan.configs.values()}
    return codings == {Coding.ENTROPY}, st.payload_bits / sum(torch.Size(s).numel() for s in shapes)


def test_the_trainers_entropy_coding_codes_every_quantized_type():
    for entropy, bits in values(run(_entropy_worker, 2, timeout=120)):
        assert entropy and 0 < bits < 4.5
