"""``qoda bench faults``: fault scenarios across real processes, with counts and timings.

Scenarios (each a real multi-process run on 127.0.0.1 with gloo, on the trainer's code paths):

* ``fuzz`` - :func:`qoda.bench.fuzz.run_fuzz`: damaged payloads must all raise ``CodecError``
  (forged-CRC headers claiming huge sizes included), with the peak memory a payload makes the
  decoder allocate.
* ``generated`` - :func:`qoda.testing.generate.run_generated`: ``generated_cases`` (default 100,000)
  generated tensors, level sets, configs and messages checked against the quantizer's and the
  codec's properties (bit-exact round trip, exact bits, CPU = torch, error bound, unbiasedness,
  invalid inputs); failures are counted by property.
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
* ``reused_out`` - ``qoda train`` again into a finished run's folder without ``--resume``: refused
  in one line (exit 2), its checkpoint and TensorBoard file untouched; ``--overwrite`` replaces
  qoda's files only (one event file afterwards, the user's own file kept); an empty folder is fine.
* ``resume_nothing`` - ``--resume`` into a missing folder, an empty one and an unrelated one: one
  line each, nothing written.
* ``bad_input`` - ``--out`` naming a file, ``--device cuda`` without CUDA, and a committed
  checkpoint that is truncated, garbage, of the older format or carries a pickled Python object:
  one line naming the file or option, before any worker starts; the object never runs.
* ``file_modes`` - a run under umask 027: every file it writes has mode 0640.
* ``interrupt_sigint_launcher`` / ``interrupt_sigterm_launcher`` / ``interrupt_sigint_group`` -
  a 2-worker run signalled after a checkpoint (the launcher alone, or Ctrl-C's whole process
  group): exit 130/143 within seconds, one line saying how to resume, no process left; then
  ``--resume`` finishes the run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
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
    cfg = _tiny(Path(out), steps=50, timeout_seconds=pg_timeout, player_threads=overlap)  # the group's own timeout
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
            if v and k in ("resume", "overwrite"):
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
    from qoda.train.checkpoint import read_file

    ptr = json.loads((out / "checkpoints" / "latest.json").read_text())
    common = read_file(out / "checkpoints" / ptr["dir"] / "common.pt")  # tensors and plain values only
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
    fresh = _tiny(tmp / "ckpt-victim", steps=steps, checkpoint_every=1)
    cfg = fresh.replace(resume=True)  # every run after the first continues
    rng = random.Random(seed)
    mid_write, done_kills = 0, 0
    root = Path(cfg.out) / "checkpoints"
    ptr = root / "latest.json"

    def committed() -> int:
        try:
            return int(json.loads(ptr.read_text())["step"])
        except (OSError, ValueError, KeyError):
            return -1

    for i in range(kills):
        p = _cli(_args(cfg if i else fresh), log)
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


# ------------------------------------------------------------------------------------ run folders, bad input, signals
def _train_once(cfg, *extra: str, timeout: float = 300, umask: int | None = None) -> tuple[int, list[str], float]:
    """``qoda train`` on ``cfg`` (plus ``extra`` options) to its end: exit code, non-empty stderr lines, seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "qoda.cli", "train", *_args(cfg), *extra], capture_output=True,
                       text=True, env=env, timeout=timeout, umask=-1 if umask is None else umask)  # fmt: skip
    return p.returncode, [ln for ln in p.stderr.splitlines() if ln.strip()], time.perf_counter() - t0


def _refused(rc: int, lines: list[str], *needles: str) -> bool:
    """Exit code 2 and exactly one line ``qoda train: error: ...`` containing every needle."""
    one = len(lines) == 1 and lines[0].startswith("qoda train: error:")
    return rc == 2 and one and all(n in lines[0] for n in needles)


def _event_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "tensorboard").glob("events.out.tfevents.*"))


def _base_run(tmp: Path, workers: int = 1) -> Path:
    """A finished tiny run (4 steps, checkpoints every 2) made once per ``tmp``; copy it before altering it."""
    out = tmp / f"base-{workers}"
    if not (out / "report.json").exists():
        rc, lines, _ = _train_once(_tiny(out, steps=4, checkpoint_every=2, workers=workers))
        if rc != 0:
            raise RuntimeError(f"the base run failed ({rc}): {' | '.join(lines[-3:])}")
    return out


def scenario_reused_out(tmp: Path) -> dict[str, Any]:
    """A second ``qoda train`` into a folder holding a run: refused, nothing touched; ``--overwrite``
    replaces qoda's files only (a user's file stays) and leaves one TensorBoard event file."""
    t0 = time.perf_counter()
    out = tmp / "reused"
    shutil.copytree(_base_run(tmp), out)
    (out / "notes.txt").write_text("the user's own file\n")
    before = (out / "checkpoints" / "step-0000004" / "common.pt").read_bytes()
    events = _event_files(out)
    cfg = _tiny(out, steps=2, checkpoint_every=2)
    rc, lines, secs = _train_once(cfg)
    untouched = (checkpoint_step(out) == 4 and _event_files(out) == events
                 and (out / "checkpoints" / "step-0000004" / "common.pt").read_bytes() == before)  # fmt: skip
    refused = _refused(rc, lines, "already holds a run (checkpoint at step 4)", "--resume", "--overwrite")
    rc2, _, secs2 = _train_once(cfg.replace(overwrite=True))
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    replaced = (rc2 == 0 and checkpoint_step(out) == 2 and report.get("steps") == 2 and len(_event_files(out)) == 1
                and _event_files(out) != events and (out / "notes.txt").exists())  # fmt: skip
    empty = tmp / "reused-empty"
    empty.mkdir()
    rc3, _, _ = _train_once(_tiny(empty, steps=2, checkpoint_every=2))
    ok = refused and untouched and replaced and rc3 == 0
    first = lines[0] if lines else ""
    return _row("reused_out", ok,
                f"rerun without --resume refused in {secs:.1f} s (exit {rc}, {len(lines)} line: {first}); "
                f"checkpoint and event file untouched: {untouched}; --overwrite replaced the run in {secs2:.1f} s "
                f"(1 event file, notes.txt kept: {replaced}); an empty existing folder trains: {rc3 == 0}",
                time.perf_counter() - t0, refuse_seconds=round(secs, 3))  # fmt: skip


def checkpoint_step(out: Path) -> int | None:
    try:
        return int(json.loads((out / "checkpoints" / "latest.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def scenario_resume_nothing(tmp: Path) -> dict[str, Any]:
    """``--resume`` into a missing folder, an empty one and one holding only a user's file: one line each."""
    t0 = time.perf_counter()
    empty, unrelated = tmp / "rn-empty", tmp / "rn-unrelated"
    empty.mkdir()
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("not a run\n")
    cases = {"missing": (tmp / "rn-missing", "does not exist"), "empty": (empty, "holds no qoda run"),
             "unrelated": (unrelated, "holds no qoda run")}  # fmt: skip
    results, worst = {}, 0.0
    for name, (out, needle) in cases.items():
        rc, lines, secs = _train_once(_tiny(out, steps=2, resume=True))
        results[name] = _refused(rc, lines, "--resume", needle) and not (out / "config.json").exists()
        worst = max(worst, secs)
        if name == "empty":
            example = lines[0] if lines else ""
    ok = all(results.values()) and not (tmp / "rn-missing").exists()
    return _row("resume_nothing", ok,
                f"refused in one line (exit 2), nothing written: {results}; slowest {worst:.1f} s; e.g. {example}",
                time.perf_counter() - t0)  # fmt: skip


class _Payload:
    """Unpickling this runs ``open(path, "w")``: a checkpoint carrying it must be refused unexecuted."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def scenario_bad_input(tmp: Path) -> dict[str, Any]:
    """``--out`` naming a file, ``--device cuda`` without CUDA, and committed checkpoints that are
    truncated, garbage, of an older format or carry a Python object: one line each, before any
    worker starts, and the object never runs."""
    t0 = time.perf_counter()
    base = _base_run(tmp, workers=2)
    step_dir = "checkpoints/step-0000004"
    a_file = tmp / "bad-file"
    a_file.write_text("x")
    marker = tmp / "payload-ran"

    def truncate(d: Path) -> None:
        f = d / step_dir / "common.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])

    def garbage(d: Path) -> None:
        (d / step_dir / "rank-1.pt").write_bytes(random.Random(0).randbytes(5000))

    def old_format(d: Path) -> None:
        ptr = json.loads((d / "checkpoints" / "latest.json").read_text())
        ptr.pop("version")
        (d / "checkpoints" / "latest.json").write_text(json.dumps(ptr))

    def payload(d: Path) -> None:
        f = d / step_dir / "common.pt"
        state = torch.load(f, weights_only=True)
        state["history"].append(_Payload(marker))
        torch.save(state, f)

    cases: dict[str, tuple[Any, list[str], tuple[str, ...]]] = {
        "out_is_file": (_tiny(a_file, steps=2), [], ("--out", "existing file")),
        "truncated_common": (truncate, [], ("common.pt", "damaged")),
        "garbage_rank": (garbage, [], ("rank-1.pt", "damaged")),
        "old_format": (old_format, [], ("format 1",)),
        "python_object": (payload, [], ("common.pt", "GLOBAL", "nothing of it was run")),
    }  # fmt: skip
    if not torch.cuda.is_available():
        cases["device_cuda"] = (_tiny(tmp / "bad-cuda", steps=2), ["--device", "cuda"], ("device", "cuda"))
    results, seconds, lines_seen = {}, {}, {}
    for name, (what, extra, needles) in cases.items():
        if callable(what):
            out = tmp / f"bad-{name}"
            shutil.copytree(base, out)
            what(out)
            cfg = _tiny(out, steps=6, checkpoint_every=2, workers=2, resume=True)
        else:
            cfg = what
        rc, lines, secs = _train_once(cfg, *extra)
        results[name], seconds[name], lines_seen[name] = _refused(rc, lines, *needles), round(secs, 2), lines
    ok = all(results.values()) and not marker.exists()
    failed = {k: lines_seen[k] for k, v in results.items() if not v}
    timing = ", ".join(f"{k} {v} s" for k, v in seconds.items())
    return _row("bad_input", ok,
                f"one line, exit 2: {sum(results.values())}/{len(results)} ({timing}); "
                f"pickled object executed: {marker.exists()}" + (f"; FAILED: {failed}" if failed else ""),
                time.perf_counter() - t0, case_seconds=seconds)  # fmt: skip


def scenario_file_modes(tmp: Path, umask: int = 0o027) -> dict[str, Any]:
    """Every file of a run follows the user's umask (``0o666 & ~umask``), checkpoints included."""
    t0 = time.perf_counter()
    out = tmp / "modes"
    rc, lines, _ = _train_once(_tiny(out, steps=2, checkpoint_every=2), umask=umask)
    if rc != 0:
        return _row("file_modes", False, f"run failed ({rc}): {' | '.join(lines[-3:])}", time.perf_counter() - t0)
    files = [p for p in out.rglob("*") if p.is_file()]
    want = 0o666 & ~umask
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != want}
    return _row("file_modes", not wrong and bool(files),
                f"umask {umask:03o}: {len(files) - len(wrong)}/{len(files)} files have mode {want:03o}"
                + (f"; others: {wrong}" if wrong else ""), time.perf_counter() - t0)  # fmt: skip


def _descendants(pid: int) -> list[int]:
    kids = [int(k) for k in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    return kids + [g for k in kids for g in _descendants(k)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


INTERRUPTS = {"sigint_launcher": (signal.SIGINT, False), "sigterm_launcher": (signal.SIGTERM, False),
              "sigint_group": (signal.SIGINT, True)}  # fmt: skip


def _interrupt_once(cfg, how: str) -> dict[str, Any]:
    """Start ``qoda train`` on ``cfg``, signal it (``how``) once a checkpoint of its own is committed."""
    sig, group = INTERRUPTS[how]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = checkpoint_step(Path(cfg.out)) or 0
    p = subprocess.Popen([sys.executable, "-m", "qoda.cli", "train", *_args(cfg)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while (checkpoint_step(Path(cfg.out)) or 0) <= before and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    procs = _descendants(p.pid)  # the workers (none for one worker) and multiprocessing's resource tracker
    if p.poll() is not None or (checkpoint_step(Path(cfg.out)) or 0) <= before or (cfg.workers > 1 and not procs):
        p.kill()
        return {"ok": False, "text": f"{how}: the run ended or never checkpointed: {p.communicate()[1][-300:]}"}
    t1 = time.perf_counter()
    if group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return {"ok": False, "text": f"{how}: the launcher did not exit within 60 s"}
    stop = time.perf_counter() - t1
    gone_by = time.monotonic() + 5
    while any(_alive(q) for q in procs) and time.monotonic() < gone_by:
        time.sleep(0.05)
    stray = [q for q in procs if _alive(q)]
    for q in stray:
        os.kill(q, signal.SIGKILL)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    committed = checkpoint_step(Path(cfg.out)) or 0
    line = lines[0] if len(lines) == 1 else ""
    said = line.startswith("qoda train: interrupted") and f"last committed checkpoint: step {committed}" in line
    said = said and ("rerun the same command" if cfg.resume else "rerun the same command with --resume") in line
    ok = p.returncode == 128 + sig and said and not stray and stop < 15
    text = (f"{signal.Signals(sig).name} to the {'process group' if group else 'launcher'}: exit {p.returncode} after "
            f"{stop:.1f} s, {len(lines)} line ({lines[0] if lines else ''}); {len(procs)} child processes, "
            f"{len(stray)} left")  # fmt: skip
    return {"ok": ok, "text": text, "stop": stop, "stray": len(stray), "committed": committed}


def scenario_interrupt(tmp: Path, hows: str | tuple[str, ...], workers: int = 2, finish: bool = True) -> dict[str, Any]:
    """SIGINT/SIGTERM to the launcher of a ``workers``-process run (or SIGINT to its whole process
    group, as Ctrl-C in a terminal does) after a checkpoint: every worker gone within seconds, exit
    130/143, one line saying how to resume, no process left; then ``--resume`` finishes the run.
    Several ``hows`` interrupt the same run one after the other (each rerun with ``--resume``, which
    must commit a checkpoint of its own before its signal); ``finish=False`` skips the final run."""
    hows = (hows,) if isinstance(hows, str) else tuple(hows)
    name = "interrupt_" + "+".join(hows)
    t0 = time.perf_counter()
    cfg = _tiny(tmp / f"intr-{'-'.join(hows)}-{workers}", steps=100_000, checkpoint_every=5, workers=workers)
    results = []
    for i, how in enumerate(hows):
        results.append(_interrupt_once(cfg.replace(resume=i > 0), how))
        if not results[-1]["ok"]:
            break
    committed = checkpoint_step(Path(cfg.out)) or 0
    resumed, why = True, ""
    if finish:
        rc, rlines, _ = _train_once(cfg.replace(resume=True, steps=committed + 3))
        report = json.loads((Path(cfg.out) / "report.json").read_text()) if rc == 0 else {}
        resumed = rc == 0 and report.get("steps") == committed + 3
        why = f"; --resume from step {committed} finished: {resumed}"
        why += "" if resumed else f" (exit {rc}: {' | '.join(rlines[-3:])[:300]})"
    ok = len(results) == len(hows) and all(r["ok"] for r in results) and resumed
    stops = [r["stop"] for r in results if "stop" in r]
    return _row(name, ok, "; ".join(r["text"] for r in results) + why,
                time.perf_counter() - t0, stop_seconds=round(max(stops, default=0.0), 3),
                stray=sum(r.get("stray", 0) for r in results))  # fmt: skip


# ------------------------------------------------------------------------------------ driver
SCENARIOS = ("fuzz", "generated", "nonfinite_raise", "nonfinite_skip", "corrupted_payload", "mismatched_config",
             "killed_worker", "stalled_worker", "killed_worker_overlap", "kill_during_checkpoint", "torchrun_elastic",
             "reused_out", "resume_nothing", "bad_input", "file_modes",
             *(f"interrupt_{h}" for h in INTERRUPTS))  # fmt: skip


def run_faults(fuzz_cases: int = 10_000, kills: int = 5, pg_timeout: float = 10.0, seed: int = 0,
               log=print, scenarios: tuple[str, ...] | None = None,
               generated_cases: int = 100_000) -> dict[str, Any]:  # fmt: skip
    """Every scenario of :data:`SCENARIOS` (or the ``scenarios`` named), in that order."""
    from qoda.bench.fuzz import run_fuzz

    selected = set(SCENARIOS if scenarios is None else scenarios)
    unknown = selected - set(SCENARIOS)
    if unknown:
        raise ValueError(f"scenarios: unknown {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    rows = []
    fz: dict[str, Any] = {}
    gen: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qoda-faults-") as d:
        tmp = Path(d)
        if "fuzz" in selected:
            log(f"fuzzing {fuzz_cases} payloads ...")
            fz = run_fuzz(fuzz_cases, seed).as_dict()
            ok = fz["silent_corruptions"] == 0 and fz["crashes"] == 0 and fz["hangs"] == 0 and fz["unclear_errors"] == 0
            ok = ok and fz["memory_over_limit"] == 0
            rows.append(_row("fuzz", ok, f"{fz['detected']} detected, {fz['harmless']} harmless, {fz['unchanged']} "
                             f"no-op, {fz['silent_corruptions']} silent, {fz['crashes']} crashes, {fz['hangs']} hangs; "
                             f"peak extra memory per payload {fz['peak_extra_bytes_max'] / 1024:.0f} KiB (at most "
                             f"{fz['peak_extra_ratio_max']:.0f}x the payload's bytes), {fz['memory_over_limit']} over "
                             "the limit", fz["seconds"]))  # fmt: skip
        if "generated" in selected:
            from qoda.testing.generate import run_generated

            log(f"checking {generated_cases} generated cases ...")
            gen = run_generated(generated_cases, seed, log=log).as_dict()
            failed = ", ".join(f"{k} {v}" for k, v in gen["failures_by_property"].items()) or "none"
            rows.append(_row("generated", gen["failing_cases"] == 0 and not gen["harness_errors"],
                             f"{gen['generated_cases']} generated cases, {gen['failing_cases']} failing (by property: "
                             f"{failed}); {sum(gen['checks'].values())} property checks", gen["seconds"]))  # fmt: skip
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
            ("reused_out", lambda: scenario_reused_out(tmp)),
            ("resume_nothing", lambda: scenario_resume_nothing(tmp)),
            ("bad_input", lambda: scenario_bad_input(tmp)),
            ("file_modes", lambda: scenario_file_modes(tmp)),
            *((f"interrupt_{h}", lambda h=h: scenario_interrupt(tmp, h)) for h in INTERRUPTS),
        ]
        for name, fn in steps:
            if name not in selected:
                continue
            log(f"scenario {name} ...")
            try:
                row = fn()
            except Exception as e:  # a scenario's own failure is a result, not a crash of the bench
                row = _row(name, False, f"{type(e).__name__}: {e}", 0.0)
            log(f"  {'ok ' if row['ok'] else 'FAILED'} {row['outcome']} ({row['seconds']:.1f} s)")
            rows.append(row)
    return {
        "fuzz_cases": fz.get("fuzz_cases"), "crashes": fz.get("crashes"), "hangs": fz.get("hangs"),
        "silent_corruptions": fz.get("silent_corruptions"), "unclear_errors": fz.get("unclear_errors"),
        "fuzz": fz or None, "generated": gen or None, "scenarios": rows, "all_ok": all(r["ok"] for r in rows),
    }  # fmt: skip


def format_faults(res: dict[str, Any]) -> str:
    lines = ["| scenario | ok | outcome | seconds |", "|---|---|---|---|"]
    for r in res["scenarios"]:
        lines.append(f"| {r['scenario']} | {'yes' if r['ok'] else 'NO'} | {r['outcome']} | {r['seconds']:.1f} |")
    return "\n".join(lines)
