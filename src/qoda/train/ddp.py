"""The language model's gradient exchange: plain DDP with one communication hook per ``--compression``.

This is how language models are trained data-parallel, and what a user's own script does::

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, hook)

The hook of each choice (:func:`build_comm_hook` calls the builder its registry entry names):

* ``none``: PyTorch's ``allreduce_hook`` (what DDP does without a hook: fp32 all-reduce);
* ``fp16``: PyTorch's ``fp16_compress_hook``;
* ``powersgd``: PyTorch's ``powerSGD_hook`` (rank ``powersgd_rank``, error feedback and warm
  start, ``powersgd_start_iter`` all-reduce iterations first);
* the quantized choices: :func:`~qoda.comm.ddp_hook.qoda_hook` with a
  :class:`~qoda.comm.ddp_hook.QodaHookState` whose policy, adaptive levels and DP widths come from
  the same options as the GAN's averager (:mod:`qoda.train.compression`);
* a compressor's choice (e.g. ``topk``): the same hook with the compressor built per exchange.

:class:`CommHook` wraps the chosen hook to count what each rank sends and to give every step of
every process the same DDP buckets.  DDP builds its buckets in reverse parameter order and
rebuilds them after the first backward of a process in gradient-ready order, so a resumed process
would exchange its first step in other buckets than the uninterrupted run did (and PowerSGD keeps
its error memories per bucket index).  :meth:`CommHook.settle` therefore runs one backward pass
before the first step of every process, fresh or resumed, in which the hook returns the local
gradients without communicating; every real step then uses the rebuilt buckets.

PowerSGD on gloo (CPU): PyTorch's hook issues its second all-reduce (``Q``) from a future's
callback, and gloo runs a callback on whichever thread completed the previous work, so with
several buckets two ranks can issue the collectives of different buckets in different orders
(gloo aborts: "Received data size doesn't match expected size"; seen with 2 ranks and 4 buckets).
The dispatcher therefore waits for each bucket's PowerSGD exchange in the hook body on gloo, so
every rank issues them in bucket order (no overlap across PowerSGD's buckets on CPU; NCCL keeps
PyTorch's behaviour).  qoda's hook issues every collective from hook bodies by design.
"""

# No `from __future__ import annotations`: DDP checks the hook's real annotations.

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qoda.codec.compressor import Compressor
from qoda.comm import cost
from qoda.comm.averager import CommStats
from qoda.comm.baselines import load_powersgd_state, powersgd_payload_floats, powersgd_state_dict
from qoda.comm.ddp_hook import QodaHookState, qoda_hook
from qoda.train.compression import adapt_config, layer_plan, layer_policy, resolve_allocation
from qoda.train.compressions import COMPRESSIONS
from qoda.train.config import TrainConfig


class CommHook:
    """The state DDP hands to :func:`dispatch_hook`: the chosen hook and its state, this rank's
    costs (``stats``; the qoda hook's own for the quantized choices) and the settling switch.

    ``bucket_bits``: the payload bits of one bucket under a PyTorch hook (``None``: the qoda hook,
    which counts its compressed exchanges itself and its fp32 warm-up here); ``serial``: wait for
    each bucket's exchange in the hook body (PowerSGD on gloo: see the module docstring)."""

    def __init__(
        self, state: Any, hook: Callable[..., torch.futures.Future], world: int,
        bucket_bits: Callable[[dist.GradBucket], int] | None = None, serial: bool = False,
    ) -> None:  # fmt: skip
        self.state, self.hook, self.world = state, hook, world
        self.bucket_bits, self.serial = bucket_bits, serial
        self.settling = False
        self._stats = CommStats()

    @property
    def stats(self) -> CommStats:
        """Cumulative costs of this rank's exchanges (payload bits, bytes sent and received, the
        qoda hook's encode / communication / decode clocks; its fp32 warm-up counted here)."""
        total = CommStats(**self._stats.as_dict())
        if isinstance(self.state, QodaHookState):
            total += self.state.stats
        return total

    def register(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        if isinstance(self.state, QodaHookState):
            self.state.bind(ddp.module)
        ddp.register_comm_hook(self, dispatch_hook)

    def settle(self, backward: Callable[[], None], model: nn.Module) -> None:
        """One backward pass whose buckets are not exchanged (``backward()`` runs it), then the
        gradients are cleared: DDP rebuilds its buckets at the next forward, before any real step."""
        self.settling = True
        try:
            backward()
        finally:
            self.settling = False
        model.zero_grad(set_to_none=True)

    def count(self, bucket: dist.GradBucket) -> None:
        """The costs of one bucket under the PyTorch hooks and the qoda hook's fp32 warm-up (it
        counts its compressed exchanges itself)."""
        bits = self.bucket_bits(bucket) if self.bucket_bits is not None else 32 * bucket.buffer().numel()
        moved = cost.ring_allreduce(self.world, bits // 8)
        self._stats += CommStats(calls=int(bucket.is_last()), payload_bits=bits, bytes_sent=int(moved.bytes_sent),
                                 bytes_received=int(moved.bytes_received))  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to exchange exactly as an uninterrupted one (tensors and plain values)."""
        sd: dict[str, Any] = {"stats": self._stats.as_dict()}
        if isinstance(self.state, QodaHookState):
            sd["qoda"] = self.state.state_dict()
        if self.powersgd:
            sd["powersgd"] = powersgd_state_dict(self.state)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._stats = CommStats(**sd["stats"])
        if isinstance(self.state, QodaHookState):
            self.state.load_state_dict(sd["qoda"])
        if self.powersgd:
            load_powersgd_state(self.state, sd["powersgd"])

    @property
    def powersgd(self) -> bool:
        """Whether the state is PyTorch's ``PowerSGDState`` (checkpointed by its slots)."""
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

        return isinstance(self.state, PowerSGDState)

    def summary(self) -> dict[str, Any] | None:
        """The qoda hook's summary (widths, levels, variance per parameter); ``None`` for the others."""
        return self.state.summary() if isinstance(self.state, QodaHookState) else None


def dispatch_hook(hook: CommHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP hook registered by :meth:`CommHook.register`: the chosen hook, or (settling) the
    local gradients unchanged."""
    if hook.settling:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    if isinstance(hook.state, QodaHookState):
        if hook.state.iter < hook.state.start_iter:  # the qoda hook's fp32 warm-up
            hook.count(bucket)
        return hook.hook(hook.state, bucket)
    hook.count(bucket)
    start = time.perf_counter()
    fut = hook.hook(hook.state, bucket)
    if hook.serial:
        fut.wait()  # its collectives all issued here, in bucket order (see the module docstring)
    hook._stats.encode_seconds += time.perf_counter() - start  # the body: casts, PowerSGD's compression
    return fut


def build_comm_hook(cfg: TrainConfig, model: nn.Module, world: int) -> CommHook:
    """The hook of ``cfg.compression`` for ``model`` (the module DDP wraps), built by its registry
    entry; register it with :meth:`CommHook.register`."""
    return COMPRESSIONS[cfg.compression].build_hook(cfg, model, world)


# ---------------------------------------------------------------------------- the entries' builders
def _numel_bits(per_coordinate: int, bucket: dist.GradBucket) -> int:
    return per_coordinate * bucket.buffer().numel()


def allreduce_hook(cfg: TrainConfig, model: nn.Module, world: int, precision: str) -> CommHook:
    """PyTorch's ``allreduce_hook`` (``fp32``) or ``fp16_compress_hook`` (``fp16``)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if precision == "fp16":
        return CommHook(None, default_hooks.fp16_compress_hook, world, partial(_numel_bits, 16))
    return CommHook(None, default_hooks.allreduce_hook, world, partial(_numel_bits, 32))


def powersgd_hook(cfg: TrainConfig, model: nn.Module, world: int) -> CommHook:
    """PyTorch's ``powerSGD_hook``: rank ``powersgd_rank``, error feedback and warm start,
    ``powersgd_start_iter`` all-reduce iterations first."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    state = powerSGD_hook.PowerSGDState(
        process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
        start_powerSGD_iter=cfg.powersgd_start_iter, use_error_feedback=True, warm_start=True,
        random_seed=cfg.seed,
    )  # fmt: skip

    def bucket_bits(bucket: dist.GradBucket) -> int:
        if state.iter >= state.start_powerSGD_iter:
            return 32 * powersgd_payload_floats([g.shape for g in bucket.gradients()], state.matrix_approximation_rank)
        return 32 * bucket.buffer().numel()

    return CommHook(state, powerSGD_hook.powerSGD_hook, world, bucket_bits, serial=dist.get_backend() == "gloo")


def quantized_hook(cfg: TrainConfig, model: nn.Module, world: int) -> CommHook:
    """qoda's hook: the policy of ``layer_types``; adaptive choices re-fit levels on ``refit_steps``
    / ``refit_every`` and, with bit allocation dp, choose every tensor's width under the ``bits``
    budget (``auto`` resolved on the model's plan as for the GAN)."""
    resolved = resolve_allocation(cfg, layer_plan(cfg, model)) if cfg.adaptive else cfg
    adapt = adapt_config(resolved) if cfg.adaptive else None
    state = QodaHookState(policy=layer_policy(resolved), mode=cfg.mode, start_iter=cfg.hook_start_iter, seed=cfg.seed,
                          adapt=adapt)  # fmt: skip
    return CommHook(state, qoda_hook, world)


def compressor_hook(
    cfg: TrainConfig, model: nn.Module, world: int, compressor: type[Compressor], **settings: Any
) -> CommHook:
    """qoda's hook with a compressor built per exchange as ``compressor(shapes, **settings)``."""
    state = QodaHookState(compressor=partial(compressor, **settings), start_iter=cfg.hook_start_iter, seed=cfg.seed)
    return CommHook(state, qoda_hook, world)


__all__ = [
    "CommHook", "allreduce_hook", "build_comm_hook", "compressor_hook", "dispatch_hook", "powersgd_hook",
    "quantized_hook",
]  # fmt: skip
