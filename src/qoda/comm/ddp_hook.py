"""A DDP communication hook that averages gradients with layer-wise quantization.

Usage (the state can be built before the model is wrapped, like PyTorch's ``PowerSGDState``)::

    state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4)))  # allgather, adaptive levels
    ddp_model = DistributedDataParallel(model)
    state.register(ddp_model)            # = state.bind(model); ddp_model.register_comm_hook(state, qoda_hook)

The tuning guide is :class:`QodaHookState`'s docstring.  Any other compressor
(:class:`~qoda.codec.compressor.Compressor`) runs in the same hook:
``QodaHookState(compressor=functools.partial(TopK, fraction=0.01))``.
Checkpoints: ``state.state_dict()`` / ``load_state_dict()`` (plain Python and tensors), or
``pickle`` (the process group and the model binding are dropped; bind again after loading);
resume is bit for bit whatever DDP's buckets (the state is per parameter; see *Per-parameter
state* there).  ``state.summary()``: widths, levels, variance and bits per coordinate.
Lightning and accelerate: :mod:`qoda.integrations`.

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

Every mode is a registered protocol (:mod:`qoda.comm.protocol`) with the same stages: the body
issues a bucket's first stage, each later stage is issued from the next bucket's body (or at the
end of the last one), and the last stage's continuation finishes the bucket:

* ``allgather``: **one** asynchronous all-gather per bucket (``fp32``/``fp16``: one all-reduce).
* ``two_phase``: pipelined across buckets.  Phase 2 of a bucket is the re-quantized *result*
  of its phase 1, so it cannot be issued before phase 1 is done, and it must not be issued
  from phase 1's callback (see above).  So bucket ``i``'s body issues its phase-1 all-to-all
  asynchronously and then, for bucket ``i-1`` (whose phase 1 travelled while backward computed
  bucket ``i``), waits, decodes, re-encodes and issues the phase-2 all-gather asynchronously;
  the last bucket's body issues its own phase 2 too.  Every rank issues
  ``P1(0) | P1(1) P2(0) | ... | P1(n-1) P2(n-2) P2(n-1)``.  Two collectives per bucket, the
  same stages the synchronous path runs back to back.

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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from qoda.codec.compressor import Compressor
from qoda.codec.layerwise import fixed_message_bits
from qoda.comm.aggregate import AggregationError, Aggregator, Mode, allreduce_sum, compare_across_ranks
from qoda.comm.averager import Averager, CommStats
from qoda.comm.compressed import CompressedAverager
from qoda.comm.protocol import Protocol, protocol_named
from qoda.quant.adapt import AdaptConfig, LevelAdapter
from qoda.quant.allocation import minimum_budget
from qoda.quant.config import QuantizerConfig
from qoda.quant.fitting import MagnitudeStats
from qoda.quant.policy import LayerEntry, LayerPlan, LayerPolicy
from qoda.quant.variance import exact_variance

STATE_DICT_VERSION = 2
#: The default ``adapt`` (quantized modes; ``fp32``/``fp16`` ignore it): adaptive levels, as the trainer.
DEFAULT_ADAPT = AdaptConfig()

#: One exchange: parameter names in model order (a DDP bucket, or a group of a restored layout).
Group = tuple[str, ...]


def sub_plan(plan: LayerPlan, names: Sequence[str]) -> LayerPlan:
    """The entries ``names`` of ``plan`` (in that order) with their types' settings."""
    by_name = {e.name: e for e in plan.entries}
    entries = tuple(by_name[n] for n in names)
    types = {e.type_name for e in entries if e.type_name is not None}
    return LayerPlan(entries, {t: plan.configs[t] for t in plan.types if t in types})


def _sparse_modules(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse and m.weight.requires_grad
    ]  # fmt: skip


class _Pass:
    """One backward pass: DDP's buckets so far, the gradients waiting for their group, the
    groups exchanged (by parameter name)."""

    def __init__(self, layout: list[Group] | None, defer: bool) -> None:
        self.layout = layout  # the groups to exchange (None: each DDP bucket as it comes)
        self.defer = defer  # groups unknown until the last bucket (unbound adaptive state, first pass)
        self.buckets: list[Group] = []  # DDP's buckets of this pass
        self.views: dict[str, torch.Tensor] = {}
        self.done: dict[str, torch.futures.Future] = {}  # name -> its group's exchange
        self.waiting: list[tuple[Group, torch.Tensor, torch.futures.Future]] = []  # DDP buckets not yet averaged
        self.refreshed = False
        self.fresh: dict[str, MagnitudeStats] = {}  # this rank's statistics of this pass (observation steps)


_ADAPTER_STATS = ("stats", "previous_stats")  # LevelAdapter.state_dict() keys holding histograms


def _stats_as(stats: dict[str, dict[str, Any]] | None, convert: Callable[[Any], Any]) -> dict[str, Any] | None:
    """An adapter's statistics (name -> MagnitudeStats.state_dict()) with their counts converted."""
    return None if stats is None else {k: {**st, "counts": convert(st["counts"])} for k, st in stats.items()}


def _float64_array(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


class QodaHookState:
    """State of :func:`qoda_hook`: settings, counters, per-parameter adaptive state.

    Args:
        model: the model DDP wraps (optional: see *binding*).
        policy: what is quantized and how (default: global 4-bit QSGD, buckets of 1024).
        mode: ``allgather`` (default) or ``two_phase`` (``fp32``/``fp16`` for comparisons), or any
            protocol registered with :func:`~qoda.comm.protocol.register_protocol`.
        start_iter: plain fp32 all-reduce iterations before compression (default 10).
        seed: base seed of the quantization noise (same on every rank).
        process_group: the group (default: the world).
        adapt: fit levels to gradient statistics (ALQ/AMQ) on a schedule (default
            ``AdaptConfig()``: adaptive levels at the policy's widths, as the trainer; ``None``:
            fixed levels; ``AdaptConfig(allocation="dp", budget=b)``: per-tensor widths too).
        overlap: issue the exchange asynchronously and decode in the future's continuation.
        compressor: any :class:`~qoda.codec.compressor.Compressor` instead of the layer-wise codec,
            as a factory ``compressor(shapes)`` called per exchange with its parameters' shapes
            (e.g. ``functools.partial(TopK, fraction=0.01)``); averaged by all-gather
            (:class:`~qoda.comm.compressed.CompressedAverager`) in the hook body, after the fp32
            warm-up.  ``policy`` and ``overlap`` then do not apply; ``adapt`` and ``mode`` keep their
            defaults (no adaptive levels: passing any ``adapt`` raises).  Each exchange group's
            compressor state (e.g. an error-feedback memory) is in the checkpoint.

    Tuning guide:

    1. ``policy``: start from ``LayerPolicy.global_(QuantizerConfig.qsgd(bits=4))``; use
       ``by_module_class`` to give convolutions, linear layers and embeddings their own settings
       (embeddings are the most sensitive); tensors under ``min_numel`` and 1-D tensors go
       uncompressed by default.
    2. ``mode``: ``allgather`` has the lowest variance (one quantization) and the fewest rounds
       (best for 2 workers); ``two_phase`` keeps the bytes per rank constant as workers are added
       (best from ~4 workers or on slow links).
    3. ``overlap`` (default on): hides the exchange behind the rest of backward, with the same
       results bit for bit; gains grow with slow links and several DDP buckets
       (``bucket_cap_mb``).  The measured figure is in docs/communication.md ("The overlapping
       DDP hook").  ``overlap=False`` raises :class:`AggregationError` itself rather than DDP's
       ``RuntimeError`` carrying its message.
    4. ``start_iter`` (default 10): iterations of fp32 all-reduce before compression, as in
       PowerSGD: a clean start for the optimizer and time for DDP to rebuild its buckets.
       With ``adapt`` statistics are gathered from the start, levels are fitted (identical on
       every rank, from the statistics of the earlier iterations) at the first compressed
       iteration and re-fitted on the adapter's schedule.
    5. bits: 8 near-lossless, 4 usually fine with an adaptive optimizer, 2 needs error-tolerant
       training.

    Per-parameter state.  Statistics, fitted levels and allocated widths belong to the *model*
    (one :class:`~qoda.quant.adapt.LevelAdapter` over every parameter, keyed by name), not to
    DDP's buckets: the ``dp`` budget holds for the whole model (every message's bits counted;
    a budget the model cannot hold is raised to the smallest feasible one with a warning), and
    a resumed state meets the same tensors whatever DDP's buckets are.

    Binding: the policy names parameters (``fc1.weight``) and looks at their modules, so the
    state maps DDP's bucket tensors to the model: pass ``model``, call :meth:`bind` or
    :meth:`register`.  A ``global`` policy without name rules does not depend on names: an
    unbound state then names the parameters in the order of DDP's first pass of the process.

    Checkpoints: :meth:`state_dict` / :meth:`load_state_dict` or ``pickle``.  A resumed state
    quantizes exactly like an uninterrupted one: besides the iteration and the adaptive state,
    the checkpoint holds the parameters' grouping into exchanges (DDP's buckets of the last
    pass), and a new process exchanges in those groups until DDP's own buckets match them
    (DDP starts every process with its first-pass buckets and rebuilds them after one pass).
    Statistics are per rank (summed over ranks at each re-fit); a checkpoint written by one rank
    carries that rank's.  Read the current widths, levels and variance with :meth:`summary`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        policy: LayerPolicy | None = None,
        mode: Mode | str = Mode.ALLGATHER,
        start_iter: int = 10,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        adapt: AdaptConfig | None = DEFAULT_ADAPT,
        overlap: bool = True,
        compressor: Callable[[list[torch.Size]], Compressor] | None = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__} (a policy is policy=...)")
        if policy is None:
            policy = LayerPolicy.global_(QuantizerConfig.qsgd(4))
        if not isinstance(policy, LayerPolicy):
            raise TypeError(f"policy: expected a LayerPolicy, got {type(policy).__name__}")
        protocol = protocol_named(mode)
        mode = protocol.name
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter: must be a non-negative int, got {start_iter!r}")
        if adapt is not None and not isinstance(adapt, AdaptConfig):
            raise TypeError(f"adapt: expected an AdaptConfig, got {type(adapt).__name__}")
        if compressor is not None and not callable(compressor):
            raise TypeError(f"compressor: expected a factory shapes -> Compressor, got {type(compressor).__name__}")
        if compressor is not None and mode != Mode.ALLGATHER:
            raise ValueError(f"mode: a compressor is averaged by all-gather, got mode {mode}")
        if compressor is not None and adapt is not DEFAULT_ADAPT and adapt is not None:
            raise ValueError("adapt: adaptive levels belong to the layer-wise codec; a compressor takes adapt=None")
        if adapt is DEFAULT_ADAPT and (not protocol.quantizes() or compressor is not None):
            adapt = None  # nothing to adapt in an uncompressed mode or with another compressor
        if adapt is not None and not protocol.quantizes():
            raise ValueError(
                f"adapt: adaptive levels need a quantized mode (allgather or two_phase), got {mode} (pass adapt=None)"
            )
        # ---- configuration (pickled)
        self.policy = policy
        self.mode = mode
        self.start_iter = start_iter
        self.seed = int(seed)
        self.adapt = adapt
        self.overlap = bool(overlap)
        self.compressor = compressor
        # ---- counters and per-parameter state (pickled)
        self.iter = 0
        self.stats = CommStats()
        self.adapter_state: dict | None = None  # the LevelAdapter's, refreshed when saved
        self.compressor_states: dict[str, dict] = {}  # exchange group -> its compressor's state, refreshed when saved
        self.layout: list[Group] = []  # the groups of the last pass (DDP's buckets, or the restored ones)
        self.shapes: dict[str, tuple[int, ...]] = {}  # every parameter's shape, in model order
        # ---- runtime only (not pickled)
        self.process_group = process_group
        self._init_runtime()
        if model is not None:
            self.bind(model)

    def _init_runtime(self) -> None:
        self._names: dict[int, str] = {}  # id(param) -> name
        self._modules: dict[str, tuple[nn.Module, str]] = {}  # name -> (owning module, local name)
        self._bound = False
        self._adapter: LevelAdapter | None = None
        self._aggregators: dict[tuple[Group, int], tuple[int, Averager]] = {}  # (group, index) -> (version, averager)
        self._version = 0  # bumped when the adapter's plan changes
        self._pinned: list[Group] | None = None  # restored layout, used until DDP's buckets match it
        self._previous: list[Group] | None = None  # DDP's buckets of the pass before
        self._pass: _Pass | None = None
        self._checked = False
        self._lock = threading.Lock()  # stats are updated from gloo's threads (overlap)
        self._pending: list[_Job] = []  # overlap: exchanges with a stage still to issue
        self._variance: dict[str, tuple[float, float]] = {}  # name -> (E||Q(g)-g||^2, ||g||^2), last observed
        self._wire: dict[int, list[int]] = {}  # iteration -> [payload bits, coordinates]

    # ------------------------------------------------------------------ binding
    @property
    def bound(self) -> bool:
        """Whether a model is bound (else: parameters named in the order of DDP's first pass)."""
        return self._bound

    def bind(self, model: nn.Module) -> None:
        """Attach to ``model`` (the module DDP wraps; a DDP wrapper is unwrapped): parameter names
        and owning modules.  Needed after unpickling unless the policy is name-independent."""
        while isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        sparse = _sparse_modules(model)
        if sparse:
            raise TypeError(
                f"qoda hook: {', '.join(sparse)} produce sparse gradients (sparse=True), which layer-wise "
                "quantization cannot encode: build them with sparse=False"
            )
        names: dict[int, str] = {}
        modules: dict[str, tuple[nn.Module, str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for mn, mod in model.named_modules():
            for local, p in mod.named_parameters(recurse=False):
                if id(p) in names or not p.requires_grad:
                    continue
                name = f"{mn}.{local}" if mn else local
                names[id(p)], modules[name], shapes[name] = name, (mod, local), tuple(p.shape)
        if self.shapes and self.shapes != shapes:
            raise ValueError("hook state: its parameters (restored from a checkpoint) are not this model's")
        self._names, self._modules, self.shapes, self._bound = names, modules, shapes, True
        self._adapter = None
        self._refresh_compressor_states()  # kept across the rebuild of the groups' averagers
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

    def _binding_error(self, params: Sequence[torch.Tensor]) -> str:
        if not self._bound:
            if self._names_matter():
                return (
                    "QodaHookState is not bound to a model and its policy types parameters by name or module "
                    f"(mode {self.policy.mode!r}, {len(self.policy.rules)} rules): call state.bind(model) or "
                    "state.register(ddp_model)"
                )
            return ""
        if any(id(p) not in self._names for p in params):
            return (
                "a DDP bucket parameter is not in the model bound to QodaHookState: bind the model that "
                "DDP wraps (state.bind(model) or state.register(ddp_model))"
            )
        return ""

    def _bucket_tensors(self, bucket: dist.GradBucket) -> tuple[Group, list[torch.Tensor]]:
        """The bucket's parameter names and gradient views, in model order."""
        params, views = bucket.parameters(), bucket.gradients()
        if not self._bound:  # name-independent policy: names in the order of the process's first pass
            for p in params:
                if id(p) not in self._names:
                    name = f"param{len(self._names)}"
                    self._names[id(p)], self._modules[name] = name, (nn.Module(), "param")
                    self.shapes.setdefault(name, tuple(p.shape))
        if any(id(p) not in self._names for p in params):
            raise AggregationError(f"qoda hook: {self._binding_error(params)}")
        order = {n: i for i, n in enumerate(self.shapes)}
        idx = sorted(range(len(params)), key=lambda i: order[self._names[id(params[i])]])
        return tuple(self._names[id(params[i])] for i in idx), [views[i] for i in idx]

    # ------------------------------------------------------------------ plans
    def _policy_plan(self, names: Sequence[str]) -> LayerPlan:
        entries = []
        for n in names:
            mod, local = self._modules[n]
            p = torch.empty(self.shapes[n], device="meta")
            entries.append(LayerEntry(n, torch.Size(self.shapes[n]), self.policy.type_of(n, mod, local, p)))
        types = {e.type_name for e in entries if e.type_name is not None}
        return LayerPlan(tuple(entries), {t: self.policy.config_for(t) for t in types})

    def _adapter_now(self) -> LevelAdapter:
        """The model's adapter (built at first use, restored from a checkpoint)."""
        if self._adapter is None:
            assert self.adapt is not None
            widths = self.adapt.widths
            self._adapter = LevelAdapter(
                self._policy_plan(list(self.shapes)), self.adapt, reduce=None,
                # the budget counts the model as one message: each further DDP bucket adds its own
                # header, which the budget does not count (docs/communication.md)
                message_bits=fixed_message_bits, per_tensor=True,
                budget_floor=lambda plan: minimum_budget(plan, widths, fixed_message_bits),
            )  # fmt: skip
            if self.adapter_state is not None:
                try:
                    self._adapter.load_state_dict(self.adapter_state)
                except (ValueError, KeyError) as e:
                    self._adapter = None
                    raise ValueError(f"hook state: the checkpoint's adaptive state is not this model's ({e})") from None
            self._version += 1
        return self._adapter

    @property
    def adapter(self) -> LevelAdapter | None:
        """The model's :class:`~qoda.quant.adapt.LevelAdapter` (statistics, levels, widths and, with
        ``allocation="dp"``, its :attr:`~qoda.quant.adapt.LevelAdapter.allocation`); ``None`` without
        ``adapt`` or before the parameters are known."""
        if self.adapt is None or self._plan() is None:
            return None
        return self._adapter_now()

    @property
    def plan(self) -> LayerPlan | None:
        """The plan every parameter is quantized with now (``None`` before the parameters are known,
        or with a ``compressor``)."""
        return self._plan()

    def _plan(self) -> LayerPlan | None:
        """The current plan of every parameter (``None`` before the parameters are known or with a
        ``compressor``)."""
        if not self.shapes or self.compressor is not None:
            return None
        if self.adapt is not None and (self._adapter is not None or self._bound or self.adapter_state is not None):
            return self._adapter_now().plan
        return self._policy_plan(list(self.shapes))

    def _aggregator(self, names: Group, index: int) -> Averager:
        """The averager of one group: an :class:`Aggregator` of its plan, or the compressor's."""
        key = (names, index)
        cached = self._aggregators.get(key)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        seed = self.seed ^ (index << 32)
        agg: Averager
        if self.compressor is not None:
            shapes = [torch.Size(self.shapes[n]) for n in names]
            agg = CompressedAverager(self.compressor(shapes), self.process_group, seed=seed)
            saved = self.compressor_states.get(_group_key(names, index))
            if saved is not None:
                agg.compressor.load_state_dict(saved)
        else:
            plan = sub_plan(self._adapter_now().plan, names) if self.adapt is not None else self._policy_plan(names)
            agg = Aggregator(plan, self.mode, self.process_group, seed=seed)
        self._aggregators[key] = (self._version, agg)
        return agg

    # ------------------------------------------------------------------ public reading
    def summary(self) -> dict[str, Any]:
        """What the hook does now, per parameter and overall (plain Python).

        ``parameters[name]``: ``type`` (``None``: sent uncompressed), ``bits`` (code bits per
        coordinate, 32 uncompressed), ``levels`` (the level set), ``variance`` (this rank's exact
        ``E||Q(g)-g||^2 / ||g||^2`` at the last compressed observation step, ``None`` before).
        Overall: ``iteration``, ``compressing``, ``bits_per_coordinate`` (bits this rank encoded
        per coordinate in the last complete compressed iteration, bucket norms and headers
        included; ``None`` before), ``variance`` (``sum E||Q(g)-g||^2 / sum ||g||^2`` over the
        compressed parameters at the last observation).
        """
        plan = self._plan()
        params: dict[str, dict[str, Any]] = {}
        for e in plan.entries if plan is not None else ():
            cfg = plan.configs[e.type_name] if e.type_name is not None else None
            v = self._variance.get(e.name)
            params[e.name] = {
                "type": e.type_name, "bits": cfg.bits if cfg else 32,
                "levels": tuple(float(x) for x in cfg.levels.values) if cfg else None,
                "variance": (v[0] / v[1] if v[1] > 0 else 0.0) if v else None,
            }  # fmt: skip
        with self._lock:
            done = sorted(i for i in self._wire if i < self.iter)
            wire = self._wire[done[-1]] if done else None
        num, den = sum(v[0] for v in self._variance.values()), sum(v[1] for v in self._variance.values())
        return {
            "iteration": self.iter,
            "compressing": self.iter >= self.start_iter,
            "bits_per_coordinate": wire[0] / wire[1] if wire and wire[1] else None,
            "variance": num / den if den > 0 else None,
            "parameters": params,
        }

    def metrics(self, prefix: str = "qoda/") -> dict[str, float]:
        """:meth:`summary` as flat scalars for a logger (TensorBoard, ``accelerator.log``): bits per
        coordinate, the relative variance, and every compressed parameter's width and variance."""
        s = self.summary()
        out = {prefix + k: float(s[k]) for k in ("bits_per_coordinate", "variance") if s[k] is not None}
        for name, p in s["parameters"].items():
            if p["type"] is not None:
                out[f"{prefix}bits/{name}"] = float(p["bits"])
                if p["variance"] is not None:
                    out[f"{prefix}variance/{name}"] = float(p["variance"])
        return out

    # ------------------------------------------------------------------ checkpoints
    def _refresh_saved_state(self) -> None:
        if self._adapter is not None:
            self.adapter_state = self._adapter.state_dict()
        self._refresh_compressor_states()

    def _refresh_compressor_states(self) -> None:
        for (names, index), (_, agg) in self._aggregators.items():
            if isinstance(agg, CompressedAverager):
                self.compressor_states[_group_key(names, index)] = agg.compressor.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Counters, costs, the per-parameter adaptive state and the grouping of the last pass
        (tensors and plain Python: safe for ``torch.load(weights_only=True)``)."""
        self._refresh_saved_state()
        a = self.adapter_state
        adapter = None
        if a is not None:  # histogram counts as tensors (numpy arrays are not weights_only-safe)
            adapter = {**a, **{key: _stats_as(a[key], torch.as_tensor) for key in _ADAPTER_STATS if key in a}}
        return {
            "version": STATE_DICT_VERSION,
            "iter": self.iter,
            "stats": self.stats.as_dict(),
            "adapter": adapter,
            "layout": [list(g) for g in (self._pinned or self.layout)],
            "shapes": [[n, list(s)] for n, s in self.shapes.items()],
            "settings": self._settings(),
            "compressors": copy.deepcopy(self.compressor_states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the settings must match (mode, seed, start_iter, adapt,
        compressor)."""
        if state.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"hook state: version {state.get('version')!r}, expected {STATE_DICT_VERSION} "
                             "(a state written by another qoda release)")  # fmt: skip
        saved, mine = state["settings"], self._settings()
        diff = [k for k in ("mode", "seed", "start_iter", "adapt", "compressor") if saved.get(k) != mine[k]]
        if diff:
            desc = ", ".join(f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in diff)
            raise ValueError(f"hook state: the checkpoint was written with other settings ({desc})")
        shapes = {str(n): tuple(int(x) for x in s) for n, s in state["shapes"]}
        if self._bound and shapes and shapes != self.shapes:
            raise ValueError("hook state: the checkpoint's parameters are not those of the bound model")
        self.iter = int(state["iter"])
        self.stats = CommStats(**state["stats"])
        a = copy.deepcopy(state["adapter"])
        if a is not None:
            a.update({key: _stats_as(a[key], _float64_array) for key in _ADAPTER_STATS if key in a})
        self.adapter_state = a
        self.compressor_states = copy.deepcopy(state.get("compressors", {}))
        if shapes:
            self.shapes = shapes
        self.layout = [tuple(str(n) for n in g) for g in state["layout"]]
        self._restored()

    def _restored(self) -> None:
        """After loading: the restored grouping is used until DDP's buckets match it."""
        self._pinned = list(self.layout) or None
        self._previous = None
        self._adapter = None
        self._aggregators = {}
        self._variance, self._wire = {}, {}
        self._checked = False  # compare the restored iteration across ranks at the next call

    def _settings(self) -> dict[str, Any]:
        return {
            "mode": str(self.mode), "start_iter": self.start_iter, "seed": self.seed, "overlap": self.overlap,
            "adapt": repr(self.adapt), "policy": repr(self.policy),
            "compressor": None if self.compressor is None else repr(self.compressor),
        }  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        self._refresh_saved_state()
        keep = (
            "policy", "mode", "start_iter", "seed", "iter", "stats", "adapt", "adapter_state", "overlap", "shapes",
            "compressor", "compressor_states",
        )  # fmt: skip
        return {**{k: self.__dict__[k] for k in keep}, "layout": list(self._pinned or self.layout)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self._init_runtime()
        self._restored()

    # ------------------------------------------------------------------ one pass
    def _begin(self) -> _Pass:
        if self._pass is None:
            unknown = not self._bound and not self._pinned and self._previous is None
            defer = unknown and self.adapt is not None and self.iter >= self.start_iter
            self._pass = _Pass(self._pinned, defer)
        return self._pass

    def _end(self) -> None:
        """After the last bucket: remember DDP's buckets; drop a restored grouping once DDP's buckets
        match it (or DDP has settled on other buckets: two passes alike)."""
        p, self._pass = self._pass, None
        if p is None:
            return
        if self._due():
            self._merge_statistics(p)
        if self._pinned is not None and p.buckets in (self._pinned, self._previous):
            self._pinned = None
        self._previous = p.buckets
        self.layout = self._pinned or p.buckets

    def _due(self) -> bool:
        """Whether this pass is an observation step of the adapter."""
        return self.adapt is not None and self.adapt.observes(self.iter)

    def _merge_statistics(self, p: _Pass) -> None:
        """End of an observed pass: sum this pass's statistics over the ranks (one small all-reduce,
        issued from the last bucket's body) into the model's adapter.  Every rank then holds the same
        statistics, so a checkpoint written by any rank restores every rank exactly."""
        adapter = self._adapter_now()
        keys = [e.name for e in adapter.base_plan.entries if e.type_name is not None]
        bins = self.adapt.bins if self.adapt is not None else 0
        counts = np.stack([p.fresh[k].counts if k in p.fresh else np.zeros(bins) for k in keys]) if keys else None
        if counts is None:
            return
        counts = allreduce_sum(self.process_group)(counts)
        for k, c in zip(keys, counts, strict=True):
            st = adapter.stats[k]
            st.counts = st.decay * st.counts + c

    def _run_groups(self, p: _Pass, last: bool) -> None:
        """Exchange every group of the pass whose gradients have all arrived (in layout order)."""
        groups = p.layout if not p.defer else (p.buckets if last else [])
        if groups is None:
            return
        for index, g in enumerate(groups):
            if g[0] not in p.done and all(n in p.views for n in g):
                fut = self._exchange(p, g, [p.views[n] for n in g], index, None)
                for n in g:
                    p.done[n] = fut
        if last:
            missing = sorted(set(p.views) - set(p.done))
            if missing:
                raise AggregationError(
                    f"qoda hook: the restored grouping of the parameters (checkpoint) does not cover {missing[:3]}: "
                    "the checkpoint was written for another model"
                )
        still = []
        for names, buffer, result in p.waiting:
            if not all(n in p.done for n in names):
                still.append((names, buffer, result))
                continue
            futs = list({id(f): f for f in (p.done[n] for n in names)}.values())
            torch.futures.collect_all(futs).add_done_callback(
                lambda all_f, result=result, buffer=buffer: _complete(all_f, result, buffer)
            )
        p.waiting = still

    def _exchange(
        self, p: _Pass, names: Group, views: list[torch.Tensor], index: int, buffer: torch.Tensor | None
    ) -> torch.futures.Future:
        """Average one group (``buffer``: DDP's bucket buffer when the group is that bucket)."""
        compressed = self.iter >= self.start_iter
        if self.adapt is not None and compressed and not p.refreshed:  # before this pass's statistics
            p.refreshed = True
            adapter = self._adapter_now()
            if adapter.refit(self.iter, force=adapter.fits == 0) is not None:
                self._version += 1
        observed = self._due() and self._observe(p, names, views)
        if not compressed:
            return _allreduce_async(views, buffer, self.process_group)
        agg = self._aggregator(names, index)
        if observed:
            for e, v in zip(agg.plan.entries, views, strict=True):
                if e.type_name is not None:
                    cfg = agg.plan.configs[e.type_name]
                    self._variance[e.name] = (exact_variance(v, cfg), float(v.double().square().sum()))
        if self.overlap and isinstance(agg, Aggregator):  # a compressor is averaged in the body
            return _overlapped(self, agg, views, buffer, self.iter)
        numel = sum(v.numel() for v in views)
        self._add_stats(agg, agg.average_(views, step=self.iter), self.iter, counted=True, numel=numel)
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done

    def _observe(self, p: _Pass, names: Group, views: list[torch.Tensor]) -> bool:
        """This rank's statistics of the group's gradients (no communication).  A non-finite
        gradient is not observed (``False``): the exchange that follows reports it on every rank
        (a failure message, wire format 2), where raising here would leave the other ranks
        waiting in that exchange."""
        plan = self._policy_plan(names)
        fresh = {}
        try:
            for e, v in zip(plan.entries, views, strict=True):
                if e.type_name is not None:
                    fresh[e.name] = MagnitudeStats(self.adapt.bins)
                    fresh[e.name].update(v, plan.configs[e.type_name])
        except ValueError:  # NaN or Inf (normalized_magnitudes)
            return False
        p.fresh.update(fresh)
        return True

    def _add_stats(self, agg: Averager, st: CommStats, step: int, counted: bool = False, numel: int = 0) -> None:
        st.calls = 1
        with self._lock:
            if not counted:
                agg.stats += st
            self.stats += st
            wire = self._wire.setdefault(step, [0, 0])
            wire[0] += st.payload_bits
            wire[1] += sum(e.numel for e in agg.plan.entries) if agg.plan is not None else numel
            for old in [i for i in self._wire if i < step - 1]:
                del self._wire[old]

    # ------------------------------------------------------------------ cross-rank check
    def _check(self, bucket: dist.GradBucket) -> None:
        """Compare settings, iteration and binding across ranks (one small all-gather, once)."""
        binding = self._binding_error(bucket.parameters())
        s = self._settings()
        fields = {
            "mode": s["mode"], "start_iter": s["start_iter"], "seed": s["seed"], "overlap": s["overlap"],
            "adapt": s["adapt"], "policy": s["policy"], "compressor": s["compressor"], "iteration": self.iter,
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


def _group_key(names: Group, index: int) -> str:
    """A checkpoint key of one exchange group (its index and parameter names)."""
    return f"{index}:{','.join(names)}"


def _complete(all_f: torch.futures.Future, result: torch.futures.Future, buffer: torch.Tensor) -> None:
    try:
        for f in all_f.value():
            f.value()  # re-raises a failed exchange
    except Exception as e:
        result.set_exception(e)
        return
    result.set_result(buffer)


def _allreduce_async(
    views: list[torch.Tensor], buffer: torch.Tensor | None, group: dist.ProcessGroup | None
) -> torch.futures.Future:
    """fp32 average (warm-up): of DDP's bucket buffer, or of a group's gradients concatenated."""
    world = dist.get_world_size(group)
    flat = buffer if buffer is not None else torch.cat([v.reshape(-1) for v in views])
    flat.div_(world)
    fut = dist.all_reduce(flat, group=group, async_op=True).get_future()
    if buffer is not None:
        return fut.then(lambda f: f.value()[0])

    def scatter(f: torch.futures.Future) -> None:
        out, offset = f.value()[0], 0
        for v in views:
            v.copy_(out[offset : offset + v.numel()].view_as(v))
            offset += v.numel()

    return fut.then(scatter)


# ---------------------------------------------------------------------------- the hook
def qoda_hook(state: QodaHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients across ranks with layer-wise quantization.

    1. At the first call in a process: settings are compared across ranks.
    2. The bucket's gradients are averaged as one group, or (after a restore, until DDP's
       buckets match the checkpoint's grouping) wait for the restored group(s) holding them.
    3. Per group, with ``adapt``: at the pass's first compressed group the model's levels (and
       widths) are re-fitted when due (collective, identical on every rank); the group's local
       gradients feed the per-parameter statistics (warm-up included).
    4. During warm-up (``state.iter < start_iter``): fp32 all-reduce.
    5. Otherwise: the group's :class:`Aggregator` averages (in the body, or with ``overlap`` by
       an asynchronous exchange whose future decodes and averages).
    6. The iteration counter advances after the last bucket.
    """
    if not isinstance(state, QodaHookState):
        raise TypeError(
            f"qoda_hook: the hook state must be a QodaHookState, got {type(state).__name__}: "
            "register it with ddp_model.register_comm_hook(QodaHookState(...), qoda_hook) or state.register(ddp_model)"
        )
    buffer = bucket.buffer()
    last = bucket.is_last()
    try:
        if buffer.layout != torch.strided:
            raise TypeError(
                f"qoda hook: DDP bucket {bucket.index()} holds sparse gradients (e.g. nn.Embedding(sparse=True)), "
                "which layer-wise quantization cannot encode: use dense gradients (sparse=False)"
            )
        if not state._checked:
            state._check(bucket)
        p = state._begin()
        names, views = state._bucket_tensors(bucket)
        p.buckets.append(names)
        index = bucket.index()
        own = p.layout is None or (index < len(p.layout) and p.layout[index] == names)
        if own and not p.defer:  # the DDP bucket is a group
            fut = state._exchange(p, names, views, index, buffer)
            p.done.update(dict.fromkeys(names, fut))
            if last:
                _flush(state)
            return fut
        result: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        p.views.update(zip(names, views, strict=True))
        p.waiting.append((names, buffer, result))
        state._run_groups(p, last)
        if last:
            _flush(state)
        return result.then(_value)
    except BaseException as e:  # no phase 2 left behind for the next iteration to issue
        for job in state._pending:
            job.fail(AggregationError(f"a later bucket's hook failed: {e}"))
        state._pending = []
        if state._pass is not None:
            for _, _, result in state._pass.waiting:
                if not result.done():
                    result.set_exception(AggregationError(f"a later bucket's hook failed: {e}"))
        state._pass = None
        raise
    finally:
        if last:
            state._end()
            state.iter += 1


# ---------------------------------------------------------------------------- overlapped exchanges
# The protocols themselves (qoda.comm.protocol, qoda.comm.exchanges) are shared with the synchronous
# Aggregator: here their stages are only issued from hook bodies and finished in futures.
class _Job:
    """One group's overlapped exchange: stages issued from hook bodies, finished in a callback."""

    def __init__(
        self, state: QodaHookState, agg: Aggregator, grads: Sequence[torch.Tensor], buffer: torch.Tensor | None,
        step: int,
    ) -> None:  # fmt: skip
        self.state, self.agg, self.buffer, self.step = state, agg, buffer, step
        self.exchange: Protocol = agg.exchange(grads, step)
        self.result: torch.futures.Future[torch.Tensor] = torch.futures.Future()  # what DDP waits for

    def start(self) -> None:
        self.exchange.start()
        self._finish_when_issued()

    def advance(self) -> None:
        """From the body of a later bucket (or of the pass's last one): the next stage."""
        self.exchange.advance()
        self._finish_when_issued()

    def _finish_when_issued(self) -> None:
        if self.exchange.remaining:
            return
        assert self.exchange.work is not None

        def finish(f: torch.futures.Future) -> None:
            try:
                f.value()  # re-raises a failed collective
                self.state._add_stats(self.agg, self.exchange.finish(), self.step)
            except Exception as e:
                self.result.set_exception(e)
                return
            self.result.set_result(self.buffer)

        self.exchange.work.get_future().add_done_callback(finish)

    def fail(self, error: Exception) -> None:
        if not self.result.done():
            self.result.set_exception(error)


def _overlapped(
    state: QodaHookState, agg: Aggregator, grads: Sequence[torch.Tensor], buffer: torch.Tensor | None, step: int,
) -> torch.futures.Future[torch.Tensor]:  # fmt: skip
    """Pipelined exchange, any protocol.  Its first stage is issued here; each later stage (which
    needs the previous one's result) from the next group's exchange or, for the pass's last groups,
    by :func:`_flush` at the end of the last bucket's body; never from a callback.  Two-phase:
    ``P1(0) | P1(1) P2(0) | P1(2) P2(1) | ... | P1(n-1) P2(n-2) P2(n-1)``: phase 1 of a bucket
    travels while backward computes the next bucket.  Allgather: one stage, finished in the
    all-gather's continuation."""
    job = _Job(state, agg, grads, buffer, step)
    pending, state._pending = state._pending, []
    try:
        job.start()
        for older in pending:
            older.advance()
        state._pending = [j for j in (*pending, job) if j.exchange.remaining]
    except Exception as e:
        for j in (*pending, job):
            j.fail(e)
        raise
    # through then(): DDP receives a proper error (value() re-raises a set exception), not an
    # exception object it would try to read as the bucket's tensor
    return job.result.then(_value)


def _flush(state: QodaHookState) -> None:
    """End of the last bucket's body: issue every stage still due (overlap)."""
    pending, state._pending = state._pending, []
    try:
        while pending:
            for job in pending:
                job.advance()
            pending = [j for j in pending if j.exchange.remaining]
    except Exception as e:
        for job in pending:
            job.fail(e)
        raise


def _value(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
    return f.value()


__all__ = ["STATE_DICT_VERSION", "Group", "QodaHookState", "qoda_hook", "sub_plan"]
