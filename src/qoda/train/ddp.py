"""The language model's gradient exchange: plain DDP with one communication hook per ``--compression``.

This is how language models are trained data-parallel, and what a user's own script does::

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(state, hook)

The hook of each choice (:func:`build_comm_hook`):

* ``none``: PyTorch's ``allreduce_hook`` (what DDP does without a hook: fp32 all-reduce);
* ``fp16``: PyTorch's ``fp16_compress_hook``;
* ``powersgd``: PyTorch's ``powerSGD_hook`` (rank ``powersgd_rank``, error feedback and warm
  start, ``powersgd_start_iter`` all-reduce iterations first);
* the quantized choices: :func:`~qoda.comm.ddp_hook.qoda_hook` with a
  :class:`~qoda.comm.ddp_hook.QodaHookState` whose policy, adaptive levels and DP widths come from
  the same options as the GAN's averager (:mod:`qoda.train.compression`).

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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qoda.comm import cost
from qoda.comm.averager import CommStats
from qoda.comm.baselines import load_powersgd_state, powersgd_payload_floats, powersgd_state_dict
from qoda.comm.ddp_hook import QodaHookState, qoda_hook
from qoda.train.compression import adapt_config, layer_plan, layer_policy, resolve_allocation
from qoda.train.compressions import COMPRESSIONS, Transport
from qoda.train.config import TrainConfig


class CommHook:
    """The state DDP hands to :func:`dispatch_hook`: the chosen hook and its state, this rank's
    costs (``stats``; the qoda hook's own for the quantized choices) and the settling switch."""

    def __init__(self, transport: Transport, state: Any, hook: Callable[..., torch.futures.Future], world: int) -> None:
        self.transport, self.state, self.hook, self.world = transport, state, hook, world
        self.settling = False
        #: PowerSGD waits for each bucket's exchange in the hook body (gloo: see the module docstring)
        self.serial = transport is Transport.POWERSGD and dist.get_backend() == "gloo"
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
        numel = bucket.buffer().numel()
        if self.transport is Transport.POWERSGD and self.state.iter >= self.state.start_powerSGD_iter:
            shapes = [g.shape for g in bucket.gradients()]
            bits = 32 * powersgd_payload_floats(shapes, self.state.matrix_approximation_rank)
        else:
            bits = (16 if self.transport is Transport.FP16 else 32) * numel
        moved = cost.ring_allreduce(self.world, bits // 8)
        self._stats += CommStats(calls=int(bucket.is_last()), payload_bits=bits, bytes_sent=int(moved.bytes_sent),
                                 bytes_received=int(moved.bytes_received))  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to exchange exactly as an uninterrupted one (tensors and plain values)."""
        sd: dict[str, Any] = {"stats": self._stats.as_dict()}
        if isinstance(self.state, QodaHookState):
            sd["qoda"] = self.state.state_dict()
        if self.transport is Transport.POWERSGD:
            sd["powersgd"] = powersgd_state_dict(self.state)
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._stats = CommStats(**sd["stats"])
        if isinstance(self.state, QodaHookState):
            self.state.load_state_dict(sd["qoda"])
        if self.transport is Transport.POWERSGD:
            load_powersgd_state(self.state, sd["powersgd"])

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
    if hook.transport is Transport.QUANTIZED:
        if hook.state.iter < hook.state.start_iter:  # the qoda hook's fp32 warm-up
            hook.count(bucket)
        return hook.hook(hook.state, bucket)
    hook.count(bucket)
    start = time.perf_counter()
    fut = hook.hook(hook.state, bucket)
    if hook.transport is Transport.POWERSGD and hook.serial:
        fut.wait()  # its collectives all issued here, in bucket order (see the module docstring)
    hook._stats.encode_seconds += time.perf_counter() - start  # the body: casts, PowerSGD's compression
    return fut


def build_comm_hook(cfg: TrainConfig, model: nn.Module, world: int) -> CommHook:
    """The hook of ``cfg.compression`` for ``model`` (the module DDP wraps); register it with
    :meth:`CommHook.register`.  Quantized choices: the policy of ``layer_types``; adaptive ones
    re-fit levels on ``refit_steps`` / ``refit_every`` and, with bit allocation dp, choose every
    tensor's width under the ``bits`` budget (``auto`` resolved on the model's plan as for the GAN)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    transport = COMPRESSIONS[cfg.compression].transport
    if transport is Transport.FP32:
        return CommHook(transport, None, default_hooks.allreduce_hook, world)
    if transport is Transport.FP16:
        return CommHook(transport, None, default_hooks.fp16_compress_hook, world)
    if transport is Transport.POWERSGD:
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=cfg.powersgd_start_iter, use_error_feedback=True, warm_start=True,
            random_seed=cfg.seed,
        )  # fmt: skip
        return CommHook(transport, state, powerSGD_hook.powerSGD_hook, world)
    resolved = resolve_allocation(cfg, layer_plan(cfg, model)) if cfg.adaptive else cfg
    adapt = adapt_config(resolved) if cfg.adaptive else None
    state = QodaHookState(policy=layer_policy(resolved), mode=cfg.mode, start_iter=cfg.hook_start_iter, seed=cfg.seed,
                          adapt=adapt)  # fmt: skip
    return CommHook(transport, state, qoda_hook, world)


__all__ = ["CommHook", "build_comm_hook", "dispatch_hook"]
