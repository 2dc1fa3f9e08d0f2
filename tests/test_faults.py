"""Reliability: a fast subset of every ``qoda bench faults`` scenario, each time-bounded."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import torch
from tests.distributed import run, values

from qoda.bench import faults, fuzz
from qoda.bench.fuzz import run_fuzz
from qoda.comm.aggregate import AggregationError, Aggregator
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerPolicy


def test_fuzzed_payloads_are_all_rejected_clearly():
    r = run_fuzz(1500, seed=1).as_dict()
    assert r["fuzz_cases"] == 1500
    assert (r["silent_corruptions"], r["crashes"], r["hangs"], r["unclear_errors"]) == (0, 0, 0, 0), r["examples"]
    assert r["detected"] == 1500  # every mutation changes the bytes, and every change is caught
    assert set(r["by_mutation"]) == set(fuzz.MUTATIONS)
    # peak traced allocation of one decode: far below what a forged header claims (2^27 .. 2^62 coordinates)
    assert r["memory_over_limit"] == 0 and r["peak_extra_bytes_max"] < 4 << 20, r["peak_cases"]


def test_forged_size_headers_end_in_codec_error_without_large_allocations():
    """Every size/count claim on every segment of every corpus message, CRC forged: CodecError both as a
    message and as a segment decoded on its own (by a receiver whose bucket size matches the claim)."""
    for codec, payload, expected in fuzz.corpus(0)[::3]:
        for start in fuzz.segment_offsets(payload):
            for claim, claimed in fuzz.FORGED_CLAIMS.items():
                for value in claimed:
                    bad = payload.copy()
                    fuzz.forge_sizes(bad, start, claim, value)
                    tracemalloc.start()
                    try:
                        outcome = fuzz.classify(codec, payload, bad, expected, "forged_sizes")
                        peak = tracemalloc.get_traced_memory()[1]
                    finally:
                        tracemalloc.stop()
                    assert outcome == "detected", (claim, value, outcome)
                    assert peak < fuzz.MEMORY_SLACK + fuzz.MEMORY_RATIO_LIMIT * bad.size, (claim, value, peak)
    for n_seg in fuzz.HUGE_SEGMENTS:  # a message header claiming billions of segments
        codec, payload, expected = fuzz.corpus(0)[0]
        bad = payload.copy()
        bad[fuzz.MSG_COUNT : fuzz.MSG_COUNT + 4] = np.frombuffer(struct.pack("<I", n_seg), np.uint8)
        fuzz._forge_message_crc(bad)
        assert fuzz.classify(codec, payload, bad, expected) == "detected"


def test_faults_bench_runs_the_generated_cases(tmp_path):
    """The bench's fuzz and generated rows (few cases: the fuzzer and the properties are tested on
    more above and in test_properties; here the rows and the generated cases' process pool)."""
    res = faults.run_faults(fuzz_cases=60, seed=2, scenarios=("fuzz", "generated"), generated_cases=60,
                            log=lambda *_: None)  # fmt: skip
    rows = {r["scenario"]: r for r in res["scenarios"]}
    assert rows["fuzz"]["ok"] and rows["generated"]["ok"], rows
    assert res["generated"]["generated_cases"] == 60 and res["generated"]["failures_by_property"] == {}
    assert "peak extra memory" in rows["fuzz"]["outcome"] and "60 generated cases" in rows["generated"]["outcome"]


def test_nonfinite_gradient_on_one_rank_raise_and_skip(tmp_path):
    raised = faults.scenario_nonfinite(tmp_path, "raise")
    assert raised["ok"], raised
    skipped = faults.scenario_nonfinite(tmp_path, "skip")
    assert skipped["ok"], skipped


def test_corrupted_payload_and_mismatched_settings_fail_on_every_rank():
    """Every rank (not just one) raises AggregationError for the right cause: the damaged payload
    named with its sender, or the settings that differ."""
    for fn, needles in ((faults._corrupt, ("damaged payload", "from rank 1", "CRC")),
                        (faults._mismatch, ("differ across ranks",))):  # fmt: skip
        msgs = values(run(fn, 2, timeout=120, pg_timeout=30))
        assert len(msgs) == 2
        for m in msgs:
            assert m.startswith("AggregationError") and all(n in m for n in needles), (fn.__name__, m)
    assert faults.scenario_simple("corrupted_payload", faults._corrupt)["ok"]


def _fp16_overflow(rank, world):
    agg = Aggregator(LayerPolicy.global_(QuantizerConfig.qsgd(4)).plan(torch.nn.Linear(64, 32)), "fp16")
    grads = [torch.full((32, 64), 6e4 * world), torch.zeros(32)]  # /K then summed: 6e4 * K > 65504 for K = 2
    try:
        agg.average_(grads, step=0)
    except AggregationError as e:
        return str(e)
    return "accepted"


def test_fp16_overflow_is_an_error_on_every_rank():
    msgs = values(run(_fp16_overflow, 2, timeout=60, pg_timeout=30))
    assert all("fp16 all-reduce overflowed" in m for m in msgs), msgs


def test_dead_and_stalled_workers_end_with_an_error(tmp_path):
    killed = faults.scenario_dead(tmp_path, "kill", pg_timeout=10.0)
    assert killed["ok"] and killed["seconds"] < 10.0, killed
    stalled = faults.scenario_dead(tmp_path, "stall", pg_timeout=5.0)
    assert stalled["ok"] and 4.0 < stalled["seconds"] < 35.0, stalled
    overlapped = faults.scenario_dead(tmp_path, "kill", pg_timeout=10.0, overlap=True)  # background exchange too
    assert overlapped["ok"] and overlapped["seconds"] < 10.0, overlapped


def test_sigkill_while_checkpointing_then_resume_is_bit_exact(tmp_path):
    """40 steps: after its first checkpoint the victim still has 39 (with a checkpoint each, and the
    final evaluation) to run when it is killed, at most 0.25 s later; the scenario fails (no kill)
    if it ends first."""
    row = faults.scenario_kill_during_checkpoint(tmp_path, kills=1, seed=0, steps=40)
    assert row["ok"] and row["kills"] == 1, row


def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    row = faults.scenario_torchrun(tmp_path)
    assert row["ok"], row


def test_sigterm_to_the_launcher_then_ctrl_c_on_the_group_stop_every_worker_and_resume(tmp_path):
    """2 workers: SIGTERM to the launcher alone, then (the run resumed) SIGINT to the whole process
    group; each time every worker is gone within seconds, exit 143/130, one line, no process left."""
    row = faults.scenario_interrupt(tmp_path, ("sigterm_launcher", "sigint_group"), workers=2, finish=False)
    assert row["ok"] and row["stray"] == 0 and row["stop_seconds"] < 10, row
