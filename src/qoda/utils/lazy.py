"""Lazy package exports: names importable from a package, loaded from their module on first use.

``__getattr__, __dir__ = lazy_exports(__name__, {"Name": "package.module", ...})`` in a package's
``__init__`` (PEP 562) keeps ``import package`` cheap (no torch) while ``from package import
Name`` works; the first look-up caches the value in the package.  ``star`` modules export every name
of their own ``__all__`` too (a registry's entries, say), and the package's ``__all__`` is computed
on first use from both (plus ``also``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], star: Sequence[str] = (), also: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``exports`` (name -> module) and the
    ``__all__`` of each ``star`` module."""

    def starred() -> dict[str, str]:
        return {n: m for m in star for n in importlib.import_module(m).__all__}

    def __getattr__(name: str) -> Any:
        if name == "__all__":
            value: Any = sorted({*exports, *starred(), *also})
        else:
            module = exports.get(name) or (starred().get(name) if star and not name.startswith("__") else None)
            if module is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports) | set(starred()))

    return __getattr__, __dir__
