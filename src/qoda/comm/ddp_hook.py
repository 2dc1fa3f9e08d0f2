"""A DDP communication hook that averages gradients with layer-wise quantization.

Usage (the state can be built before the model is wrapped, like PyTorch's ``PowerSGDState``)::

    state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4)), mode="allgather")
    ddp_model = DistributedDataParallel(model)
    state.register(ddp_model)            # = state.bind(model); ddp_model.register_comm_hook(state, qoda_hook)

The tuning guide is :class:`QodaHookState`'s docstring.  Checkpoints: ``state.state_dict()`` /
``load_state_dict()`` (plain Python and tensors), or ``pickle`` (the process group and the
model binding are dropped; bind again after loading).  Lightning and accelerate:
:mod:`qoda.integrations`.

Collective order.  Every collective of a step is *issued from the hook body*, in bucket order,
so every rank issues the same sequence.  Nothing is ever issued from a future callback: on
gloo a callback runs on whichever thread completed the previous work, so callbacks of
different buckets issue their collectives in different orders on different ranks and gloo
aborts with a collective mismatch (or, worse, pairs unrelated messages of equal size).

Overlap (``overlap=True``, the default).  The body encodes, *issues* the exchange
asynchronously (``async_op=True``) and returns a future completed by a continuation that
decodes, averages and writes the bucket: backward goes on computing the next buckets while
the bytes travel and while an earlier bucket is decoded on gloo's thread.  To need no size
exchange, each message travels with a one-byte status in front, at its size fixed by the plan
(fixed-width coding: ``LayerwiseCodec.message_size``):

* ``allgather``: **one** asynchronous all-gather per bucket.
* ``two_phase``: pipelined across buckets.  Phase 2 of a bucket is the re-quantized *result*
  of its phase 1, so it cannot be issued before phase 1 is done, and it must not be issued
  from phase 1's callback (see above).  So bucket ``i``'s body issues its phase-1 all-to-all
  asynchronously and then, for bucket ``i-1`` (whose phase 1 travelled while backward computed
  bucket ``i``), waits, decodes, re-encodes and issues the phase-2 all-gather asynchronously;
  the last bucket's body issues its own phase 2 too.  Every rank issues
  ``P1(0) | P1(1) P2(0) | ... | P1(n-1) P2(n-2) P2(n-1)``.  Two collectives per bucket, the
  same steps the synchronous path runs back to back (:mod:`qoda.comm.protocol`).

Entropy coding has data-dependent sizes: the sizes are exchanged first, blocking, then the
data asynchronously.  The overlapping results equal the synchronous ones bit for bit (same
seeds, same payloads, same decode order).

Failures stay collective in both paths and travel in the payload: a rank that cannot encode
(a NaN/Inf gradient) or cannot decode its phase-1 chunk sends a failure message (wire format
2: status, origin rank, reason); every rank sees it in the same exchange and raises
:class:`~qoda.comm.aggregate.AggregationError` naming the rank,
from ``backward()`` (overlap: DDP re-raises the continuation's error when it waits for the
bucket).  Settings are compared across ranks at the hook's first call in a process (mode,
``start_iter``, seed, overlap, adapt, policy, iteration, model binding) and again by every
aggregator (plan fingerprint).
"""

# No `from __future__ import annotations`: DDP checks the hook's real annotations.

import copy
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qoda.comm.adaptive import AdaptiveAggregator
from qoda.comm.aggregate import AggregationError, Aggregator, Mode, compare_across_ranks
from qoda.comm.averager import CommStats
from qoda.comm.protocol import AllgatherExchange, TwoPhaseExchange
from qoda.quant.adapt import AdaptConfig
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerEntry, LayerPlan, LayerPolicy

STATE_DICT_VERSION = 1


class QodaHookState:
    """State of :func:`qoda_hook`: settings, counters, one averager per bucket.

    Args:
        model: the model DDP wraps (optional: see *binding*). For backward compatibility a
            :class:`LayerPolicy` given first is taken as ``policy``.
        policy: what is quantized and how (default: global 4-bit QSGD, buckets of 1024).
        mode: ``allgather`` or ``two_phase`` (``fp32``/``fp16`` for comparisons).
        start_iter: plain fp32 all-reduce iterations before compression.
        seed: base seed of the quantization noise (same on every rank).
        process_group: the group (default: the world).
        adapt: fit levels to gradient statistics (ALQ/AMQ) on a schedule.
        overlap: issue the exchange asynchronously and decode in the future's continuation.

    Tuning guide:

    1. ``policy``: start from ``LayerPolicy.global_(QuantizerConfig.qsgd(bits=4))``; use
       ``by_module_class`` to give convolutions, linear layers and embeddings their own settings
       (embeddings are the most sensitive); tensors under ``min_numel`` and 1-D tensors go
       uncompressed by default.
    2. ``mode``: ``two_phase`` keeps the bytes per rank constant as workers are added (best from
       ~4 workers or on slow links); ``allgather`` has the lowest variance (one quantization) and
       the fewest rounds (best for 2 workers).
    3. ``overlap`` (default on): hides the exchange behind the rest of backward, with the same
       results bit for bit.  Gains grow with slow links and several DDP buckets
       (``bucket_cap_mb``): measured 0.75x (allgather) and 0.85x (two-phase) of the synchronous
       step at 100 Mbit/s, no worse on 127.0.0.1 or with one bucket (``python -m
       qoda.bench.hooks``).  ``overlap=False`` raises :class:`AggregationError` itself rather
       than DDP's ``RuntimeError`` carrying its message.
    4. ``start_iter`` (default 10): iterations of fp32 all-reduce before compression, as in
       PowerSGD: a clean start for the optimizer and time for DDP to rebuild its buckets.
       With ``adapt`` (:class:`~qoda.quant.adapt.AdaptConfig`) statistics are gathered from the
       start, levels are fitted (identical on every rank) at the first compressed iteration and
       re-fitted on the adapter's schedule.
    5. bits: 8 near-lossless, 4 usually fine with an adaptive optimizer, 2 needs error-tolerant
       training.

    Binding: the policy names parameters (``fc1.weight``) and looks at their modules, so the
    state maps DDP's bucket tensors to the model: pass ``model``, call :meth:`bind` or
    :meth:`register`.  A ``global`` policy without name rules does not depend on names: an
    unbound state then binds itself to the bucket's parameters at the first hook call.

    Checkpoints: :meth:`state_dict` / :meth:`load_state_dict` (iteration = quantization seeds,
    costs, fitted levels and statistics) or ``pickle``; a resumed state quantizes exactly like an
    uninterrupted one.  The adapters' statistics are per rank (summed over ranks at each re-fit);
    a checkpoint written by one rank carries that rank's.
    """

    def __init__(
        self,
        model: nn.Module | LayerPolicy | None = None,
        policy: LayerPolicy | None = None,
        mode: Mode | str = Mode.TWO_PHASE,
        start_iter: int = 10,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        adapt: AdaptConfig | None = None,
        overlap: bool = True,
    ) -> None:
        if isinstance(model, LayerPolicy):  # QodaHookState(policy, ...)
            if policy is not None:
                raise TypeError("QodaHookState: got two policies (the first argument is the model)")
            model, policy = None, model
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if policy is None:
            policy = LayerPolicy.global_(QuantizerConfig.qsgd(4))
        if not isinstance(policy, LayerPolicy):
            raise TypeError(f"policy: expected a LayerPolicy, got {type(policy).__name__}")
        try:
            mode = Mode(mode)
        except ValueError:
            raise ValueError(f"mode: expected one of {[m.value for m in Mode]}, got {mode!r}") from None
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter: must be a non-negative int, got {start_iter!r}")
        if adapt is not None and not isinstance(adapt, AdaptConfig):
            raise TypeError(f"adapt: expected an AdaptConfig, got {type(adapt).__name__}")
        if adapt is not None and mode in (Mode.FP32, Mode.FP16):
            raise ValueError(f"adapt: adaptive levels need a quantized mode (allgather or two_phase), got {mode.value}")
        # ---- configuration (pickled)
        self.policy = policy
        self.mode = mode
        self.start_iter = start_iter
        self.seed = int(seed)
        self.adapt = adapt
        self.overlap = bool(overlap)
        # ---- counters (pickled): the iteration drives the quantization seeds
        self.iter = 0
        self.stats = CommStats()
        self.adapter_states: dict[int, dict] = {}  # per bucket, refreshed when saved
        # ---- runtime only (not pickled)
        self.process_group = process_group
        self._init_runtime()
        if model is not None:
            self.bind(model)

    def _init_runtime(self) -> None:
        self._params: dict[int, tuple[str, nn.Module, str]] = {}
        self._rank_of: dict[int, int] = {}  # id(param) -> position in the model (canonical bucket order)
        # per bucket index: (its parameters' ids, its averager): an AdaptiveAggregator with
        # ``adapt`` (built at the bucket's first call), else an Aggregator (built after warm-up)
        self._aggregators: dict[int, tuple[tuple[int, ...], Aggregator | AdaptiveAggregator]] = {}
        self._checked = False
        self._lock = threading.Lock()  # stats are updated from gloo's threads (overlap)
        self._pending: list[_TwoPhase] = []  # two-phase overlap: phase 1 in flight, phase 2 due

    # ------------------------------------------------------------------ binding
    @property
    def bound(self) -> bool:
        """Whether a model is bound (else: bound lazily to the buckets, ``global`` policies only)."""
        return bool(self._params)

    def bind(self, model: nn.Module) -> None:
        """Attach to ``model`` (the module DDP wraps; a DDP wrapper is unwrapped): parameter names
        and owning modules.  Needed after unpickling unless the policy is name-independent."""
        while isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self._params = {
            id(p): (f"{mn}.{local}" if mn else local, mod, local)
            for mn, mod in model.named_modules()
            for local, p in mod.named_parameters(recurse=False)
        }
        self._rank_of = {id(p): i for i, p in enumerate(model.parameters())}
        self._aggregators = {}

    def register(self, ddp_model: nn.parallel.DistributedDataParallel) -> nn.parallel.DistributedDataParallel:
        """Bind to ``ddp_model.module`` and register :func:`qoda_hook` on ``ddp_model``; returns it."""
        if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
            raise TypeError(f"register: expected a DistributedDataParallel model, got {type(ddp_model).__name__}")
        self.bind(ddp_model.module)
        if self.process_group is None and ddp_model.process_group is not dist.group.WORLD:
            self.process_group = ddp_model.process_group
        ddp_model.register_comm_hook(self, qoda_hook)
        return ddp_model

    def _names_matter(self) -> bool:
        return self.policy.mode != "global" or bool(self.policy.rules)

    # ------------------------------------------------------------------ checkpoints
    def _refresh_adapter_states(self) -> None:
        for idx, (_, avg) in self._aggregators.items():
            if isinstance(avg, AdaptiveAggregator):
                self.adapter_states[idx] = avg.state_dict()["adapter"]

    def state_dict(self) -> dict[str, Any]:
        """Counters, costs and fitted levels/statistics (tensors and plain Python: safe for
        ``torch.load(weights_only=True)``)."""
        self._refresh_adapter_states()
        adapters = {
            int(i): {**s, "stats": {t: {**st, "counts": torch.as_tensor(st["counts"])} for t, st in s["stats"].items()}}
            for i, s in self.adapter_states.items()
        }
        return {
            "version": STATE_DICT_VERSION,
            "iter": self.iter,
            "stats": self.stats.as_dict(),
            "adapter_states": adapters,
            "settings": self._settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the settings must match (mode, seed, start_iter, adapt)."""
        if int(state.get("version", -1)) != STATE_DICT_VERSION:
            raise ValueError(f"hook state: version {state.get('version')!r}, expected {STATE_DICT_VERSION}")
        saved, mine = state["settings"], self._settings()
        diff = [k for k in ("mode", "seed", "start_iter", "adapt") if saved.get(k) != mine[k]]
        if diff:
            desc = ", ".join(f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in diff)
            raise ValueError(f"hook state: the checkpoint was written with other settings ({desc})")
        self.iter = int(state["iter"])
        self.stats = CommStats(**state["stats"])
        self.adapter_states = {
            int(i): {
                **s,
                "stats": {
                    t: {**st, "counts": np.asarray(st["counts"], dtype=np.float64)} for t, st in s["stats"].items()
                },
            }
            for i, s in copy.deepcopy(state["adapter_states"]).items()
        }
        self._aggregators = {}  # rebuilt (adapters from adapter_states) at the next hook call
        self._checked = False  # compare the restored iteration across ranks at the next call

    def _settings(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value, "start_iter": self.start_iter, "seed": self.seed, "overlap": self.overlap,
            "adapt": repr(self.adapt), "policy": repr(self.policy),
        }  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        self._refresh_adapter_states()
        keep = ("policy", "mode", "start_iter", "seed", "iter", "stats", "adapt", "adapter_states", "overlap")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("overlap", False)  # pickles of earlier versions: they ran synchronously
        self.__dict__.update(state)
        self.process_group = None
        self._init_runtime()

    # ------------------------------------------------------------------ per bucket
    def _order(self, params: Sequence[torch.Tensor]) -> list[int]:
        """The bucket's parameters in model order.  DDP lays a bucket out in definition order at
        its first iteration and in gradient-ready order after rebuilding it; quantizing in one
        canonical order makes a restarted process (a resumed checkpoint) quantize like the
        uninterrupted one.  Unbound states keep DDP's order."""
        n = len(self._rank_of)
        return sorted(range(len(params)), key=lambda i: self._rank_of.get(id(params[i]), n + i))

    def _bucket_params(self, bucket: dist.GradBucket) -> list[torch.Tensor]:
        params = bucket.parameters()
        return [params[i] for i in self._order(params)]

    def bucket_gradients(self, bucket: dist.GradBucket) -> list[torch.Tensor]:
        """The bucket's gradient views in the order of its plan."""
        views = bucket.gradients()
        return [views[i] for i in self._order(bucket.parameters())]

    def _bucket_plan(self, params: list[torch.Tensor], index: int) -> LayerPlan:
        entries = []
        if not self._params:
            if self._names_matter():
                raise RuntimeError(
                    "QodaHookState is not bound to a model and its policy types parameters by name or module "
                    f"(mode {self.policy.mode!r}, {len(self.policy.rules)} rules): call state.bind(model) or "
                    "state.register(ddp_model)"
                )
            placeholder = nn.Module()
            for j, p in enumerate(params):  # name-independent: any stable name will do
                name = f"bucket{index}.{j}"
                entries.append(LayerEntry(name, p.shape, self.policy.type_of(name, placeholder, "param", p)))
        else:
            for p in params:
                if id(p) not in self._params:
                    raise RuntimeError(
                        "a DDP bucket parameter is not in the model bound to QodaHookState: bind the model that "
                        "DDP wraps (state.bind(model) or state.register(ddp_model))"
                    )
                name, mod, local = self._params[id(p)]
                entries.append(LayerEntry(name, p.shape, self.policy.type_of(name, mod, local, p)))
        types = {e.type_name for e in entries if e.type_name is not None}
        return LayerPlan(tuple(entries), {t: self.policy.config_for(t) for t in types})

    def _averager_for(self, bucket: dist.GradBucket) -> Aggregator | AdaptiveAggregator:
        """The bucket's averager, rebuilt when DDP rebuilds its buckets (other parameters): with
        ``adapt`` an :class:`AdaptiveAggregator` (levels and statistics carried over a rebuild,
        restored from a checkpoint), else an :class:`Aggregator`."""
        params = self._bucket_params(bucket)
        key = tuple(id(p) for p in params)
        index = bucket.index()
        cached = self._aggregators.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        plan = self._bucket_plan(params, index)
        seed = self.seed ^ (index << 32)
        avg: Aggregator | AdaptiveAggregator
        if self.adapt is None:
            avg = Aggregator(plan, self.mode, self.process_group, seed=seed)
        else:  # its aggregator is built (and compared across ranks) at the first refresh
            avg = AdaptiveAggregator(plan, self.mode, self.process_group, seed=seed, adapt=self.adapt, check=False)
            if cached is not None:  # DDP rebuilt its buckets: keep the levels and statistics gathered so far
                self.adapter_states[index] = cached[1].state_dict()["adapter"]
            saved = self.adapter_states.get(index)
            if saved is not None:
                try:
                    avg.load_adapter_state(saved)
                except ValueError:
                    if cached is None:  # a checkpoint written for another model or bucket layout
                        raise
                    # a rebuilt bucket holding other tensors or types starts its statistics afresh
        self._aggregators[index] = (key, avg)
        return avg

    def adaptive_for(self, bucket: dist.GradBucket) -> AdaptiveAggregator:
        """The bucket's :class:`AdaptiveAggregator` (``adapt`` only)."""
        avg = self._averager_for(bucket)
        if not isinstance(avg, AdaptiveAggregator):
            raise RuntimeError("adaptive_for: this hook state has no adapt settings")
        return avg

    def aggregator_for(self, bucket: dist.GradBucket) -> Aggregator:
        """The aggregator that averages this bucket now.  With ``adapt``: the bucket's
        :class:`AdaptiveAggregator` re-fits its levels first when due (collective: once per
        bucket and iteration, from the hook body) and hands over the aggregator of its levels."""
        avg = self._averager_for(bucket)
        return avg.refresh(self.iter) if isinstance(avg, AdaptiveAggregator) else avg

    def _add_stats(self, agg: Aggregator, st: CommStats) -> None:
        st.calls = 1
        with self._lock:
            agg.stats += st
            self.stats += st

    # ------------------------------------------------------------------ cross-rank check
    def _check(self, bucket: dist.GradBucket) -> None:
        """Compare settings, iteration and binding across ranks (one small all-gather, once)."""
        binding = ""
        try:
            self._bucket_plan(self._bucket_params(bucket), bucket.index())
        except RuntimeError as e:
            binding = str(e)
        s = self._settings()
        fields = {
            "mode": s["mode"], "start_iter": s["start_iter"], "seed": s["seed"], "overlap": s["overlap"],
            "adapt": s["adapt"], "policy": s["policy"], "iteration": self.iter,
            "binding": "bad" if binding else "ok",
        }  # fmt: skip
        differ, everyone = compare_across_ranks(fields, self.process_group)
        self._checked = True
        bad_binding = [r for r, e in enumerate(everyone) if e[-1] != zlib.crc32(b"ok")]
        if bad_binding:
            if binding:
                raise AggregationError(f"qoda hook: {binding}")
            raise AggregationError(f"qoda hook: rank(s) {bad_binding} are bound to a model that does not match DDP's")
        if differ:
            raise AggregationError(
                f"qoda hook settings differ across ranks: {', '.join(differ)} (this rank: "
                + ", ".join(f"{k}={fields[k]!r}" for k in differ if k != "policy")
                + "); every rank must build QodaHookState with the same arguments and load the same checkpoint"
            )


# ---------------------------------------------------------------------------- the hook
def qoda_hook(state: QodaHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients across ranks with layer-wise quantization.

    1. At the first call in a process: settings are compared across ranks.
    2. With ``adapt``: the bucket's :class:`AdaptiveAggregator` observes its gradients (from
       the first iteration on, warm-up included).
    3. During warm-up (``state.iter < start_iter``): fp32 all-reduce of the bucket.
    4. Otherwise: the bucket's per-parameter gradient views are averaged by the bucket's
       :class:`Aggregator` (with ``adapt``: the one its adaptive averager holds after re-fitting
       when due): in the body (a completed future), or with ``overlap`` by an asynchronous
       exchange whose future decodes and averages.
    5. The iteration counter advances after the last bucket.
    """
    buffer = bucket.buffer()
    group = state.process_group
    try:
        if not state._checked:
            state._check(bucket)
        if state.adapt is not None:  # statistics of the local gradients (no communication)
            state.adaptive_for(bucket).observe(state.bucket_gradients(bucket), state.iter)
        if state.iter < state.start_iter:
            buffer.div_(dist.get_world_size(group))
            fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])
        agg = state.aggregator_for(bucket)  # adapt: identical levels on every rank (all-reduced statistics)
        grads = state.bucket_gradients(bucket)
        if state.overlap and agg.mode is Mode.ALLGATHER:
            return _allgather_async(state, agg, grads, buffer, state.iter)
        if state.overlap and agg.mode is Mode.TWO_PHASE:
            return _two_phase_async(state, agg, grads, buffer, state.iter, bucket.is_last())
        st = agg.average_(grads, step=state.iter)
        with state._lock:
            state.stats += st
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done
    except BaseException as e:  # no phase 2 left behind for the next iteration to issue
        for job in state._pending:
            job.fail(AggregationError(f"a later bucket's hook failed: {e}"))
        state._pending = []
        raise
    finally:
        if bucket.is_last():
            state.iter += 1


# ---------------------------------------------------------------------------- overlapped exchanges
# The protocols themselves live in qoda.comm.protocol (one implementation, shared with the
# synchronous Aggregator): here they are only issued from hook bodies and finished in futures.
def _allgather_async(
    state: QodaHookState, agg: Aggregator, grads: Sequence[torch.Tensor], buffer: torch.Tensor, step: int
) -> torch.futures.Future[torch.Tensor]:
    ex = AllgatherExchange(agg, grads, step)
    ex.start()
    assert ex.work is not None

    def finish(f: torch.futures.Future) -> torch.Tensor:
        f.value()  # re-raises a failed collective
        state._add_stats(agg, ex.finish())
        return buffer

    return ex.work.get_future().then(finish)


class _TwoPhase:
    """One bucket's overlapped two-phase exchange: phase 1 in flight, phase 2 not yet issued."""

    def __init__(
        self, state: QodaHookState, agg: Aggregator, grads: Sequence[torch.Tensor], buffer: torch.Tensor, step: int
    ) -> None:
        self.state, self.agg, self.buffer = state, agg, buffer
        self.exchange = TwoPhaseExchange(agg, grads, step)
        self.result: torch.futures.Future[torch.Tensor] = torch.futures.Future()  # what DDP waits for

    def start_phase1(self) -> None:
        self.exchange.start_phase1()

    def start_phase2(self) -> None:
        """From the body of the next bucket (or of this one if it is the last)."""
        self.exchange.start_phase2()
        assert self.exchange.work2 is not None

        def finish(f: torch.futures.Future) -> None:
            try:
                f.value()
                self.state._add_stats(self.agg, self.exchange.finish())
            except Exception as e:
                self.result.set_exception(e)
                return
            self.result.set_result(self.buffer)

        self.exchange.work2.get_future().add_done_callback(finish)

    def fail(self, error: Exception) -> None:
        if not self.result.done():
            self.result.set_exception(error)


def _two_phase_async(
    state: QodaHookState, agg: Aggregator, grads: Sequence[torch.Tensor], buffer: torch.Tensor, step: int,
    last: bool,
) -> torch.futures.Future[torch.Tensor]:  # fmt: skip
    """Pipelined two-phase exchange.  Order of collectives in every rank's hook bodies:
    ``P1(0) | P1(1) P2(0) | P1(2) P2(1) | ... | P1(n-1) P2(n-2) P2(n-1)``: phase 1 of a bucket
    travels while backward computes the next bucket; its phase 2 (which needs phase 1's result)
    is issued from the next bucket's body, never from a callback."""
    job = _TwoPhase(state, agg, grads, buffer, step)
    pending, state._pending = state._pending, []
    try:
        job.start_phase1()
        for older in pending:
            older.start_phase2()
        if last:
            job.start_phase2()
        else:
            state._pending = [job]
    except Exception as e:
        for j in (*pending, job):
            j.fail(e)
        raise
    # through then(): DDP receives a proper error (value() re-raises a set exception), not an
    # exception object it would try to read as the bucket's tensor
    return job.result.then(_value)


def _value(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
    return f.value()


__all__ = ["STATE_DICT_VERSION", "QodaHookState", "qoda_hook"]
