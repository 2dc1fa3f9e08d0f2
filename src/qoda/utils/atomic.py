"""Atomic file writes: temporary file in the same directory, fsync, rename, fsync the directory.

A crash (or kill) at any point leaves either the previous file or the new one, never a torn
file: ``os.replace`` is atomic on POSIX file systems, and the fsyncs make the rename durable.
The file gets the mode any other tool would give it (``0o666`` less the process's umask), not
the ``0o600`` of the temporary file.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (``/proc``, Linux >= 4.7):
    ``os.umask`` can only be read by setting it, which would race with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # fallback: set and restore; a file another thread creates meanwhile gets 0o600 at worst
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp creates 0o600
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
