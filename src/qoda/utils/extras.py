"""The optional dependencies: which extra of ``pip install 'qoda[...]'`` brings which module.

``pip install qoda`` brings what the library and the DDP hook import (torch, numpy, numba, zlib-ng);
the trainer, its evaluation and plots, the benchmarks and the tests need an extra (pyproject.toml's
``[project.optional-dependencies]``; ``tests/test_lean_install.py`` checks that the two agree).  Code
that needs one calls :func:`require` before importing it, so a user without it reads one line naming
the extra instead of a traceback.
"""

from __future__ import annotations

import importlib.util

#: extra -> the top-level modules it brings that qoda imports (its own, not the ones of the extras it includes)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    # the trainer, FID, data sets, the quantization report, plots and sample grids
    "train": ("matplotlib", "tensorboard", "torchmetrics", "tqdm", "PIL", "sklearn", "mlxtend"),
    # the benchmarks (= train +): the generated-cases scenario of ``qoda bench faults``
    "bench": ("hypothesis",),
    # the test suite (= bench +)
    "test": ("pytest", "pytest_timeout", "scipy"),
}
#: extra -> the extras it includes (pyproject's self-references ``qoda[...]``)
EXTRA_INCLUDES: dict[str, tuple[str, ...]] = {"train": (), "bench": ("train",), "test": ("bench",)}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it (one line)."""


def modules(extra: str) -> tuple[str, ...]:
    """Every module ``extra`` brings, with those of the extras it includes."""
    return (*(m for inner in EXTRA_INCLUDES[extra] for m in modules(inner)), *EXTRA_MODULES[extra])


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    out = []
    for name in modules(extra):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, what: str, only: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtra` (one line: ``what`` needs ``extra``) unless the modules of ``extra``
    (or just ``only`` of them) are installed."""
    gone = [m for m in missing(extra) if only is None or m in only]
    if gone:
        raise MissingExtra(f"{what} needs the '{extra}' extra (missing: {', '.join(gone)}): "
                           f"pip install 'qoda[{extra}]'")  # fmt: skip
