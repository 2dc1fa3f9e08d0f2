"""What a run writes besides checkpoints: sample grids, plots (matplotlib, no torchvision), and
the units of ``report.json``."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np
import torch

from qoda.utils.atomic import atomic_write_bytes


def _pyplot() -> Any:
    """``matplotlib.pyplot``, imported on first use: workers that write no image (every rank but
    0, killed or short runs) start without it."""
    import matplotlib.pyplot as plt

    return plt


# The unit of every number in ``report.json`` (key -> unit); ``fid_history`` rows use the same keys.
REPORT_UNITS: dict[str, str] = {
    "steps": "iterations",
    "fid": "FID of the EMA generator (squared distance in fid_extractor's feature space; lower is better)",
    "fid_raw": "FID of the raw (non-averaged) generator, same features and samples as fid",
    "fid_samples": "generated images (and as many real ones) per FID",
    "ema_decay": "EMA decay cap (per update; warmed up as min(ema_decay, (1 + t) / (10 + t)))",
    "ema_updates": "EMA updates (one per iteration)",
    "bits_per_step": "bits sent per iteration per worker (payload)",
    "bytes_sent_per_step": "bytes sent per iteration per worker (payload and headers)",
    "compression_ratio": "fp32 bits / bits sent (x)",
    "seconds": "s, wall-clock of the training loop (evaluations and checkpoints included)",
    "seconds_per_step": "s per iteration, seconds / steps",
    "workers": "processes",
    "bits": "bits per coordinate on the wire (32: fp32, 16: fp16)",
    "parameters": "trainable parameters (generator and critic)",
    "exchanges_per_step": "exchanges per iteration",
    "step_seconds": "s per iteration, mean over the second half of the run",
    "compute_seconds": "s per iteration in computation (step minus encode, comm and decode), second-half mean",
    "encode_seconds": "s per iteration in quantization and encoding, second-half mean",
    "comm_seconds": "s per iteration in collectives, second-half mean",
    "decode_seconds": "s per iteration in decoding and accumulation, second-half mean",
    "quant_variance": "exact E||Q(g)-g||^2 / ||g||^2 of rank 0's gradient before the exchange, under the plan in "
    "use (dimensionless), mean over the log steps of the second half",
    "widths": "bits per coordinate of each compressed tensor at the end (others travel as float32)",
    "wire_bits_per_coordinate": "bits of one whole message of the final plan (codes, bucket norms, headers, "
    "uncompressed tensors) per coordinate; 32 without quantization; with coding = entropy its fixed-width size, "
    "an upper bound (bits_per_step is measured)",
    "skipped_steps": "iterations dropped by nonfinite = skip",
    "windows": "one row per logging window: step (iterations done), quant_variance (as quant_variance, at the "
    "window's last step), bits_per_coordinate (payload bits per coordinate per exchange, window mean)",
    "width_changes": "the widths (bits per coordinate per compressed tensor) from step (iterations done) on, one row "
    "per change",
    "step": "iterations",
    # --task lm
    "val_loss": "mean cross-entropy of the next byte on the held-out validation windows (nats per byte)",
    "val_perplexity": "exp(val_loss): perplexity per byte",
    "val_bits_per_byte": "val_loss / ln 2 (bits per byte)",
    "val_bytes": "predicted bytes per validation",
    "train_loss": "mean cross-entropy of rank 0's training batches over the last log window (nats per byte)",
    "train_seconds": "s, sum of the step times so far (evaluations and checkpoints excluded)",
}


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


def grid_tensor(images: torch.Tensor) -> torch.Tensor:
    """The grid of :func:`image_grid` as a ``(C, H', W')`` float tensor in ``[0, 1]`` (TensorBoard's CHW)."""
    return torch.from_numpy(image_grid(images)).permute(2, 0, 1).contiguous()


#: The image formats a grid is written in, by file suffix (case-insensitive); matplotlib hands
#: them to Pillow.  Lossless but JPEG.
GRID_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff"}


def grid_format(path: Path) -> str:
    """The format ``path``'s suffix names (:data:`GRID_FORMATS`); ``ValueError`` for any other suffix."""
    fmt = GRID_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix {Path(path).suffix or '(none)'!r}; use one of "
                         f"{', '.join(GRID_FORMATS)}")  # fmt: skip
    return fmt


def save_grid(images: torch.Tensor, path: Path, scale: int = 3) -> None:
    """Write the grid of ``images`` (in ``[-1, 1]``), each pixel ``scale`` x ``scale``, in the format
    ``path``'s suffix names (:func:`grid_format`)."""
    fmt = grid_format(path)
    grid = image_grid(images)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    plt = _pyplot()
    if grid.shape[2] == 1:
        plt.imsave(buf, grid[:, :, 0], cmap="gray", vmin=0, vmax=1, format=fmt)
    else:
        plt.imsave(buf, grid, format=fmt)
    atomic_write_bytes(buf.getvalue(), path)


def plot_curves(history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str) -> None:
    """Losses and the critic's Wasserstein estimate (left) and FID of the EMA and raw generators
    (right), against wall-clock seconds (top row) and against iterations (bottom row)."""
    from matplotlib.ticker import ScalarFormatter

    fig, axes = _pyplot().subplots(2, 2, figsize=(11, 7.5))
    for row, (xkey, xlabel) in enumerate((("seconds", "wall-clock seconds"), ("step", "iterations"))):
        a, b = axes[row]
        if history:
            x = [h[xkey] for h in history]
            for key, label in (("wasserstein", "W estimate E[D(x)]-E[D(G(z))]"), ("loss_g", "generator loss")):
                a.plot(x, [h[key] for h in history], label=label, lw=1)
            a.set_xlabel(xlabel)
            a.set_title(f"losses against {xlabel}")
            a.legend(fontsize=8)
        if evals:
            x = [e[xkey] for e in evals]
            b.plot(x, [e["fid"] for e in evals], "o-", label="EMA generator")
            if all("fid_raw" in e for e in evals):
                b.plot(x, [e["fid_raw"] for e in evals], "s--", label="raw generator")
            b.set_yscale("log")
            b.yaxis.set_major_formatter(ScalarFormatter())  # 150, not 1.5 x 10^2
            b.yaxis.set_minor_formatter(ScalarFormatter())
            b.set_xlabel(xlabel)
            b.set_ylabel(f"FID ({evals[-1]['fid_extractor']}, {evals[-1]['fid_samples']} samples)")
            b.set_title(f"FID against {xlabel}")
            b.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save_figure(fig, path)


def plot_lm_curves(history: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, title: str) -> None:
    """The language model's training loss (rank 0's batches) and validation loss, against
    wall-clock seconds (left) and iterations (right)."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    for ax, (xkey, xlabel) in zip(axes, (("seconds", "wall-clock seconds"), ("step", "iterations")), strict=True):
        if history:
            ax.plot([h[xkey] for h in history], [h["train_loss"] for h in history], lw=1, label="training batches")
        if evals:
            ax.plot([e[xkey] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy (nats per byte)")
        ax.set_title(f"loss against {xlabel}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG, atomically, and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _pyplot().close(fig)
    atomic_write_bytes(buf.getvalue(), path)
