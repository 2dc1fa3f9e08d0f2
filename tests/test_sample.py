"""Using a run's result: ``load_generator`` and ``qoda sample`` on a tiny finished run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qoda.cli import main
from qoda.train import checkpoint
from qoda.train.config import TrainConfig
from qoda.train.sample import generator_from_checkpoint, load_checkpoint, load_generator, sample_images
from qoda.train.trainer import run_worker


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "run"
    cfg = TrainConfig(dataset="digits", width=8, batch_size=8, steps=4, fid_samples=10, eval_every=4,
                      sample_every=4, checkpoint_every=4, log_every=2, compression="none", lr_g=1e-3, lr_d=1e-3,
                      out=str(out), progress=False, timeout_seconds=60.0)  # fmt: skip
    run_worker(cfg, 0, 1)
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255


def test_load_generator_returns_the_checkpointed_generators(run_dir):
    common = checkpoint.read_file(run_dir / "checkpoints" / "step-0000004" / "common.pt")
    ema, raw = load_generator(run_dir), load_generator(str(run_dir), ema=False)
    for gen, key in ((ema, "ema"), (raw, "generator")):
        assert not gen.training and not any(p.requires_grad for p in gen.parameters())
        state = gen.state_dict()
        assert state.keys() == common[key].keys() and all(torch.equal(state[k], common[key][k]) for k in state)
    assert not all(torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters(), strict=True))
    x = sample_images(ema, 5, seed=1)
    assert x.shape == (5, 1, 32, 32) and float(x.abs().max()) <= 1.0
    assert torch.equal(x, sample_images(ema, 5, seed=1)) and not torch.equal(x, sample_images(ema, 5, seed=2))
    # checkpoints of earlier versions do not record the image channels: found from the weights
    del common["channels"]
    assert torch.equal(generator_from_checkpoint(common)(torch.zeros(1, 128)), ema(torch.zeros(1, 128)))


def test_qoda_sample_redraws_the_runs_grids_and_draws_others(run_dir, tmp_path, capsys):
    assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "ema.png")]) == 0
    assert "64 samples of the EMA generator" in capsys.readouterr().out
    assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "raw.png"), "--raw"]) == 0
    for mine, theirs in (("ema.png", "final.png"), ("raw.png", "final_raw.png")):  # same weights, same latents
        a, b = _pixels(tmp_path / mine), _pixels(run_dir / "samples" / theirs)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1.5 / 255, mine
    out = tmp_path / "ten.png"
    assert main(["sample", "--run", str(run_dir), "--n", "10", "--seed", "3", "--out", str(out)]) == 0
    assert _pixels(out).shape == (3 * (3 * 34 + 2), 3 * (4 * 34 + 2))  # 10 tiles: 3 rows of 4, 3x upscaled


def test_qoda_sample_refuses_bad_input_in_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    common = damaged / "checkpoints" / "step-0000004" / "common.pt"
    common.write_bytes(common.read_bytes()[:3000])
    cases = [
        (["--run", str(tmp_path / "none")], f"--run {tmp_path / 'none'} does not exist"),
        (["--run", str(tmp_path / "empty")], f"--run {tmp_path / 'empty'} holds no committed checkpoint"),
        (["--run", str(tmp_path / "file")], "is a file, not a run folder"),
        (["--run", str(damaged)], "common.pt is damaged or not a checkpoint"),
        (["--run", str(run_dir), "--n", "0"], "--n: must be >= 1, got 0"),
        (["--run", str(run_dir), "--out", str(tmp_path)], "is a folder; name the image file"),
        (["--run", str(run_dir), "--out", str(tmp_path / "file" / "x.png")],
         f"--out {tmp_path / 'file' / 'x.png'}: its folder {tmp_path / 'file'} is not a folder"),
        (["--run", str(run_dir), "--out", str(tmp_path / "nonexistent_dir" / "x.png")],
         f"--out {tmp_path / 'nonexistent_dir' / 'x.png'}: its folder {tmp_path / 'nonexistent_dir'} does not exist"),
        (["--run", str(run_dir), "--out", str(tmp_path / "x.gif")], "unknown image suffix '.gif'; use one of .png"),
        (["--run", str(run_dir), "--out", str(tmp_path / "x")], "unknown image suffix '(none)'"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert main(["sample", *argv, *([] if "--out" in argv else ["--out", str(tmp_path / "g.png")])]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("qoda sample: error: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "nonexistent_dir").exists()
    assert not (tmp_path / "x.gif").exists() and not (tmp_path / "x").exists()
    with pytest.raises(Exception, match="holds no committed checkpoint"):
        load_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize(("suffix", "pil_format", "lossless"),
                         [(".jpg", "JPEG", False), (".JPEG", "JPEG", False), (".bmp", "BMP", True),
                          (".tiff", "TIFF", True), (".tif", "TIFF", True)])  # fmt: skip
def test_qoda_sample_writes_the_format_its_suffix_names(run_dir, tmp_path, suffix, pil_format, lossless):
    png, other = tmp_path / "g.png", tmp_path / f"g{suffix}"
    for out in (png, other):
        assert main(["sample", "--run", str(run_dir), "--n", "9", "--out", str(out)]) == 0
    assert Image.open(png).format == "PNG" and Image.open(other).format == pil_format
    a, b = _pixels(png), _pixels(other)
    assert a.shape == b.shape
    # lossless formats hold the PNG's 8-bit pixels; JPEG's error is bounded on average
    assert np.abs(a - b).max() == 0 if lossless else np.abs(a - b).mean() < 0.05
