"""FID of a generator against a real data set (torchmetrics), with cached real statistics.

``FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` on extractor features of
``n`` real and ``n`` generated images (torchmetrics' ``FrechetInceptionDistance`` with a
custom feature module).  The real images' sufficient statistics (feature sum, sum of outer
products, count) are computed once per (extractor, data set, n) and cached on disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qoda.data.images import ImageDataset
from qoda.eval.features import dataset_digest, default_cache_dir
from qoda.utils.atomic import atomic_save

_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_FAKE_STATES = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


@dataclass(frozen=True)
class FIDResult:
    fid: float
    extractor: str
    samples: int


def _extractor_digest(extractor: nn.Module) -> str:
    h = hashlib.sha256(type(extractor).__name__.encode())
    for k, v in extractor.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    if hasattr(extractor, "path"):
        h.update(str(extractor.path).encode())
    return h.hexdigest()[:16]


class FIDEvaluator:
    """FID of generated images against ``data`` on ``samples`` images, with extractor ``name``."""

    def __init__(
        self, extractor: nn.Module, name: str, data: ImageDataset, samples: int, batch_size: int = 250,
        cache_dir: Path | None = None, seed: int = 0,
    ) -> None:  # fmt: skip
        if samples < 2:
            raise ValueError(f"fid_samples: must be >= 2, got {samples}")
        # imported here: torchmetrics (with the SciPy modules it loads) is ~1/3 of a training
        # worker's start-up, and workers that never evaluate (killed, short or LM runs) skip it
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.name, self.samples, self.batch_size = name, int(samples), int(batch_size)
        # sync_on_compute=False: the real statistics are local (cached); only the generated
        # images' statistics are summed across workers, explicitly, in __call__.
        self.metric = FrechetInceptionDistance(
            feature=extractor, reset_real_features=False, normalize=True, sync_on_compute=False
        )
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = f"{_extractor_digest(extractor)}-{dataset_digest(data)}-{self.samples}-{seed}"
        path = cache_dir / f"fid-real-{data.name}-{key}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, weights_only=True)
                for k in _REAL_STATES:
                    setattr(self.metric, k, saved[k])
                return
            except Exception:  # damaged cache: recompute
                pass
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(data), (self.samples,), generator=g) if self.samples > len(data) else (
            torch.randperm(len(data), generator=g)[: self.samples])  # fmt: skip
        for i in range(0, self.samples, self.batch_size):
            self.metric.update((data.images[idx[i : i + self.batch_size]] + 1) / 2, real=True)
        atomic_save({k: getattr(self.metric, k) for k in _REAL_STATES}, path)

    @torch.no_grad()
    def __call__(
        self, generator: nn.Module, latent: int, seed: int = 0, group: dist.ProcessGroup | None = None
    ) -> FIDResult:
        """FID of ``generator`` on ``samples`` images from fixed latents (``seed``).

        Under ``torch.distributed`` (collective): worker ``r`` generates and embeds the samples
        ``r, r + K, ...`` and the feature statistics are summed, so the score does not depend
        on the number of workers beyond float summation order.
        """
        rank, world = (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)
        was_training = generator.training
        generator.eval()
        device = next(generator.parameters()).device
        z_all = torch.randn(self.samples, latent, generator=torch.Generator().manual_seed(seed))[rank::world]
        self.metric.reset()
        try:
            for i in range(0, len(z_all), self.batch_size):
                z = z_all[i : i + self.batch_size].to(device)
                self.metric.update((generator(z).float().cpu().clamp(-1, 1) + 1) / 2, real=False)
            if world > 1:
                for k in _FAKE_STATES:
                    t = getattr(self.metric, k)
                    wire = t.double() if t.is_floating_point() else t.long()
                    if dist.get_backend(group) == "nccl":
                        wire = wire.cuda()
                    dist.all_reduce(wire, group=group)
                    setattr(self.metric, k, wire.to(t.device, t.dtype))
            fid = float(self.metric.compute())
        finally:
            generator.train(was_training)
        return FIDResult(fid, self.name, self.samples)
