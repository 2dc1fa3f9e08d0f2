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
