"""Reliability: a fast subset of every ``qoda bench faults`` scenario, each time-bounded."""

from __future__ import annotations

import torch
from tests.distributed import run, values

from qoda.bench import faults
from qoda.bench.fuzz import run_fuzz
from qoda.comm.aggregate import AggregationError, Aggregator
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerPolicy


def test_fuzzed_payloads_are_all_rejected_clearly():
    r = run_fuzz(1500, seed=1).as_dict()
    assert r["fuzz_cases"] == 1500
    assert (r["silent_corruptions"], r["crashes"], r["hangs"], r["unclear_errors"]) == (0, 0, 0, 0), r["examples"]
    assert r["detected"] == 1500  # every mutation changes the bytes, and every change is caught
    assert set(r["by_mutation"]) == {"bitflip", "truncate", "extend", "segment_header", "message_header"}


def test_nonfinite_gradient_on_one_rank_raise_and_skip(tmp_path):
    raised = faults.scenario_nonfinite(tmp_path, "raise")
    assert raised["ok"], raised
    skipped = faults.scenario_nonfinite(tmp_path, "skip")
    assert skipped["ok"], skipped


def test_corrupted_payload_and_mismatched_settings_fail_on_every_rank():
    for name, fn in (("corrupted_payload", faults._corrupt), ("mismatched_config", faults._mismatch)):
        row = faults.scenario_simple(name, fn)
        assert row["ok"], row
    assert "rank 1" in faults.scenario_simple("corrupted_payload", faults._corrupt)["outcome"]


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
    row = faults.scenario_kill_during_checkpoint(tmp_path, kills=1, seed=0, steps=120)
    assert row["ok"] and row["kills"] == 1, row


def test_torchrun_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    row = faults.scenario_torchrun(tmp_path)
    assert row["ok"], row
