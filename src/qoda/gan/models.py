"""WGAN-GP generators and critics.

* :class:`ResNetGenerator` / :class:`ResNetCritic`: the ResNet pair of the published WGAN-GP
  experiments (latent 128, 128 filters, 32x32 images; docs/method.md section 5), with GroupNorm(1, C)
  in place of BatchNorm for data parallelism (``norm="group"``, the default) or BatchNorm.
* :class:`DCGANGenerator` / :class:`DCGANCritic`: a small DCGAN-style pair for CPU runs.
"""

from __future__ import annotations

import torch
from torch import nn

LATENT = 128


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(1, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected 'group', 'batch' or 'none', got {kind!r}")


class _GenBlock(nn.Module):
    """Pre-activation residual block with 2x nearest upsampling."""

    def __init__(self, ch: int, norm: str) -> None:
        super().__init__()
        self.n1, self.c1 = _norm(norm, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.n2, self.c2 = _norm(norm, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.up(torch.relu(self.n1(x))))
        h = self.c2(torch.relu(self.n2(h)))
        return h + self.up(x)


class _CriticBlock(nn.Module):
    """Residual block with optional 2x average-pool downsampling (no normalisation: WGAN-GP)."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.first = first
        self.c1, self.c2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.pool = nn.AvgPool2d(2) if down else nn.Identity()
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or down) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else torch.relu(x)
        h = self.pool(self.c2(torch.relu(self.c1(h))))
        return h + self.pool(self.skip(x))


class ResNetGenerator(nn.Module):
    def __init__(self, latent: int = LATENT, ch: int = 128, channels: int = 3, norm: str = "group") -> None:
        super().__init__()
        self.latent, self.ch = latent, ch
        self.fc = nn.Linear(latent, 4 * 4 * ch)
        self.blocks = nn.Sequential(*[_GenBlock(ch, norm) for _ in range(3)])  # 4 -> 32
        self.out_norm = _norm(norm, ch)
        self.out = nn.Conv2d(ch, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.fc(z).view(-1, self.ch, 4, 4))
        return torch.tanh(self.out(torch.relu(self.out_norm(h))))


class ResNetCritic(nn.Module):
    def __init__(self, ch: int = 128, channels: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            _CriticBlock(channels, ch, down=True, first=True),
            _CriticBlock(ch, ch, down=True),
            _CriticBlock(ch, ch, down=False),
            _CriticBlock(ch, ch, down=False),
        )
        self.fc = nn.Linear(ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.blocks(x)).mean(dim=(2, 3))
        return self.fc(h).squeeze(1)


class DCGANGenerator(nn.Module):
    """latent -> 128x4x4 -> 64x8x8 -> 32x16x16 -> channels x 32x32."""

    def __init__(self, latent: int = LATENT, ch: int = 64, channels: int = 1, norm: str = "group") -> None:
        super().__init__()
        self.latent, self.ch = latent, ch
        self.fc = nn.Linear(latent, 2 * ch * 4 * 4)
        self.net = nn.Sequential(
            _norm(norm, 2 * ch), nn.ReLU(), nn.ConvTranspose2d(2 * ch, ch, 4, 2, 1),
            _norm(norm, ch), nn.ReLU(), nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1),
            _norm(norm, ch // 2), nn.ReLU(), nn.ConvTranspose2d(ch // 2, channels, 4, 2, 1), nn.Tanh(),
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, 2 * self.ch, 4, 4))


class DCGANCritic(nn.Module):
    def __init__(self, ch: int = 64, channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, ch // 2, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch // 2, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, 2 * ch, 4, 2, 1), nn.LeakyReLU(0.2),
        )  # fmt: skip
        self.fc = nn.Linear(2 * ch * 4 * 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x).flatten(1)).squeeze(1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """WGAN-GP penalty ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` on random interpolates."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=gen).to(real.device)  # CPU stream: same draws on any device
    x = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return (g.flatten(1).norm(dim=1) - 1).square().mean()
