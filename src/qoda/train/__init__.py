"""The distributed trainer (``qoda train``: the WGAN-GP, or ``--task lm`` the transformer language
model): config, compression, checkpoints, loop, launcher.

``config`` (:class:`TrainConfig`), ``compressions`` (the registry of compression choices),
``compression`` (from a config to an averager), ``ddp`` (the language model's DDP comm hooks),
``task`` (the contract the loop drives), ``trainer`` (one worker's loop, the GAN task), ``launch``
(processes, signals), ``checkpoint`` / ``rundir`` (sharded atomic checkpoints, the run
directory), ``sample`` (generators and images from a finished run), ``game`` and ``outputs``.

The public names below are loaded on first use (as in :mod:`qoda`), so importing one light
module such as ``qoda.train.config`` does not import the whole training stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qoda.utils.lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "ConfigError": "qoda.train.config",
    "TrainConfig": "qoda.train.config",
    "COMPRESSIONS": "qoda.train.compressions",
    "CompressionSpec": "qoda.train.compressions",
    "build_averager": "qoda.train.compression",
    "layer_plan": "qoda.train.compression",
    "Trainer": "qoda.train.trainer",
    "run_worker": "qoda.train.trainer",
    "train": "qoda.train.launch",
    "Interrupted": "qoda.train.launch",
    "WorkerError": "qoda.train.launch",
    "CheckpointError": "qoda.train.checkpoint",
    "RunError": "qoda.train.sample",
    "load_generator": "qoda.train.sample",
    "write_sample_grid": "qoda.train.sample",
}

__all__ = [
    "COMPRESSIONS", "CheckpointError", "CompressionSpec", "ConfigError", "Interrupted", "RunError", "TrainConfig",
    "Trainer", "WorkerError", "build_averager", "layer_plan", "load_generator", "run_worker", "train",
    "write_sample_grid",
]  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # for type checkers and IDEs; nothing is imported at run time
    from qoda.train.checkpoint import CheckpointError
    from qoda.train.compression import build_averager, layer_plan
    from qoda.train.compressions import COMPRESSIONS, CompressionSpec
    from qoda.train.config import ConfigError, TrainConfig
    from qoda.train.launch import Interrupted, WorkerError, train
    from qoda.train.sample import RunError, load_generator, write_sample_grid
    from qoda.train.trainer import Trainer, run_worker
