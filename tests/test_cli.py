import json

import pytest

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


def test_bench_codec_json(tmp_path):
    path = tmp_path / "codec.json"
    assert main(["bench", "codec", "--numel", "50000", "--repeats", "1", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    for key in ("memcpy_gbps", "encode_gbps", "decode_gbps", "allocator"):
        assert key in res
    assert {(r["coding"], r["bits"]) for r in res["rows"]} >= {("fixed", 4), ("entropy", 4)}
    assert all(r["encode_gbps"] > 0 and r["decode_gbps"] > 0 for r in res["rows"])


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["report", "--steps", "0"], "--steps"),
        (["report", "--bucket-size", "x"], "--bucket-size"),
        (["bench", "codec", "--numel", "-3"], "--numel"),
    ],
)
def test_bad_options_name_the_option(argv, field, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bits", "12"], "qoda train: error: bits: must be an integer in 1..8, got 12"),
        (["--optimizer", "sgd"], "qoda train: error: optimizer: expected one of"),
        (["--compression", "zip"], "qoda train: error: compression: expected one of"),
        (["--dataset", "cifar10"], "qoda train: error: data_root:"),
        (["--lr-d", "-1"], "qoda train: error: lr_d: must be > 0"),
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
    assert "bits: must be an integer in 1..8, got 99" in capsys.readouterr().err


def test_train_cli_runs_and_refuses_to_resume_another_config(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--dataset", "digits", "--width", "8", "--batch-size", "8", "--steps", "2",
              "--fid-samples", "10", "--out", str(out), "--no-progress", "--compression", "qsgd"]  # fmt: skip
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert "samples:" in printed and "report:" in printed and "plots:" in printed
    assert json.loads((out / "report.json").read_text())["steps"] == 2
    assert main([*common, "--resume", "--bits", "8", "--steps", "4"]) == 2
    assert "different config: bits=4 (now 8)" in capsys.readouterr().err


def test_bench_e2e_and_scaling_name_bad_inputs(tmp_path, capsys):
    assert main(["bench", "e2e", "--configs", "fp64", "--json", str(tmp_path / "e.json")]) == 2
    assert "--configs: unknown ['fp64']" in capsys.readouterr().err
    assert main(["bench", "scaling", "--e2e", str(tmp_path / "none.json"), "--json", str(tmp_path / "s.json")]) == 2
    assert "none.json not found (run `qoda bench e2e` first)" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "s.json").exists()
