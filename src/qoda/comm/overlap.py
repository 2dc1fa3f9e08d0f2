"""Overlapping one part's exchange with the computation of the rest (asynchronous work).

The dual vector is split into parts (the trainer: the generator's tensors, then the critic's),
each averaged by its own averager on its **own process group**.  As soon as a part's gradients
exist, :meth:`OverlappedAverager.start` averages it on a background thread while the caller
keeps computing (the trainer computes the generator's gradient first, then the critic's, whose
gradient-penalty double backward is the most expensive part of the step).  The optimizer's
``average_(tensors, step)`` then averages the parts not started, waits for the started ones and
writes every result in place: the same averaged vector as one exchange, with the started
parts' transfer hidden behind computation.

Why separate groups: collectives on one group must be issued in the same order on every rank;
a background thread and the main thread sharing a group would interleave differently across
ranks.  Each group is driven by exactly one thread, so the order is fixed.  Numba kernels
(``nogil``) and gloo/NCCL collectives release the GIL, so the thread runs beside autograd.

Costs (``stats``): bits and bytes are summed over the parts; ``comm_seconds`` counts only the
time the step actually waited (exposed communication), and the background part's encode and
decode seconds are not charged to the step (they ran during computation).  Failures in the
background part are raised from ``average_`` on the main thread, with the part named.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qoda.comm.averager import Averager, CommStats
from qoda.quant.policy import LayerPlan


@dataclass
class _Started:
    step: int
    tensors: list[torch.Tensor]
    thread: threading.Thread | None = None
    result: CommStats | None = None
    error: BaseException | None = None


class OverlappedAverager(Averager):
    """Average tensor ``parts`` (index lists into the full list, in order) with one averager each."""

    starts_parts = True

    def __init__(self, parts: Sequence[Sequence[int]], averagers: Sequence[Averager], names: Sequence[str]) -> None:
        super().__init__()
        if not (len(parts) == len(averagers) == len(names)) or not parts:
            raise ValueError("parts, averagers and names: one of each per part, at least one part")
        flat = [i for p in parts for i in p]
        if sorted(flat) != list(range(len(flat))):
            raise ValueError("parts: every tensor index exactly once")
        self.parts = [list(p) for p in parts]
        self.averagers = list(averagers)
        self.names = list(names)
        self._started: dict[int, _Started] = {}

    @property
    def plan(self) -> LayerPlan | None:
        """The parts' plans side by side (each entry at its tensor's index), or ``None`` if a
        part has no plan.  A type may appear in several parts only with the same settings
        (fitted levels are per part: the parts' types must then be disjoint)."""
        plans = [p for p in (a.plan for a in self.averagers) if p is not None]
        if len(plans) < len(self.averagers):
            return None
        by_index, configs = {}, {}
        for name, idx, p in zip(self.names, self.parts, plans, strict=True):
            by_index.update(zip(idx, p.entries, strict=True))
            for t, c in p.configs.items():
                if configs.setdefault(t, c) != c:
                    raise ValueError(f"plan: type {t!r} has other settings in part {name!r} than in an earlier part")
        return LayerPlan(tuple(by_index[i] for i in range(len(by_index))), configs)

    def start(self, part: int, tensors: Sequence[torch.Tensor], step: int) -> None:
        """Begin averaging ``part`` (its tensors, in part order; copied) for exchange ``step``."""
        if part in self._started:
            raise RuntimeError(f"part {self.names[part]!r} already started for exchange {self._started[part].step}")
        if len(tensors) != len(self.parts[part]):
            raise ValueError(f"tensors: part {self.names[part]!r} has {len(self.parts[part])} tensors")
        copies = [t.detach().clone() for t in tensors]
        job = _Started(step, copies)

        def work() -> None:
            try:
                job.result = self.averagers[part].average_(copies, step)
            except BaseException as e:  # re-raised on the main thread by average_
                job.error = e

        # daemon: a worker stopping on an error elsewhere must not wait for this exchange
        job.thread = threading.Thread(target=work, name=f"qoda-overlap-{self.names[part]}", daemon=True)
        self._started[part] = job
        job.thread.start()

    def average_(self, tensors: Sequence[torch.Tensor], step: int) -> CommStats:
        st = CommStats(calls=1)
        for k, idx in enumerate(self.parts):  # 1. the parts nobody started, on this thread
            if k in self._started:
                continue
            part_stats = self.averagers[k].average_([tensors[i] for i in idx], step)
            _add_costs(st, part_stats, exposed=True)
        for k in sorted(self._started):  # 2. wait for the started ones, write their results
            job = self._started.pop(k)
            t0 = time.perf_counter()
            assert job.thread is not None
            job.thread.join()
            st.comm_seconds += time.perf_counter() - t0
            if job.error is not None:
                self._started.clear()
                raise _named(job.error, f"{self.names[k]} exchange") from job.error
            if job.step != step:
                raise RuntimeError(f"part {self.names[k]!r} was started for exchange {job.step}, not {step}")
            assert job.result is not None
            _add_costs(st, job.result, exposed=False)
            for i, avg in zip(self.parts[k], job.tensors, strict=True):
                tensors[i].copy_(avg)
        self.stats += st
        return st

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "parts": [a.state_dict() for a in self.averagers]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for a, s in zip(self.averagers, sd["parts"], strict=True):
            a.load_state_dict(s)
        super().load_state_dict(sd)


def _named(error: BaseException, where: str) -> BaseException:
    """``error`` with ``where`` in front of its message, of the same type when that type takes
    one message (AggregationError, gloo's errors, ...), else a RuntimeError."""
    try:
        return type(error)(f"{where}: {error}")
    except Exception:
        return RuntimeError(f"{where}: {type(error).__name__}: {error}")


def _add_costs(st: CommStats, part: CommStats, exposed: bool) -> None:
    st.payload_bits += part.payload_bits
    st.bytes_sent += part.bytes_sent
    st.bytes_received += part.bytes_received
    if exposed:
        st.encode_seconds += part.encode_seconds
        st.comm_seconds += part.comm_seconds
        st.decode_seconds += part.decode_seconds
