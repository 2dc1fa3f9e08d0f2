"""``qoda train --task lm``: the byte-level transformer through DDP and its communication hooks,
2 processes: the loss falls, resume is bit-exact with several DDP buckets, bad options are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tests.distributed import run, values

from qoda.cli import main
from qoda.lm.corpus import load_corpus, split, windows
from qoda.train import checkpoint
from qoda.train.config import ConfigError, TrainConfig
from qoda.train.trainer import run_worker


def lm_config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(task="lm", lm_dim=64, lm_layers=1, lm_heads=2, lm_context=16, batch_size=8, steps=6, eval_every=2,
                log_every=2, checkpoint_every=3, val_windows=16, lr=3e-3, out=str(tmp_path / "run"), progress=False,
                timeout_seconds=60.0, ddp_bucket_mb=0.05, refit_steps=(0, 4), hook_start_iter=2)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _train(rank, world, cfg):
    return run_worker(cfg, rank, world)


def _state(out: Path, rank: int):
    ptr = checkpoint.latest(out)
    d = out / "checkpoints" / ptr["dir"]
    common, mine = checkpoint.read_file(d / "common.pt"), checkpoint.read_file(d / f"rank-{rank}.pt")
    return {k: common[k] for k in ("model", "optimizer", "step")}, mine


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if not str(k).endswith("seconds"):  # wall-clock costs differ; everything else is exact
                _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "get_state"):  # PowerSGD's NumPy RandomState
        _assert_same(a.get_state()[1].tolist(), b.get_state()[1].tolist(), path)
    else:
        assert a == b, path


@pytest.mark.parametrize(("optimizer", "compression", "extra"), [
    ("qoda", "layerwise_adaptive", {"bits": 3, "bit_allocation": "dp"}),
    ("adamw", "powersgd", {"weight_decay": 0.01}),
])  # fmt: skip
def test_lm_trains_on_two_processes_and_resumes_bit_exactly(tmp_path, capsys, optimizer, compression, extra):
    """6 steps straight == 3 steps, stop, resume to 6; the validation loss falls from ln 256."""
    kw = dict(optimizer=optimizer, compression=compression, **extra)
    full = lm_config(tmp_path, out=str(tmp_path / "full"), **kw)
    report, none = values(run(_train, 2, full, timeout=240))
    assert none is None
    part = lm_config(tmp_path, out=str(tmp_path / "part"), **kw)
    values(run(_train, 2, part.replace(steps=3), timeout=240))
    values(run(_train, 2, part.replace(resume=True), timeout=240))
    for rank in (0, 1):
        (a, ra), (b, rb) = _state(tmp_path / "full", rank), _state(tmp_path / "part", rank)
        _assert_same(a, b)
        _assert_same(ra, rb, f"rank-{rank}")
    losses = [e["val_loss"] for e in report["val_history"]]
    assert [e["step"] for e in report["val_history"]] == [2, 4, 6]
    assert losses[-1] < losses[0] < math.log(256) + 0.5 and report["val_loss"] == losses[-1]
    assert report["val_perplexity"] == pytest.approx(math.exp(losses[-1]))
    out = tmp_path / "full"
    saved = json.loads((out / "report.json").read_text())
    numeric = {k for k, v in saved.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert numeric <= set(saved["units"]), numeric - set(saved["units"])
    assert (out / "curves.png").stat().st_size > 1000 and list((out / "tensorboard").glob("events.*"))
    assert main(["sample", "--run", str(out), "--out", str(tmp_path / "g.png")]) == 2  # no generator to sample
    assert "language-model run" in capsys.readouterr().err
    # fp32 for 2 steps (the hook's or PowerSGD's start), then compressed: 4 of the 6 steps
    assert 32 * report["parameters"] * 2 < report["bits_per_step"] * 6 < 32 * report["parameters"] * 2.5
    if compression == "layerwise_adaptive":  # the hook's DP widths per tensor, on the transformer's layers
        hook = ra["hook"]["qoda"]
        assert len(hook["layout"]) > 1  # several DDP buckets
        widths = saved["widths"]
        assert set(widths.values()) <= set(range(2, 9)) and len(set(widths.values())) > 1
        assert {"embed.weight", "head.weight", "encoder.layers.0.linear1.weight"} <= set(widths)
        assert 2.0 < saved["wire_bits_per_coordinate"] <= 3.0
        # per-window evidence: the compressed windows carry the hook's variance and bits; the widths'
        # history ends at the final widths and survives the resume (the resumed run's report is equal)
        compressed = [w for w in saved["windows"] if "bits_per_coordinate" in w]
        assert compressed and all(0 < w["quant_variance"] < 1 and 2.0 < w["bits_per_coordinate"] <= 3.0
                                  for w in compressed)  # fmt: skip
        assert saved["width_changes"] and saved["width_changes"][-1]["widths"] == widths
        resumed = json.loads((tmp_path / "part" / "report.json").read_text())
        assert resumed["width_changes"] == saved["width_changes"]


def test_lm_corpus_split_holds_out_its_end():
    data = load_corpus(1 << 16)
    train, val = split(data)
    assert train.numel() + val.numel() == data.numel() and torch.equal(val, data[train.numel() :])
    x, y = windows(val, 16, 4)
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1, 0], val[16].long())


def test_lm_options_are_checked(tmp_path, capsys):
    cases = [
        ({"task": "lm", "dataset": "digits"}, "^dataset: an option of --task gan"),
        ({"task": "lm", "lr_g": 1e-3}, "^lr_g: an option of --task gan"),
        ({"task": "lm", "optimizer": "extra_adam"}, "^optimizer: --task lm trains with adamw or qoda"),
        ({"task": "lm", "nonfinite": "skip"}, "^nonfinite"),
        ({"task": "lm", "lm_dim": 30, "lm_heads": 4}, "^lm_heads: must divide"),
        ({"task": "lm", "optimizer": "qoda", "weight_decay": 0.1}, "^weight_decay"),
        ({"lm_dim": 64}, "^lm_dim: an option of --task lm"),
        ({"optimizer": "adamw"}, "^optimizer: adamw trains --task lm only"),
        ({"task": "mlp"}, "^task"),
    ]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig(**kw)
    # the command line: one line, exit code 2, before any worker starts
    for argv, msg in ((["--task", "lm", "--fid-samples", "100"], "fid_samples: an option of --task gan"),
                      (["--task", "lm", "--optimizer", "qgenx"], "optimizer: --task lm"),
                      (["--task", "lm", "--compression", "layerwise_adaptive", "--bit-allocation", "dp", "--bits",
                        "2.01"], "bits")):  # fmt: skip
        assert main(["train", *argv, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
