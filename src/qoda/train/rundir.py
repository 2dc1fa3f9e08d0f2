"""The run directory (``--out``): is it free, does it hold a run, and replacing one (``--overwrite``).

A run directory holds what ``qoda train`` writes (:data:`RUN_ENTRIES`): ``checkpoints/``,
``tensorboard/``, ``samples/``, ``config.json``, ``report.json`` and ``curves.png``.  Starting a
new run into a directory that holds one is refused unless ``--overwrite`` (which removes those
files, and only those: other files and folders of the user stay), and ``--resume`` is refused
when there is no committed checkpoint to continue.  An empty or new directory is always fine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qoda.train import checkpoint
from qoda.train.config import ConfigError, TrainConfig

RUN_ENTRIES = ("checkpoints", "tensorboard", "samples", "config.json", "report.json", "curves.png")


def _ours_json(path: Path, key: str) -> bool:
    """``config.json`` / ``report.json`` are qoda's only if they carry qoda's keys (a user's own
    config file kept in the run directory is neither reported nor removed)."""
    try:
        return key in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _members(out: Path) -> dict[str, list[Path]]:
    """qoda's files in ``out``, grouped by entry of :data:`RUN_ENTRIES` (empty groups left out)."""
    found: dict[str, list[Path]] = {}
    ck = out / "checkpoints"
    if ck.is_dir():
        found["checkpoints"] = [*ck.glob("step-*"), *ck.glob("latest.json"), *ck.glob(".latest.json.*.tmp")]
    if (out / "tensorboard").is_dir():
        found["tensorboard"] = list((out / "tensorboard").glob("events.out.tfevents.*"))
    if (out / "samples").is_dir():
        s = out / "samples"
        found["samples"] = [*s.glob("step-*.png"), *s.glob("final.png"), *s.glob("final_raw.png"),
                            *s.glob(".*.png.*.tmp")]  # fmt: skip
    for name, key in (("config.json", "dataset_description"), ("report.json", "fid_extractor")):
        if (out / name).is_file() and _ours_json(out / name, key):
            found[name] = [out / name]
    if (out / "curves.png").is_file():
        found["curves.png"] = [out / "curves.png"]
    found[""] = list(out.glob(".*.json.*.tmp")) + list(out.glob(".curves.png.*.tmp"))  # torn atomic writes
    return {k: v for k, v in found.items() if v}


def describe(out: Path) -> str | None:
    """What of a previous run ``out`` holds (``None``: nothing), e.g. ``checkpoint at step 6``."""
    out = Path(out)
    if not out.is_dir():
        return None
    members = _members(out)
    if not members:
        return None
    try:
        ptr = checkpoint.latest(out)
    except checkpoint.CheckpointError:
        ptr = None
    if ptr is not None:
        return f"checkpoint at step {ptr['step']}"
    names = [k + ("/" if (out / k).is_dir() else "") for k in members if k]
    return f"{', '.join(names) or 'temporary files'}; no committed checkpoint"


def check(cfg: TrainConfig, strict_resume: bool = True) -> None:
    """Refuse an unusable ``--out`` with one line naming the option (``ConfigError``).

    * ``out`` is an existing file (not a directory);
    * without ``resume``: ``out`` holds a previous run and ``overwrite`` is off;
    * with ``resume`` and ``strict_resume``: ``out`` holds no committed checkpoint.  (Under an
      elastic agent, which re-runs the same command after a failure, ``strict_resume`` is off:
      ``--resume`` there means "continue if a checkpoint was committed".)
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; --out must name a directory (new, empty, or a run's)")
    if cfg.resume:
        if not strict_resume or checkpoint.latest(out) is not None:
            return
        if not out.exists():
            raise ConfigError(f"--resume: {out} does not exist, so there is no run to continue; drop --resume to "
                              "start one")  # fmt: skip
        held = describe(out)
        if held is None:
            raise ConfigError(f"--resume: {out} holds no qoda run (no checkpoints/latest.json); drop --resume to "
                              "start one there, or name the folder of the run to continue")  # fmt: skip
        raise ConfigError(f"--resume: {out} holds no committed checkpoint to continue ({held}; the run stopped "
                          "before its first one); start it again with --overwrite instead of --resume")  # fmt: skip
    held = describe(out)
    if held is not None and not cfg.overwrite:
        raise ConfigError(f"--out {out} already holds a run ({held}); use --resume to continue it, a new --out, "
                          "or --overwrite to replace it")  # fmt: skip


def clear(out: Path) -> list[Path]:
    """Remove the previous run's files from ``out`` (only qoda's, :func:`_members`); folders of
    :data:`RUN_ENTRIES` are removed when nothing else is left in them.  Returns what was removed."""
    out = Path(out)
    if not out.is_dir():
        return []
    removed = []
    for paths in _members(out).values():
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    for name in ("checkpoints", "tensorboard", "samples"):
        d = out / name
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return removed
