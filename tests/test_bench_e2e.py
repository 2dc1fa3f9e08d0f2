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
from qoda.bench.e2e import CONFIG_NAMES, add_ratios, calls_of, compute_bound_of
from qoda.bench.scaling import MTU_GOODPUT, Network, Workload, exchange_seconds, step_seconds

W = Workload(
    parameters=1_000_000,
    message_bytes={"qoda_lw4": 520_000.0, "qgenx_8bit": 1_010_000.0},
    powersgd_floats=30_000.0,
    encode_gbps=4.0,
    decode_gbps=8.0,
)
NET = Network(alpha=1e-4, beta=10e6)


def test_network_goodput_is_rate_times_tcp_framing():
    net = Network.of(100, 2e-5)
    assert net.beta == pytest.approx(100e6 / 8 * 1448 / 1538)
    assert pytest.approx(0.94148, abs=1e-5) == MTU_GOODPUT


@pytest.mark.parametrize("k", [2, 4, 12])
def test_exchange_times_are_the_alpha_beta_sums(k):
    n, a, b = 1_000_000, 1e-4, 10e6
    enc, dec = 4 * n / 4e9, 4 * n / 8e9
    ring = 2 * (k - 1) / k
    assert exchange_seconds("fp32", k, NET, W) == pytest.approx(2 * (k - 1) * a + ring * 4 * n / b)
    assert exchange_seconds("fp16", k, NET, W) == pytest.approx(2 * (k - 1) * a + ring * 2 * n / b)
    assert exchange_seconds("powersgd", k, NET, W) == pytest.approx(6 * (k - 1) * a + ring * 4 * 30_000 / b)
    m = 520_000
    assert exchange_seconds("allgather:qoda_lw4", k, NET, W) == pytest.approx(
        2 * (k - 1) * a + (k - 1) * m / b + enc + k * dec
    )
    assert exchange_seconds("two_phase:qoda_lw4", k, NET, W) == pytest.approx(
        5 * (k - 1) * a + ring * m / b + (1 + 1 / k) * enc + 2 * dec
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
                          batch_per_worker=64, payload_bits_per_exchange=32 * W.powersgd_floats)  # fmt: skip
            for name, c in (("compute_only", compute), ("compute_only_2call", 2 * compute)):
                rows.append(dict(config=name, step_seconds=c, bytes_sent_per_exchange=0, **common))
            for name in scaling.MODELLED:
                kind = scaling.MODELLED[name]
                c = 2 * compute if calls_of(name) == 2 else compute
                m = W.message_bytes.get(kind.partition(":")[2], 0.0)
                rows.append(dict(config=name, step_seconds=step_seconds(name, k, net, W, c),
                                 bytes_sent_per_exchange=(k - 1) * (m + 8), **common))  # fmt: skip
    return {"rows": rows}


def test_validation_recovers_a_self_consistent_measurement(tmp_path):
    e2e = _synthetic_e2e()
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    (tmp_path / "codec.json").write_text(json.dumps({"encode_gbps": W.encode_gbps, "decode_gbps": W.decode_gbps}))
    res = scaling.run_scaling(tmp_path / "e2e.json", tmp_path / "codec.json")
    assert res["inputs"]["message_bytes"] == pytest.approx(W.message_bytes)
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
    assert "| 4 |" in scaling.format_scaling(res)


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
    w = scaling.workload_from(e2e, {"encode_gbps": 99.0, "decode_gbps": 99.0})
    assert w.encode_gbps == pytest.approx(4e6 / 0.004 / 1e9) and w.decode_gbps == pytest.approx(8e6 / 0.002 / 1e9)
