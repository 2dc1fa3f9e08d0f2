"""qoda's DDP communication hook in PyTorch Lightning (``lightning`` >= 2.4).

Lightning's ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` registers the hook only on
CUDA devices and silently ignores it elsewhere (CPU/gloo).  Two ways to get it everywhere::

    from lightning import Trainer
    from qoda import LayerPolicy, QodaHookState, QuantizerConfig
    from qoda.integrations.lightning import QodaDDPStrategy

    state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4)), mode="allgather")
    trainer = Trainer(accelerator="cpu", devices=2, strategy=QodaDDPStrategy(state))  # any DDP kwargs too
    trainer.fit(model)                                  # checkpoints carry the hook state
    trainer.fit(model, ckpt_path="last.ckpt")           # restores iteration, costs, fitted levels

or, with a strategy you already configure, ``Trainer(strategy="ddp", callbacks=[QodaHookCallback(state)])``.

Both bind the state to the ``LightningModule`` and register the hook once Lightning has wrapped
the model in ``DistributedDataParallel``, and save ``state.state_dict()`` in every checkpoint
(the strategy under the key ``"qoda_hook_state"``, the callback as a callback state).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from qoda.comm.ddp_hook import QodaHookState, qoda_hook

CHECKPOINT_KEY = "qoda_hook_state"

__all__ = ["CHECKPOINT_KEY", "QodaDDPStrategy", "QodaHookCallback"]


def _register(state: QodaHookState, model: Any) -> None:
    if not isinstance(model, DistributedDataParallel):
        raise RuntimeError(
            f"qoda: expected Lightning to have wrapped the model in DistributedDataParallel, got {type(model).__name__}"
        )
    state.register(model)


class QodaDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that registers :func:`~qoda.comm.ddp_hook.qoda_hook` on any device.

    Args:
        hook_state: the hook's state (bound to the ``LightningModule`` here).
        **kwargs: everything ``DDPStrategy`` takes (``ddp_comm_hook``/``ddp_comm_state``
            excepted: the hook is qoda's), e.g. ``process_group_backend="gloo"``, ``bucket_cap_mb``.
    """

    strategy_name = "qoda_ddp"

    def __init__(self, hook_state: QodaHookState, **kwargs: Any) -> None:
        if not isinstance(hook_state, QodaHookState):
            raise TypeError(f"hook_state: expected a QodaHookState, got {type(hook_state).__name__}")
        hook = kwargs.pop("ddp_comm_hook", None)
        if hook is not None and hook is not qoda_hook:
            raise ValueError("QodaDDPStrategy registers qoda_hook; use DDPStrategy for another hook")
        comm_state = kwargs.pop("ddp_comm_state", None)
        if comm_state is not None and comm_state is not hook_state:
            raise ValueError("ddp_comm_state: pass the QodaHookState as hook_state")
        if kwargs.get("ddp_comm_wrapper") is not None:
            raise ValueError("ddp_comm_wrapper: not supported with qoda's hook (it already compresses)")
        super().__init__(**kwargs)
        self.hook_state = hook_state

    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the model; registers no hook (none was given to DDPStrategy)
        _register(self.hook_state, self.model)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:  # every rank calls it; rank 0 writes
        checkpoint[CHECKPOINT_KEY] = self.hook_state.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)  # every rank reads it
        if CHECKPOINT_KEY in checkpoint:
            self.hook_state.load_state_dict(checkpoint[CHECKPOINT_KEY])
        return checkpoint


class QodaHookCallback(Callback):
    """Registers the hook on the DDP model of any DDP strategy at fit start, checkpoints the
    state with the callback states (restored before training resumes) and, when the trainer has
    a logger, logs :meth:`QodaHookState.metrics` every ``log_every_n_steps`` (TensorBoard: ``qoda/...``).
    With :class:`QodaDDPStrategy` it only logs and checkpoints (the strategy registers the hook)."""

    def __init__(self, hook_state: QodaHookState) -> None:
        if not isinstance(hook_state, QodaHookState):
            raise TypeError(f"hook_state: expected a QodaHookState, got {type(hook_state).__name__}")
        self.hook_state = hook_state
        self._registered: int | None = None  # id of the DDP model the hook is on

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        if trainer.logger is None or trainer.global_step % every or not trainer.is_global_zero:
            return
        metrics = self.hook_state.metrics()
        if metrics:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(trainer.strategy, QodaDDPStrategy) or self._registered == id(model):
            return  # the strategy registers it itself
        _register(self.hook_state, model)
        self._registered = id(model)

    def state_dict(self) -> dict[str, Any]:
        return self.hook_state.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.hook_state.load_state_dict(state_dict)
