"""Facts about the running process that every report records."""

from __future__ import annotations

import os


def allocator() -> str:
    """The memory allocator in use: ``tcmalloc``/``jemalloc`` when preloaded, else glibc's.

    Large fresh tensors pay page faults under glibc's malloc (it maps them anew); benchmarks
    and the trainer record this so that figures from different allocators are not mixed.
    """
    pre = os.environ.get("LD_PRELOAD", "")
    return "tcmalloc" if "tcmalloc" in pre else ("jemalloc" if "jemalloc" in pre else "glibc malloc (default)")
