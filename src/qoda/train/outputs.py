"""What a run writes besides checkpoints: sample grids, plots (matplotlib, no torchvision)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from qoda.utils.atomic import atomic_write_bytes


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in ``[-1, 1]`` into one ``(H', W', C)`` array in ``[0, 1]``."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = x[
            i
        ].transpose(1, 2, 0)
    return grid


def save_grid(images: torch.Tensor, path: Path, scale: int = 3) -> None:
    grid = image_grid(images)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    if grid.shape[2] == 1:
        plt.imsave(buf, grid[:, :, 0], cmap="gray", vmin=0, vmax=1, format="png")
    else:
        plt.imsave(buf, grid, format="png")
    atomic_write_bytes(buf.getvalue(), path)


def plot_curves(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    """Losses and the critic's Wasserstein estimate against time; FID against time."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if history:
        t = [h["seconds"] for h in history]
        for key, label in (("wasserstein", "W estimate E[D(x)]-E[D(G(z))]"), ("loss_g", "generator loss")):
            a.plot(t, [h[key] for h in history], label=label, lw=1)
        a.set_xlabel("wall-clock seconds")
        a.set_title("losses")
        a.legend(fontsize=8)
    if evals:
        b.plot([e["seconds"] for e in evals], [e["fid"] for e in evals], "o-")
        b.set_yscale("log")
        b.set_xlabel("wall-clock seconds")
        b.set_ylabel(f"FID ({evals[-1]['fid_extractor']}, {evals[-1]['fid_samples']} samples)")
        b.set_title("FID of the EMA generator")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
