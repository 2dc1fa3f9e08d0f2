"""Atomic file writes: temporary file in the same directory, fsync, rename, fsync the directory.

A crash (or kill) at any point leaves either the previous file or the new one, never a torn
file: ``os.replace`` is atomic on POSIX file systems, and the fsyncs make the rename durable.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(data: bytes, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` made atomic."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes((json.dumps(obj, indent=2, allow_nan=False) + "\n").encode(), path)
