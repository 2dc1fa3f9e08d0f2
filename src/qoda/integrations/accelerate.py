"""qoda's DDP communication hook with Hugging Face accelerate (``accelerate`` >= 1.0).

accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` only knows PyTorch's own hooks
(an enum); a callable such as ``qoda_hook`` is accepted and silently ignored.  Register the
hook after ``prepare()`` instead::

    from accelerate import Accelerator
    from qoda import LayerPolicy, QodaHookState, QuantizerConfig
    from qoda.integrations.accelerate import register_qoda_hook

    accelerator = Accelerator()                       # Accelerator(cpu=True) on CPU/gloo
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4)), mode="allgather")
    register_qoda_hook(accelerator, model, state)     # hook on the DDP model + state checkpointed
    ...
    accelerator.save_state("ckpt")                    # also writes the hook state
    accelerator.load_state("ckpt")                    # restores iteration, costs, fitted levels

Launch on CPU with ``torchrun --nproc_per_node 2 script.py`` (``accelerate launch --multi_gpu
--num_processes 2`` also works; ``accelerate launch --cpu`` starts one process).  Log the hook with
``accelerator.log(state.metrics(), step=step)``.

``register_for_checkpointing`` restores custom objects by registration order: register the
hook state at the same point in the resumed script as in the original one.
"""

from __future__ import annotations

import warnings

from accelerate import Accelerator
from torch import nn

from qoda.comm.ddp_hook import QodaHookState

__all__ = ["register_qoda_hook"]


def _find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper returned by ``prepare()`` (possibly under compile's ``_orig_mod``)."""
    while model is not None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        model = getattr(model, "_orig_mod", None)
    return None


def register_qoda_hook(
    accelerator: Accelerator, model: nn.Module, state: QodaHookState, checkpoint: bool = True
) -> QodaHookState:
    """Register :func:`~qoda.comm.ddp_hook.qoda_hook` on ``model`` (the output of
    ``accelerator.prepare``) and, with ``checkpoint``, the state for ``save_state``/``load_state``.

    A single process has nothing to average: the hook is not registered (a warning says so) but
    the state is still checkpointed, so scripts stay the same.  Returns ``state``.
    """
    if not isinstance(state, QodaHookState):
        raise TypeError(f"state: expected a QodaHookState, got {type(state).__name__}")
    ddp = _find_ddp(model)
    if ddp is None:
        if accelerator.num_processes > 1:
            raise RuntimeError(
                f"register_qoda_hook: {type(model).__name__} is not wrapped in DistributedDataParallel; "
                "pass the model returned by accelerator.prepare() (DDP, not FSDP/DeepSpeed)"
            )
        warnings.warn("register_qoda_hook: one process, no DDP model: the hook is not registered", stacklevel=2)
    else:
        state.register(ddp)
    if checkpoint:
        accelerator.register_for_checkpointing(state)
    return state
