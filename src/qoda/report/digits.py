"""A small CNN on scikit-learn's 8x8 digits (1,797 real images shipped inside scikit-learn).

Used as the source of real gradients for the default report until the GAN trainer exists.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); images scaled to [0, 1], shape (N, 1, 8, 8), 80/20 split."""
    from sklearn.datasets import load_digits  # reads the CSV inside the sklearn package

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class DigitsCNN(nn.Module):
    """conv(1->32) - conv(32->64) - pool - linear(1024->128) - linear(128->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
