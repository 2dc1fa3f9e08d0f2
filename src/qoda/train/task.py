"""The training job a run loop drives: one contract, two implementations (``--task``).

The run loop (:func:`qoda.train.trainer.run_worker`) owns everything common to every job: the
process group, resume from the last committed checkpoint, the run folder (``config.json``,
TensorBoard with the configuration and HParams, the progress bar), the log windows, the final
evaluation and ``report.json``.  A :class:`Task` owns what differs: the models and their
exchange, one training iteration, evaluation (FID / validation loss), checkpoint contents, the
scalars it logs, its report and its final outputs.

* ``gan`` (default): :class:`qoda.train.trainer.Trainer`, the WGAN-GP with QODA and qoda's
  averagers (one exchange of the joint operator per oracle call).
* ``lm``: :class:`qoda.lm.task.LMTrainer`, a causal byte-level transformer on the standard-library
  corpus, trained the way language models are (plain DDP with a communication hook,
  :mod:`qoda.train.ddp`) with AdamW or QODA-Adam.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qoda.data.images import ImageDataset
    from qoda.train.config import TrainConfig


class Task(Protocol):
    """One worker's side of a training job (``world`` processes, this is ``rank``)."""

    cfg: TrainConfig
    rank: int
    world: int
    step: int  # completed iterations (checkpointed)
    elapsed: float  # wall-clock seconds of the training loop, earlier processes included
    history: list[dict[str, float]]  # one row per log window
    evals: list[dict[str, Any]]  # one row per evaluation
    #: the TensorBoard scalars the HParams dashboard compares runs by
    hparam_metrics: tuple[str, ...]

    @property
    def description(self) -> str:
        """The data, in words (``config.json``, TensorBoard)."""

    def train_step(self) -> dict[str, float]:
        """One iteration (collective); its record: losses, bits, step time and its split."""

    def track_widths(self) -> dict[str, int] | None:
        """Record the compressed tensors' widths when they changed since the last record (checkpointed,
        ``report.json``'s ``width_changes``); returns them then, else ``None``."""

    def log_window(self, window: list[dict[str, float]], writer: Any, bar: Any) -> None:
        """Append the mean of the window's records to :attr:`history`; log it (rank 0: ``writer``, ``bar``)."""

    def after_step(self, lead: bool, writer: Any, bar: Any) -> None:
        """Evaluate, write samples and commit checkpoints, each on its cadence (collective)."""

    def evaluate(self) -> dict[str, Any]:
        """Collective: score the current model; the row is appended to :attr:`evals`."""

    def save_checkpoint(self) -> None:
        """Collective: commit a checkpoint of this step (:mod:`qoda.train.checkpoint`)."""

    def load_checkpoint(self) -> None:
        """Restore the committed checkpoint, so that the run continues bit for bit."""

    def report(self, world: int) -> dict[str, Any]:
        """Rank 0, at the end: ``report.json``'s contents (units in :data:`qoda.train.outputs.REPORT_UNITS`)."""

    def write_final(self, world: int) -> None:
        """Rank 0, at the end: the task's final outputs (curves, sample grids)."""


def build_task(cfg: TrainConfig, rank: int, world: int, data: ImageDataset | None = None) -> Task:
    """The task ``cfg.task`` names, for this worker (``data``: the GAN's images, if already loaded)."""
    if cfg.task == "lm":
        from qoda.lm.task import LMTrainer

        return LMTrainer(cfg, rank, world)
    from qoda.train.trainer import Trainer

    return Trainer(cfg, rank, world, data)
