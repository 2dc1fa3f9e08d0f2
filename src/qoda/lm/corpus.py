"""An offline text corpus: the source of Python standard-library modules (ships with Python).

Byte-level, so no tokenizer and no download: a real, varied text (code, docstrings, comments).
"""

from __future__ import annotations

import importlib
import inspect

import torch

MODULES = ("argparse", "textwrap", "collections", "functools", "inspect", "json.decoder", "email.message",
           "logging", "pathlib", "string", "difflib", "calendar")  # fmt: skip


def load_corpus(max_bytes: int = 1 << 20) -> torch.Tensor:
    """The corpus as a uint8 tensor (at most ``max_bytes``)."""
    parts = []
    for name in MODULES:
        try:
            parts.append(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError, ImportError):  # a stripped install: skip the module
            continue
    if not parts:
        raise RuntimeError("corpus: no standard-library source found on this Python installation")
    data = "\n".join(parts).encode("utf-8")[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def batches(data: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of (input, next-byte target) windows."""
    starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(length + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


#: The share of the corpus held out for validation (its end; training reads only the rest).
VALIDATION_FRACTION = 0.1


def split(data: torch.Tensor, fraction: float = VALIDATION_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)``: the corpus cut once, the last ``fraction`` of its bytes held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction!r}")
    cut = int(data.numel() * (1.0 - fraction))
    return data[:cut], data[cut:]


def windows(data: torch.Tensor, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` non-overlapping (input, next-byte target) windows of ``data`` (fewer
    if ``data`` holds fewer): a fixed evaluation set."""
    n = min(count, (data.numel() - 1) // length)
    if n < 1:
        raise ValueError(f"windows: {data.numel()} bytes hold no window of {length + 1}")
    idx = torch.arange(n)[:, None] * length + torch.arange(length + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]
