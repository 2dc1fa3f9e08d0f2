import argparse
import json
import os
import signal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qoda.cli import main


def test_report_job_writes_results(tmp_path, capsys):
    assert main(["report", "--steps", "4", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").read_text().startswith("qoda quantization report")
    schemes = {r["scheme"] for r in res["rows"]}
    assert {"qsgd-4b", "nuqsgd-4b", "qsgd-inf-4b"} <= schemes
    for r in res["rows"]:
        assert 0 <= r["normalized_variance"] <= r["eps_q_bound"] + 1e-9
        if r["coding"] == "fixed":
            assert r["bits_per_coord"] <= r["bits_per_coord_bound"] + 1e-9
    assert "bits/coord" in capsys.readouterr().out


def test_bench_codec_json(tmp_path, monkeypatch):
    monkeypatch.setenv("QODA_DEVICE_CODEC_EAGER", "1")  # the device row's ops without their compilation
    path = tmp_path / "codec.json"
    assert main(["bench", "codec", "--numel", "50000", "--repeats", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    for key in ("memcpy_gbps", "encode_gbps", "decode_gbps", "allocator"):
        assert key in res
    assert {(r["coding"], r["bits"]) for r in res["rows"]} >= {("fixed", 4), ("entropy", 4)}
    assert all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in res["rows"] + res["device_rows"])
    assert res["device_rows"][0]["path"] == "device (cpu, eager)"


def test_gpu_benchmarks_say_no_cuda_and_exit_3(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from qoda.bench import hooks

    assert main(["bench", "codec", "--device", "cuda"]) == 3
    with pytest.raises(SystemExit) as e:
        hooks.main(["--backend", "nccl"])
    assert e.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("no CUDA device on this machine" in line for line in err)


def test_bench_entropy_json(tmp_path):
    path = tmp_path / "entropy.json"
    assert main(["bench", "entropy", "--numel", "20000", "--repeats", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    measured = [r for r in res["rows"] if "encode_gbps" in r]  # constriction is optional: unavailable row
    assert len(measured) >= 4 and all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in measured)
    assert all("unavailable" in r or "encode_gbps" in r for r in res["rows"])


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["report", "--steps", "0"], "--steps"),
        (["report", "--bucket-size", "x"], "--bucket-size"),
        (["bench", "codec", "--numel", "-3"], "--numel"),
        (["bench", "codec", "--numel", "0"], "--numel"),
        (["bench", "codec", "--bucket-size", str(1 << 21)], "--bucket-size"),
        (["bench", "entropy", "--bits", "1"], "--bits"),
        (["bench", "entropy", "--bits", "13"], "--bits"),
    ],
)
def test_bad_options_name_the_option(argv, field, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert field in err
    assert err.count(field + ":") == 1, err  # named once: "argument --numel: must be >= 1", not doubled


def test_no_option_parser_names_its_option():
    """argparse prefixes a type parser's message with the option ("argument --numel: ..."), so no
    ``type=`` of any qoda parser may name it again: every parser's messages, on bad text."""
    from qoda.cli import build_parser

    def actions(parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from actions(sub)
            elif callable(a.type) and a.option_strings:
                yield a

    checked = 0
    for a in actions(build_parser()):
        for text in ("0", "-1", "x", "1e9", str(1 << 40)):
            try:
                a.type(text)
            except argparse.ArgumentTypeError as e:
                checked += 1
                assert not any(o in str(e) for o in a.option_strings), (a.option_strings, str(e))
            except (ValueError, TypeError):
                pass
    assert checked >= 20


def _no_process_starts(monkeypatch) -> list[str]:
    """Replace every way ``qoda train`` starts training (in-process, spawned, torchrun) by a
    recorder: the list of what was started."""
    from qoda.train import launch

    started: list[str] = []
    monkeypatch.setattr(launch, "_train_here", lambda cfg: started.append("here"))
    monkeypatch.setattr(launch, "_train_spawned", lambda cfg: started.append("spawned"))
    monkeypatch.setattr(launch, "run_worker", lambda *a, **k: started.append("worker"))
    return started


def _quantizing() -> list[str]:
    from qoda.train.compressions import COMPRESSIONS

    return [n for n, s in COMPRESSIONS.items() if s.quantized]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("compression", _quantizing())
def test_train_bits_1_is_refused_in_one_line_before_any_process_starts(compression, workers, tmp_path, capsys,
                                                                       monkeypatch):  # fmt: skip
    from qoda.train.config import BITS_RANGE

    started = _no_process_starts(monkeypatch)
    out = tmp_path / "run"
    argv = ["train", "--bits", "1", "--compression", compression, "--workers", workers, "--out", str(out)]
    assert main(argv) == 2
    assert _one_line(capsys) == f"qoda train: error: bits: must be {BITS_RANGE}; got 1"
    assert started == [] and not out.exists()


def test_train_bits_1_as_a_command_exits_2_with_one_line(tmp_path):
    """The real command, 2 workers: one line on stderr, exit 2, no worker started (no run folder)."""
    import subprocess
    import sys

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "qoda.cli", "train", "--bits", "1", "--compression", "nuqsgd",
                        "--workers", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("qoda train: error: bits: must be "), r.stderr
    assert not out.exists()


def _bits_allowed(bits: float, compression: str, allocation: str) -> bool:
    """The documented rule, written out independently: one width per tensor is an integer in
    2..8; with bit allocation dp (explicit, or auto for layerwise_adaptive with a fraction) the
    average budget is a number in (2, 8], and dp needs an adaptive compression."""
    adaptive = compression in ("global_adaptive", "layerwise_adaptive")
    integer = float(bits).is_integer()
    dp = allocation == "dp" or (allocation == "auto" and compression == "layerwise_adaptive" and not integer)
    if dp:
        return adaptive and 2 < bits <= 8
    return integer and 2 <= bits <= 8


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bits=st.one_of(st.integers(-3, 20), st.floats(-2, 12, allow_nan=False).map(lambda x: round(x, 2)),
                   st.sampled_from([1.0, 2.0, 8.0, 8.01, 2.0001, 1e9])),
    compression=st.sampled_from(_quantizing()),
    allocation=st.sampled_from(["auto", "uniform", "dp"]),
    workers=st.sampled_from(["1", "2"]),
)  # fmt: skip
def test_train_generated_bits_values_are_refused_before_any_process_or_accepted(
    bits, compression, allocation, workers, tmp_path, capsys, monkeypatch
):
    """Every --bits value: refused in one line with exit 2 before anything starts, exactly when
    the documented rule says so; otherwise training starts (a dp budget below what the model's
    plan needs is the one other refusal, also before anything starts)."""
    started = _no_process_starts(monkeypatch)
    out = tmp_path / "run"
    argv = ["train", "--bits", repr(bits), "--compression", compression, "--bit-allocation", allocation,
            "--workers", workers, "--out", str(out)]  # fmt: skip
    rc = main(argv)
    if rc == 0:
        assert _bits_allowed(bits, compression, allocation), argv
        assert len(started) == 1
        return
    err = _one_line(capsys)
    assert rc == 2 and started == [] and not out.exists(), (argv, err)
    if _bits_allowed(bits, compression, allocation):
        assert "cannot hold this plan" in err, (argv, err)
    elif allocation == "dp" and compression not in ("global_adaptive", "layerwise_adaptive"):
        assert err.startswith("qoda train: error: bit_allocation: 'dp' fits levels per width"), (argv, err)
    else:
        assert err.startswith("qoda train: error: bits: must be "), (argv, err)


def test_the_bits_range_is_stated_once_from_the_config(capsys):
    """--help, the error and docs/training.md state the range of --bits from one constant."""
    from pathlib import Path

    from qoda.quant.allocation import WIDTHS
    from qoda.train.config import BITS_MAX, BITS_MIN, BITS_RANGE

    assert (min(WIDTHS), max(WIDTHS)) == (BITS_MIN, BITS_MAX)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert BITS_RANGE in help_text and f"per-tensor widths ({BITS_MIN}..{BITS_MAX})" in help_text
    docs = " ".join((Path(__file__).parents[1] / "docs" / "training.md").read_text().split())
    assert BITS_RANGE in docs


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bits", "12"], "qoda train: error: bits: must be an integer in 2..8; with bit allocation dp"),
        (["--bits", "1", "--compression", "qsgd"], "qoda train: error: bits: must be an integer in 2..8; with bit"),
        (["--optimizer", "sgd"], "qoda train: error: optimizer: expected one of"),
        (["--compression", "zip"], "qoda train: error: compression: expected one of"),
        (["--dataset", "cifar10"], "qoda train: error: data_root:"),
        (["--lr-d", "-1"], "qoda train: error: lr_d: must be > 0"),
        (["--qoda-scope", "coordinate"], "qoda train: error: qoda_scope: an option of QODA's analysed"),
    ],
)
def test_train_rejects_bad_options_in_one_line(argv, needle, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(needle) and "\n" not in err, err


def test_train_cli_argparse_types_and_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "many"])
    assert e.value.code == 2
    assert "--steps: invalid int value: 'many'" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text('{"bits": 3, "optimizer": "nope"}')
    assert main(["train", "--config", str(cfg), "--optimizer", "qoda", "--bits", "99"]) == 2
    assert "bits: must be an integer in 2..8; with bit allocation dp an average budget in (2, 8]" in (
        capsys.readouterr().err)  # fmt: skip


def test_train_cli_runs_and_refuses_to_resume_another_config(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--dataset", "digits", "--width", "8", "--batch-size", "8", "--steps", "2",
              "--fid-samples", "10", "--out", str(out), "--no-progress", "--compression", "qsgd"]  # fmt: skip
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert "samples:" in printed and "report:" in printed and "plots:" in printed
    assert " EMA, raw generator " in printed and "final_raw.png (raw)" in printed
    assert json.loads((out / "report.json").read_text())["steps"] == 2
    assert main([*common, "--resume", "--bits", "8", "--steps", "4"]) == 2
    assert "different config: bits=4 (now 8)" in capsys.readouterr().err


def test_bench_e2e_and_scaling_name_bad_inputs(tmp_path, capsys):
    assert main(["bench", "e2e", "--configs", "fp64", "--json", str(tmp_path / "e.json")]) == 2
    assert "--configs: unknown ['fp64']" in capsys.readouterr().err
    assert main(["bench", "scaling", "--e2e", str(tmp_path / "none.json"), "--json", str(tmp_path / "s.json")]) == 2
    assert "none.json not found (run `qoda bench e2e` first)" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "s.json").exists()


# ------------------------------------------------------------------------------------ run folders and bad input
TINY_TRAIN = ["train", "--dataset", "digits", "--width", "8", "--batch-size", "8", "--fid-samples", "10",
              "--no-progress", "--compression", "qsgd", "--checkpoint-every", "2", "--log-every", "2"]  # fmt: skip


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_train_refuses_unusable_out_resume_and_device_in_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--out", str(tmp_path / "a-file")], f"qoda train: error: --out {tmp_path / 'a-file'} is an existing file"),
        (["--out", str(tmp_path / "none"), "--resume"], "qoda train: error: --resume: "),
        (["--out", str(tmp_path / "empty"), "--resume"], "holds no qoda run"),
        (["--out", str(tmp_path / "x"), "--resume", "--overwrite"], "qoda train: error: overwrite: cannot be combined"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--out", str(tmp_path / "c"), "--device", "cuda"], "qoda train: error: device: 'cuda'"))
    for argv, needle in cases:
        assert main([*TINY_TRAIN, "--steps", "2", *argv]) == 2, argv
        assert needle in _one_line(capsys), argv
    assert not (tmp_path / "none").exists() and not any((tmp_path / "empty").iterdir())


def test_train_refuses_a_reused_out_and_overwrite_replaces_only_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an empty existing folder is fine
    run = [*TINY_TRAIN, "--steps", "2", "--out", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    (out / "samples" / "mine.png").write_bytes(b"mine")
    events = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    common = (out / "checkpoints" / "step-0000002" / "common.pt").read_bytes()
    assert main([*run, "--steps", "4"]) == 2
    assert _one_line(capsys) == (
        f"qoda train: error: --out {out} already holds a run (checkpoint at step 2); use --resume to continue it, "
        "a new --out, or --overwrite to replace it"
    )
    assert sorted((out / "tensorboard").glob("events.out.tfevents.*")) == events and len(events) == 1
    assert (out / "checkpoints" / "step-0000002" / "common.pt").read_bytes() == common
    assert main([*run, "--steps", "4", "--overwrite"]) == 0
    new_events = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(new_events) == 1 and new_events != events
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert json.loads((out / "report.json").read_text())["steps"] == 4
    assert (out / "notes.txt").read_text() == "mine" and (out / "samples" / "mine.png").exists()
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000004"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_train_signal_in_a_single_process_run_stops_in_one_line_and_resumes(tmp_path, capsys, monkeypatch, sig, code):
    from qoda.train import checkpoint

    real = checkpoint.save

    def save_then_signal(out, step, *args, **kwargs):
        real(out, step, *args, **kwargs)
        if step == 2:  # delivered to this very process, inside the training loop
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler), "no handler installed"
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(checkpoint, "save", save_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    run = [*TINY_TRAIN, "--steps", "6", "--out", str(tmp_path / "run")]
    assert main(run) == code
    assert _one_line(capsys) == (
        f"qoda train: interrupted ({signal.Signals(sig).name}) at step 2; last committed checkpoint: step 2; rerun "
        "the same command with --resume"
    )
    assert signal.getsignal(signal.SIGTERM) is previous  # the launcher's handlers are gone again
    monkeypatch.undo()
    assert main([*run, "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == 6


def _train_parser():
    import argparse

    from qoda.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_train_help_has_every_option_with_help_choices_and_one_default(capsys):
    from dataclasses import fields

    from qoda.cli import train_choices
    from qoda.train.config import ALIASES, ConfigError, TrainConfig

    names = [f.name for f in fields(TrainConfig)]
    assert all(f.metadata.get("help") for f in fields(TrainConfig))  # no option without help
    actions = {a.dest: a for a in _train_parser()._actions if a.dest != "help"}
    assert set(actions) == {*names, "config"}
    for name, a in actions.items():
        assert a.help and len(a.help) > 15, name
        assert a.help.lower().count("default") <= 1, (name, a.help)  # the default is stated once
    former = {new: "--" + old.replace("_", "-") for old, new in ALIASES.items()}  # still accepted
    for f in fields(TrainConfig):
        a = actions[f.name]
        if isinstance(f.default, bool):  # a flag, named for what it does
            flag = "--no-" + f.name.replace("_", "-") if f.default else "--" + f.name.replace("_", "-")
            assert a.option_strings == [flag, *([former[f.name]] if f.name in former else [])]
            assert "default:" not in a.help
        elif f.default is not None:
            assert a.help.count("(default: ") == 1, f.name
    for name, choices in train_choices().items():
        assert actions[name].metavar == "{" + ",".join(choices) + "}", name
        for c in choices:  # every choice shown is one the config accepts (other constraints may still apply)
            try:
                TrainConfig(**{name: c})
            except ConfigError as e:
                assert not str(e).startswith(f"{name}: expected"), e
        with pytest.raises(ConfigError, match=f"^{name}: expected"):
            TrainConfig(**{name: "no-such-value"})
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--no-progress" in text and "--progress " not in text and "SUPPRESS" not in text
    assert "--data-\n" not in text  # option names are not broken across lines
    assert "(default: 0.5 0.9)" in text and "(default: 0.0002)" in text


def test_overwrite_clears_the_raw_samples_and_keeps_the_users_files(tmp_path):
    from qoda.train import rundir

    s = tmp_path / "samples"
    s.mkdir()
    for name in ("final.png", "final_raw.png", "step-0000002.png", "step-0000002_raw.png", "mine.png"):
        (s / name).write_bytes(b"png")
    rundir.clear(tmp_path)
    assert [p.name for p in s.iterdir()] == ["mine.png"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["vi", "--methods", "lion"], "qoda vi: --methods: unknown method 'lion'"),
        (["vi", "--bits", "1"], "qoda vi: --bits:"),
        (["bench", "variance", "--budgets", "9"], "qoda bench variance: --budgets:"),
        (["bench", "faults", "--pg-timeout", "0"], "qoda bench faults: --pg-timeout"),
        (["bench", "comm", "--numel", "1000"], "qoda bench comm: --numel"),
    ],
)
def test_value_errors_after_parsing_exit_2_in_one_line(argv, needle, capsys):
    """One convention for bad options, whoever finds them (argparse or the command): one line, exit 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(needle) and "\n" not in err, err


def test_the_former_overlap_option_still_reads_as_player_threads(tmp_path):
    from qoda.train.config import TrainConfig

    args = _train_parser().parse_args(["--overlap"])
    assert args.player_threads is True
    (tmp_path / "c.json").write_text('{"overlap": true}')
    assert TrainConfig.from_file(tmp_path / "c.json").player_threads is True
