"""``qoda bench faults``: fault scenarios across real processes, with counts and timings.

Scenarios (each a real multi-process run on 127.0.0.1 with gloo, on the trainer's code paths):

* ``fuzz`` - :func:`qoda.bench.fuzz.run_fuzz`: damaged payloads must all raise ``CodecError``.
* ``nonfinite_raise`` / ``nonfinite_skip`` - rank 1's gradient turns NaN at step 2: with policy
  ``raise`` every rank raises ``NonFiniteGradientError`` at that step; with ``skip`` every rank
  drops the step and the workers' parameters stay bitwise identical.
* ``corrupted_payload`` - rank 1's payload is damaged in transit: every rank raises
  ``AggregationError`` in the same call, no rank waits.
* ``mismatched_config`` - rank 1 quantizes with 8 bits instead of 4: refused at start-up
  (plan fingerprint) on every rank.
* ``killed_worker`` - rank 1 is SIGKILLed at step 3: rank 0 raises instead of hanging.
* ``killed_worker_overlap`` - the same with ``overlap``: rank 0 also waits on the background
  exchange of the generator's gradient, on its own process group.
* ``stalled_worker`` - rank 1 stops responding (SIGSTOP) at step 3: rank 0 raises after the
  process-group timeout (``--pg-timeout``).
* ``kill_during_checkpoint`` - a ``qoda train`` process (one checkpoint per step) is SIGKILLed
  at random moments, several times, and resumed each time; the final parameters must equal an
  uninterrupted run's bit for bit.
* ``torchrun_elastic`` - ``torchrun --max-restarts 2`` with 2 workers, one SIGKILLed after the
  first checkpoint: the elastic agent restarts both, ``--resume`` continues from the last
  committed checkpoint, and the final parameters equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qoda.utils.procs import run

TINY = {
    "dataset": "digits", "width": 8, "batch_size": 16, "fid_samples": 20, "eval_every": 10_000,
    "sample_every": 10_000, "log_every": 5, "progress": False, "compression": "layerwise_adaptive",
    "refit_steps": (0, 3), "lr_g": 1e-3, "lr_d": 1e-3,
}  # fmt: skip


def _tiny(out: Path, **kw: Any):
    from qoda.train.config import TrainConfig

    return TrainConfig(**{**TINY, "out": str(out), **kw})  # FID extractor cache: the default (or $QODA_CACHE)


# ------------------------------------------------------------------------------------ in-process scenarios
def _nonfinite(rank: int, world: int, out: str, policy: str) -> dict[str, Any]:
    from qoda.train.trainer import NonFiniteGradientError, Trainer

    tr = Trainer(_tiny(Path(out), nonfinite=policy, steps=5), rank, world)
    oracle = tr._oracle

    def poisoned(update_generator: bool, call: int):
        losses = oracle(update_generator, call)
        if rank == 1 and tr.step == 2:
            next(tr.critic.parameters()).grad.view(-1)[7] = float("nan")
        return losses

    tr._oracle = poisoned
    try:
        for _ in range(5):
            tr.train_step()
    except NonFiniteGradientError as e:
        return {"raised": type(e).__name__, "step": tr.step, "message": str(e)}
    params = torch.cat([p.detach().reshape(-1) for p in tr.players.parameters()])
    return {"raised": None, "skipped": tr.skipped, "checksum": float(params.double().sum()), "params": params.numpy()}


def _corrupt(rank: int, world: int) -> str:
    from qoda.comm.aggregate import AggregationError, Aggregator
    from qoda.quant.config import QuantizerConfig
    from qoda.quant.policy import LayerPolicy

    model = torch.nn.Linear(256, 64)
    agg = Aggregator(LayerPolicy.global_(QuantizerConfig.qsgd(4)).plan(model), "allgather")
    encode = agg.codec.encode_flats

    def damaged(*a, **k):
        msg = encode(*a, **k)
        if rank == 1:
            msg.data[len(msg.data) // 2] ^= 0x10
        return msg

    agg.codec.encode_flats = damaged
    grads = [torch.randn(p.shape) for p in model.parameters()]
    try:
        agg.average_(grads, step=0)
    except AggregationError as e:
        return f"AggregationError: {str(e)[:160]}"
    return "accepted"


def _mismatch(rank: int, world: int) -> str:
    from qoda.comm.aggregate import AggregationError, Aggregator
    from qoda.quant.config import QuantizerConfig
    from qoda.quant.policy import LayerPolicy

    model = torch.nn.Linear(256, 64)
    try:
        Aggregator(LayerPolicy.global_(QuantizerConfig.qsgd(4 if rank == 0 else 8)).plan(model), "two_phase")
    except AggregationError as e:
        return f"AggregationError: {str(e)[:120]}"
    return "accepted"


def _dies(rank: int, world: int, out: str, how: str, pg_timeout: float, overlap: bool = False) -> str:
    from qoda.train import trainer as tr

    original = tr.Trainer.train_step

    def step(self):
        if rank == 1 and self.step == 3:
            Path(out, "victim-ready").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        return original(self)

    tr.Trainer.train_step = step  # this child process only
    cfg = _tiny(Path(out), steps=50, timeout_seconds=pg_timeout, overlap=overlap)  # the group's own timeout
    tr.run_worker(cfg, rank, world)
    return "finished"


def _row(scenario: str, ok: bool, outcome: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"scenario": scenario, "ok": ok, "outcome": outcome, "seconds": round(seconds, 3), **extra}


def scenario_nonfinite(tmp: Path, policy: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run(_nonfinite, 2, str(tmp / f"nf-{policy}"), policy, timeout=180, pg_timeout=30)
    secs = time.perf_counter() - t0
    vals = [v for _, v in res]
    if any(s != "ok" for s, _ in res):
        return _row(f"nonfinite_{policy}", False, f"a rank failed: {vals}", secs)
    if policy == "raise":
        ok = all(v["raised"] == "NonFiniteGradientError" and v["step"] == 2 for v in vals)
        return _row("nonfinite_raise", ok, f"every rank raised NonFiniteGradientError at step {vals[0]['step']}: "
                    f"{vals[0]['message'][:90]}", secs)  # fmt: skip
    same = bool((vals[0]["params"] == vals[1]["params"]).all())
    ok = all(v["raised"] is None and v["skipped"] == 1 for v in vals) and same
    return _row("nonfinite_skip", ok, f"every rank skipped {vals[0]['skipped']} step; parameters identical "
                f"across ranks: {same}", secs)  # fmt: skip


def scenario_simple(name: str, fn) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run(fn, 2, timeout=120, pg_timeout=30)
    secs = time.perf_counter() - t0
    ok = all(s == "ok" and str(v).startswith("AggregationError") for s, v in res)
    return _row(name, ok, f"every rank: {res[0][1]}", secs)


def scenario_dead(tmp: Path, how: str, pg_timeout: float, overlap: bool = False) -> dict[str, Any]:
    """``overlap``: the survivor is also waiting on the background exchange (qoda.comm.overlap)."""
    out = tmp / f"dead-{how}{'-overlap' if overlap else ''}"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[int, float] = {}
    name = ("killed_worker" if how == "kill" else "stalled_worker") + ("_overlap" if overlap else "")
    t0 = time.time()
    try:
        res = run(_dies, 2, str(out), how, pg_timeout, overlap, timeout=pg_timeout + 120, pg_timeout=pg_timeout,
                  wait_for=[0], times=times)  # fmt: skip
    except TimeoutError as e:
        return _row(name, False, f"rank 0 hung: {e}", time.time() - t0)
    ready = float((out / "victim-ready").read_text()) if (out / "victim-ready").exists() else t0
    status, value = res[0]
    detect = times.get(0, time.time()) - ready
    ok = status == "error" and "WorkerLostError" in str(value) and (how == "kill" or detect <= pg_timeout + 30)
    first = str(value).splitlines()[0][:400]
    return _row(name, ok, f"rank 0 raised after {detect:.1f} s: {first}", detect, pg_timeout=pg_timeout)


# ------------------------------------------------------------------------------------ subprocess scenarios
def _cli(args: list[str], log: Path) -> subprocess.Popen:
    """``qoda train`` in a child process; its output goes to ``log`` (never a pipe nobody drains)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("ab") as f:
        return subprocess.Popen([sys.executable, "-m", "qoda.cli", "train", *args], stdout=f, stderr=f, env=env)


def _tail(log: Path, n: int = 300) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _args(cfg) -> list[str]:
    out = []
    for k, v in cfg.to_dict().items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v and k == "resume":
                out.append(flag)
            elif not v and k == "progress":
                out.append("--no-progress")
        elif v is None:
            continue
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def _final_params(out: Path) -> dict[str, torch.Tensor]:
    ptr = json.loads((out / "checkpoints" / "latest.json").read_text())
    common = torch.load(out / "checkpoints" / ptr["dir"] / "common.pt", weights_only=False)
    return {f"{m}.{k}": v for m in ("generator", "critic", "ema") for k, v in common[m].items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scenario_kill_during_checkpoint(tmp: Path, kills: int, seed: int, steps: int = 250) -> dict[str, Any]:
    t0 = time.perf_counter()
    ref = _tiny(tmp / "ckpt-ref", steps=steps, checkpoint_every=1)
    log = tmp / "ckpt.log"
    p = _cli(_args(ref), log)
    if p.wait(timeout=600) != 0:
        return _row("kill_during_checkpoint", False, f"reference run failed: {_tail(log)}", 0.0)
    cfg = _tiny(tmp / "ckpt-victim", steps=steps, checkpoint_every=1, resume=True)
    rng = random.Random(seed)
    mid_write, done_kills = 0, 0
    root = Path(cfg.out) / "checkpoints"
    ptr = root / "latest.json"

    def committed() -> int:
        try:
            return int(json.loads(ptr.read_text())["step"])
        except (OSError, ValueError, KeyError):
            return -1

    for _ in range(kills):
        p = _cli(_args(cfg), log)
        before, deadline = committed(), time.monotonic() + 300
        while committed() <= before and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until this process has committed a checkpoint of its own ...
        time.sleep(rng.uniform(0.0, 0.25))  # ... then kill it at a random moment (a checkpoint per step)
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        done_kills += 1
        if any(root.glob("step-*/.*.tmp")) or len(list(root.glob("step-*"))) > 1:
            mid_write += 1  # killed with a checkpoint half-written
    p = _cli(_args(cfg), log)
    rc = p.wait(timeout=600)
    if rc != 0:
        return _row("kill_during_checkpoint", False, f"resume failed: {_tail(log)}",
                    time.perf_counter() - t0)  # fmt: skip
    same = _same(_final_params(Path(ref.out)), _final_params(Path(cfg.out)))
    return _row("kill_during_checkpoint", same,
                f"{done_kills} SIGKILLs ({mid_write} with a checkpoint half-written), resumed each time; final "
                f"parameters bit-identical to the uninterrupted run: {same}", time.perf_counter() - t0,
                kills=done_kills, killed_mid_write=mid_write)  # fmt: skip


def scenario_torchrun(tmp: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    steps = 30
    ref = _tiny(tmp / "tr-ref", steps=steps, checkpoint_every=5, workers=2)
    p = _cli(_args(ref), tmp / "torchrun-ref.log")
    if p.wait(timeout=600) != 0:
        return _row("torchrun_elastic", False, f"reference run failed: {_tail(tmp / 'torchrun-ref.log')}", 0.0)
    cfg = _tiny(tmp / "tr-victim", steps=steps, checkpoint_every=5, resume=True)
    from qoda.utils.procs import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "qoda.cli",
        "train",
        *_args(cfg),
        "--timeout-seconds",
        "120",
    ]  # fmt: skip  (start-up under load can exceed 30 s)
    log_path = tmp / "torchrun.log"
    log_file = log_path.open("wb")
    agent = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    ptr = Path(cfg.out) / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    killed = None
    while time.monotonic() < deadline and agent.poll() is None:
        if ptr.exists() and json.loads(ptr.read_text())["step"] >= 5:
            kids = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
            if kids:
                killed = int(kids[-1])
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.2)
    try:
        rc = agent.wait(timeout=600)
    except subprocess.TimeoutExpired:
        agent.kill()
        return _row("torchrun_elastic", False, "torchrun did not finish within 600 s", time.perf_counter() - t0)
    log_file.close()
    err = log_path.read_text(errors="replace")
    starts = len(list((Path(cfg.out) / "tensorboard").glob("events.out.tfevents.*")))  # one per rank-0 start
    if rc != 0:
        detail = " | ".join(ln.strip() for ln in err.splitlines() if "Error" in ln or "error" in ln)[-600:]
        return _row("torchrun_elastic", False, f"torchrun exited {rc}: {detail}", time.perf_counter() - t0)
    same = _same(_final_params(Path(ref.out)), _final_params(Path(cfg.out)))
    return _row("torchrun_elastic", same and killed is not None and starts >= 2,
                f"worker pid {killed} SIGKILLed after the step-5 checkpoint; the agent started the workers "
                f"{starts} times; resumed run bit-identical to the uninterrupted one: {same}",
                time.perf_counter() - t0)  # fmt: skip


# ------------------------------------------------------------------------------------ driver
def run_faults(fuzz_cases: int = 10_000, kills: int = 5, pg_timeout: float = 10.0, seed: int = 0,
               log=print) -> dict[str, Any]:  # fmt: skip
    from qoda.bench.fuzz import run_fuzz

    rows = []
    with tempfile.TemporaryDirectory(prefix="qoda-faults-") as d:
        tmp = Path(d)
        log(f"fuzzing {fuzz_cases} payloads ...")
        fz = run_fuzz(fuzz_cases, seed).as_dict()
        ok = fz["silent_corruptions"] == 0 and fz["crashes"] == 0 and fz["hangs"] == 0 and fz["unclear_errors"] == 0
        rows.append(_row("fuzz", ok, f"{fz['detected']} detected, {fz['harmless']} harmless, {fz['unchanged']} no-op, "
                         f"{fz['silent_corruptions']} silent, {fz['crashes']} crashes, {fz['hangs']} hangs",
                         fz["seconds"]))  # fmt: skip
        steps = [
            ("nonfinite_raise", lambda: scenario_nonfinite(tmp, "raise")),
            ("nonfinite_skip", lambda: scenario_nonfinite(tmp, "skip")),
            ("corrupted_payload", lambda: scenario_simple("corrupted_payload", _corrupt)),
            ("mismatched_config", lambda: scenario_simple("mismatched_config", _mismatch)),
            ("killed_worker", lambda: scenario_dead(tmp, "kill", pg_timeout)),
            ("stalled_worker", lambda: scenario_dead(tmp, "stall", pg_timeout)),
            ("killed_worker_overlap", lambda: scenario_dead(tmp, "kill", pg_timeout, overlap=True)),
            ("kill_during_checkpoint", lambda: scenario_kill_during_checkpoint(tmp, kills, seed)),
            ("torchrun_elastic", lambda: scenario_torchrun(tmp)),
        ]
        for name, fn in steps:
            log(f"scenario {name} ...")
            try:
                row = fn()
            except Exception as e:  # a scenario's own failure is a result, not a crash of the bench
                row = _row(name, False, f"{type(e).__name__}: {e}", 0.0)
            log(f"  {'ok ' if row['ok'] else 'FAILED'} {row['outcome']} ({row['seconds']:.1f} s)")
            rows.append(row)
    return {
        "fuzz_cases": fz["fuzz_cases"], "crashes": fz["crashes"], "hangs": fz["hangs"],
        "silent_corruptions": fz["silent_corruptions"], "unclear_errors": fz["unclear_errors"],
        "fuzz": fz, "scenarios": rows, "all_ok": all(r["ok"] for r in rows),
    }  # fmt: skip


def format_faults(res: dict[str, Any]) -> str:
    lines = ["| scenario | ok | outcome | seconds |", "|---|---|---|---|"]
    for r in res["scenarios"]:
        lines.append(f"| {r['scenario']} | {'yes' if r['ok'] else 'NO'} | {r['outcome']} | {r['seconds']:.1f} |")
    return "\n".join(lines)
