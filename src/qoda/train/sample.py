"""Using a run's result: its generator, and grids of samples (``qoda sample``).

::

    from qoda.train.sample import load_generator, sample_images

    g = load_generator("runs/qoda")              # EMA generator of the last committed checkpoint
    x = sample_images(g, 16, seed=0)             # (16, C, 32, 32) images in [-1, 1]
    raw = load_generator("runs/qoda", ema=False) # the raw (non-averaged) generator

The checkpoint is read with the project's safe loader (:func:`qoda.train.checkpoint.read_file`,
``torch.load(weights_only=True)``): a damaged or foreign file is refused, never executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qoda.gan.models import LATENT, DCGANGenerator, ResNetGenerator
from qoda.train import checkpoint
from qoda.train.outputs import grid_format, save_grid

SAMPLE_SEED_OFFSET = 12345  # samples/*.png of a run use the latents of seed ``config.seed + 12345``


class RunError(ValueError):
    """``run_dir`` is not a run with a committed checkpoint (the message is one line)."""


def _generator(config: dict[str, Any], channels: int) -> nn.Module:
    model, width, norm = config.get("model", "dcgan"), int(config.get("width", 64)), config.get("norm", "group")
    if model == "dcgan":
        return DCGANGenerator(LATENT, width, channels, norm)
    if model == "resnet":
        return ResNetGenerator(LATENT, width, channels, norm)
    raise RunError(f"unknown model {model!r} in the checkpoint's config")


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The ``common.pt`` of the last committed checkpoint of the run in ``run_dir`` (models, EMA,
    config, history).  Raises :class:`RunError` when ``run_dir`` is missing, not a folder, or holds
    no committed checkpoint, and :class:`~qoda.train.checkpoint.CheckpointError` when it is damaged."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunError(f"{run_dir} does not exist (pass the --out folder of a qoda train run)")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is a file, not a run folder (pass the --out folder of a qoda train run)")
    for attempt in range(3):  # a running job may commit a newer checkpoint (and remove this one) meanwhile
        ptr = checkpoint.latest(run_dir)
        if ptr is None:
            raise RunError(f"{run_dir} holds no committed checkpoint (no checkpoints/latest.json): not a qoda train "
                           "run, or one stopped before its first checkpoint")  # fmt: skip
        try:
            common = checkpoint.read_file(checkpoint.checkpoint_root(run_dir) / ptr["dir"] / "common.pt")
        except checkpoint.CheckpointError:
            if attempt < 2 and checkpoint.latest(run_dir) != ptr:
                continue
            raise
        if isinstance(common.get("config"), dict) and common["config"].get("task") == "lm":
            raise RunError(f"{run_dir} is a language-model run (--task lm): it has no generator to sample; its "
                           "validation loss is in report.json")  # fmt: skip
        if not isinstance(common.get("config"), dict) or "ema" not in common or "generator" not in common:
            raise checkpoint.CheckpointError(f"checkpoint of {run_dir} at step {ptr['step']} holds no generator")
        return common
    raise AssertionError("unreachable")


def generator_from_checkpoint(common: dict[str, Any], ema: bool = True) -> nn.Module:
    """The generator of a loaded ``common.pt`` (:func:`load_checkpoint`), in eval mode on the CPU."""
    state = common["ema" if ema else "generator"]
    channels = [int(common["channels"])] if "channels" in common else [1, 3]  # older checkpoints: try both
    for c in channels:
        gen = _generator(common["config"], c)
        try:
            gen.load_state_dict(state)
        except RuntimeError:
            if c == channels[-1]:
                raise checkpoint.CheckpointError(
                    "the checkpoint's generator does not match its config (model, width, norm)"
                ) from None
            continue
        return gen.requires_grad_(False).eval()
    raise AssertionError("unreachable")


def load_generator(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> nn.Module:
    """The generator of the run in ``run_dir`` (``qoda train --out``) at its last committed checkpoint.

    ``ema=True`` (default): the exponential moving average of the generator's weights, the one
    ``samples/final.png`` and ``fid`` show; ``ema=False``: the raw generator (``final_raw.png``,
    ``fid_raw``).  Returned in eval mode, without gradients, on ``device``; it maps ``(N, 128)``
    standard normal latents to ``(N, C, 32, 32)`` images in ``[-1, 1]``.  Raises :class:`RunError`
    or :class:`~qoda.train.checkpoint.CheckpointError` with a one-line message."""
    return generator_from_checkpoint(load_checkpoint(run_dir), ema).to(device)


@torch.no_grad()
def sample_images(generator: nn.Module, n: int, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """``n`` images of ``generator`` from the latents of ``seed`` (CPU stream), in ``[-1, 1]``, on the CPU."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    z = torch.randn(n, LATENT, generator=torch.Generator().manual_seed(seed))
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        return torch.cat([generator(z[i : i + batch_size].to(device)).cpu() for i in range(0, n, batch_size)])
    finally:
        generator.train(was_training)


def write_sample_grid(run_dir: str | Path, out: str | Path, n: int = 64, raw: bool = False,
                      seed: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Write a grid of ``n`` samples of the run's EMA (or ``raw``) generator to ``out``, in the format
    its suffix names (PNG, JPEG, BMP, TIFF: :data:`~qoda.train.outputs.GRID_FORMATS`), into a folder
    that exists (it is not created: a mistyped path is refused, not silently made).

    ``seed`` defaults to the run's own sample seed, so ``n = 64`` redraws ``samples/final.png``
    (``final_raw.png`` with ``raw``) of a finished run.  Returns what was drawn (step, seed, ...)."""
    if n < 1:
        raise ValueError(f"--n: must be >= 1, got {n}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the image file to write")
    if not out.parent.is_dir():
        what = "is not a folder" if out.parent.exists() else "does not exist"
        raise ValueError(f"--out {out}: its folder {out.parent} {what} (it is not created)")
    try:
        grid_format(out)
    except ValueError as e:
        raise ValueError(f"--out {e}") from None
    common = load_checkpoint(run_dir)
    if seed is None:
        seed = int(common["config"].get("seed", 0)) + SAMPLE_SEED_OFFSET
    gen = generator_from_checkpoint(common, ema=not raw)
    save_grid(sample_images(gen, n, seed), out)
    return {"step": int(common["step"]), "n": n, "seed": seed, "generator": "raw" if raw else "EMA", "out": str(out)}
