"""``qoda train --task lm``: a causal byte-level transformer, trained data-parallel through DDP.

Per iteration each worker draws ``batch_size`` random windows of ``lm_context`` bytes from the
training part of the standard-library corpus (:mod:`qoda.lm.corpus`; its own stream, a function
of ``(seed, rank)``, checkpointed), computes the mean next-byte cross-entropy through the
DDP-wrapped :class:`~qoda.lm.model.ByteTransformer`, and ``backward()`` averages the gradients
bucket by bucket through the communication hook of ``--compression``
(:mod:`qoda.train.ddp`: PyTorch's all-reduce, fp16 or PowerSGD hook, or qoda's layer-wise hook
with adaptive levels and DP widths).  AdamW (``torch.optim.AdamW``) or QODA with its Adam
preconditioner (no averager: DDP has averaged) then steps.  Every ``eval_every`` steps the
workers score the same held-out windows together (:meth:`LMTrainer.evaluate`): the validation
loss in nats per byte, its perplexity and bits per byte.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from qoda.comm.aggregate import derive_seed
from qoda.comm.ddp_hook import QodaHookState
from qoda.lm.corpus import MODULES, batches, load_corpus, split, windows
from qoda.lm.model import ByteTransformer
from qoda.optim.dual_averaging import QODA
from qoda.train import checkpoint
from qoda.train.config import TrainConfig
from qoda.train.ddp import build_comm_hook
from qoda.train.outputs import REPORT_UNITS, plot_lm_curves
from qoda.train.trainer import NonFiniteGradientError, resolve_device, window_mean
from qoda.utils.system import allocator


def build_model(cfg: TrainConfig) -> ByteTransformer:
    """The transformer of ``cfg`` (feed-forward width ``4 lm_dim``), on the current default device."""
    return ByteTransformer(cfg.lm_dim, cfg.lm_heads, cfg.lm_layers, 4 * cfg.lm_dim, cfg.lm_context)


def corpus_description(data: torch.Tensor, val: torch.Tensor) -> str:
    return (f"standard-library source corpus ({len(MODULES)} modules), {data.numel():,} training bytes, "
            f"{val.numel():,} held-out bytes")  # fmt: skip


class LMTrainer:
    """One worker of a ``qoda train --task lm`` run (the contract of :class:`qoda.train.task.Task`)."""

    hparam_metrics = ("eval/val_loss", "eval/val_perplexity")

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.train_data, self.val_data = split(load_corpus())
        self.description = corpus_description(self.train_data, self.val_data)
        self.train_data = self.train_data.to(self.device)
        torch.manual_seed(cfg.seed)  # identical initial models on every worker
        self.model = build_model(cfg).to(self.device)
        self.numel = sum(p.numel() for p in self.model.parameters())
        self.ddp = nn.parallel.DistributedDataParallel(self.model, bucket_cap_mb=cfg.ddp_bucket_mb)
        self.hook = build_comm_hook(cfg, self.model, world)
        self.hook.register(self.ddp)
        if cfg.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
            )
        else:  # QODA-Adam: DDP has averaged the gradients, so no averager
            self.optimizer = QODA(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.rng = torch.Generator().manual_seed(derive_seed(cfg.seed, rank, 0x1A4D) & 0x7FFFFFFFFFFFFFFF)
        self.step = 0
        self.skipped = 0
        self.elapsed = 0.0
        self.train_seconds = 0.0  # sum of step times (the time-to-quality benchmark's clock)
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, Any]] = []
        self.width_changes: list[dict[str, Any]] = []  # {"step", "widths"} whenever the hook's widths change
        self._settled = False

    # ------------------------------------------------------------------ state
    def save_checkpoint(self) -> None:
        common = None
        if self.rank == 0:
            common = {
                "config": self.cfg.to_dict(), "fingerprint": self.cfg.fingerprint(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": self.history, "evals": self.evals, "elapsed": self.elapsed,
                "train_seconds": self.train_seconds, "skipped": self.skipped,
                "width_changes": self.width_changes,
            }  # fmt: skip
        mine = {"rng": self.rng.get_state(), "hook": self.hook.state_dict()}
        checkpoint.save(self.out, self.step, common, mine, self.rank, self.world)

    def load_checkpoint(self) -> None:
        common, mine = checkpoint.load(self.out, self.cfg, self.rank, self.world)
        if "model" not in common:
            raise checkpoint.CheckpointError(f"resume: the checkpoint in {self.out} holds no language model")
        self.model.load_state_dict(common["model"])
        self.optimizer.load_state_dict(common["optimizer"])
        self.history, self.evals = common["history"], common["evals"]
        self.elapsed, self.train_seconds = float(common["elapsed"]), float(common["train_seconds"])
        self.step, self.skipped = int(common["step"]), int(common["skipped"])
        self.width_changes = list(common.get("width_changes", []))
        self.rng.set_state(mine["rng"])
        self.hook.load_state_dict(mine["hook"])

    # ------------------------------------------------------------------ one iteration
    def _loss(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        logits = (model or self.ddp)(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def _settle(self) -> None:
        """Before this process's first step: DDP's buckets settled without an exchange (see
        :meth:`qoda.train.ddp.CommHook.settle`), on the first training windows (no random draw)."""
        x, y = windows(self.train_data, self.cfg.lm_context, 1)
        self.hook.settle(lambda: self._loss(x, y).backward(), self.model)
        self._settled = True

    def train_step(self) -> dict[str, float]:
        """One iteration; its record (rank 0's batch loss, this rank's exchange costs, step time)."""
        if not self._settled:
            self._settle()
        cfg = self.cfg
        x, y = batches(self.train_data, cfg.batch_size, cfg.lm_context, self.rng)
        before = copy.copy(self.hook.stats)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(x, y)
        loss.backward()  # DDP averages the gradients through the hook, bucket by bucket
        # the averaged gradients are the same on every rank, so every rank takes the same decision
        if not torch.stack([torch.isfinite(p.grad).all() for p in self.model.parameters()]).all():
            raise NonFiniteGradientError(
                f"step {self.step}: non-finite (NaN/Inf) averaged gradients; every worker stops here (lower --lr)"
            )
        self.optimizer.step()
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds
        after = self.hook.stats
        comm = {k: getattr(after, k) - getattr(before, k) for k in ("payload_bits", "encode_seconds",
                                                                  "comm_seconds", "decode_seconds")}  # fmt: skip
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"step {self.step}: non-finite training loss; lower --lr")
        self.step += 1
        return {
            "step": self.step,
            "train_loss": value,
            "bits": comm["payload_bits"],
            "compression_ratio": 32.0 * self.numel / max(comm["payload_bits"], 1),
            "step_seconds": seconds,
            "train_seconds": self.train_seconds,
            "encode_seconds": comm["encode_seconds"],
            "comm_seconds": comm["comm_seconds"],
            "decode_seconds": comm["decode_seconds"],
            # DDP overlaps the exchange with backward: this is the step minus the hook's own clocks
            "compute_seconds": seconds - comm["encode_seconds"] - comm["comm_seconds"] - comm["decode_seconds"],
        }

    # ------------------------------------------------------------------ evaluation and outputs
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Collective: the mean next-byte cross-entropy over the first ``val_windows`` held-out
        windows (each worker scores its share, the sums are all-reduced: every worker gets the
        same value); the row is appended to :attr:`evals`."""
        x, y = windows(self.val_data, self.cfg.lm_context, self.cfg.val_windows)
        mine = slice(self.rank, None, self.world)
        self.model.eval()
        try:
            xs, ys = x[mine].to(self.device), y[mine].to(self.device)
            total = F.cross_entropy(self.model(xs).reshape(-1, 256), ys.reshape(-1), reduction="sum").double()
        finally:
            self.model.train()
        sums = torch.stack([total, torch.tensor(float(ys.numel()), dtype=torch.float64, device=total.device)])
        dist.all_reduce(sums)
        loss = float(sums[0] / sums[1])
        row = {"step": self.step, "seconds": self.elapsed, "train_seconds": self.train_seconds, "val_loss": loss,
               "val_perplexity": math.exp(loss), "val_bits_per_byte": loss / math.log(2),
               "val_bytes": int(sums[1])}  # fmt: skip
        self.evals.append(row)
        return row

    def track_widths(self) -> dict[str, int] | None:
        """Record the qoda hook's widths in :attr:`width_changes` when they differ from the last
        record (``{"step": completed steps, "widths": {name: bits}}``); returns them when they changed."""
        widths = self._hook_widths()
        if not widths or (self.width_changes and self.width_changes[-1]["widths"] == widths):
            return None
        self.width_changes.append({"step": self.step, "widths": widths})
        return widths

    def _hook_widths(self) -> dict[str, int]:
        """The qoda hook's widths while it compresses (empty for other hooks and in its fp32 warm-up)."""
        state = self.hook.state
        if not isinstance(state, QodaHookState) or state.iter < state.start_iter or state.plan is None:
            return {}
        return state.plan.widths()

    def log_window(self, window: list[dict[str, float]], writer: Any, bar: Any) -> None:
        mean = window_mean(window, self.step, self.elapsed)
        mean["train_seconds"] = self.train_seconds
        summary = self.hook.summary()
        for k in ("quant_variance", "bits_per_coordinate"):  # the qoda hook's, at the window's last step
            v = summary.get("variance" if k == "quant_variance" else k) if summary else None
            if v is not None:
                mean[k] = float(v)
        self.history.append(mean)
        if writer is not None:
            for k in ("train_loss", "bits", "compression_ratio", "step_seconds", "compute_seconds", "encode_seconds",
                      "comm_seconds", "decode_seconds"):  # fmt: skip
                writer.add_scalar(f"train/{k}", mean[k], self.step)
            writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
            if summary is not None:  # the qoda hook: widths, variance and bits per coordinate
                for k, v in self.hook.state.metrics(prefix="quant/").items():
                    writer.add_scalar(k, v, self.step)
        if bar is not None:
            bar.set_postfix(loss=f"{mean['train_loss']:.3f}", bits=f"{mean['bits'] / 1e6:.2f}M",
                            ratio=f"{mean['compression_ratio']:.1f}x", s_step=f"{mean['step_seconds']:.3f}",
                            refresh=False)  # fmt: skip

    def after_step(self, lead: bool, writer: Any, bar: Any) -> None:
        cfg, s = self.cfg, self.step
        if s % cfg.eval_every == 0 or s == cfg.steps:
            row = self.evaluate()
            if writer is not None:
                writer.add_scalar("eval/val_loss", row["val_loss"], s)
                writer.add_scalar("eval/val_perplexity", row["val_perplexity"], s)
            if bar is not None:
                bar.write(f"step {s}: validation loss {row['val_loss']:.4f} nats/byte, perplexity "
                          f"{row['val_perplexity']:.3f} ({row['val_bytes']} bytes)")  # fmt: skip
        if s % cfg.checkpoint_every == 0 or s == cfg.steps:
            self.save_checkpoint()

    def report(self, world: int) -> dict[str, Any]:
        cfg, last = self.cfg, self.evals[-1]
        stats = self.hook.stats
        iters = max(self.step, 1)
        tail = self.history[len(self.history) // 2 :] or self.history

        def avg(k: str) -> float:
            vals = [h[k] for h in tail if k in h]
            return sum(vals) / len(vals) if vals else 0.0

        summary = self.hook.summary()
        plan = self.hook.state.plan if summary is not None else None
        widths = plan.widths() if plan is not None else {}
        return {
            "task": "lm",
            "steps": self.step,
            "val_loss": last["val_loss"],
            "val_perplexity": last["val_perplexity"],
            "val_bits_per_byte": last["val_bits_per_byte"],
            "val_bytes": last["val_bytes"],
            "val_history": self.evals,
            "train_loss": avg("train_loss"),
            "bits_per_step": stats.payload_bits / iters,
            "bytes_sent_per_step": stats.bytes_sent / iters,
            "compression_ratio": 32.0 * self.numel * iters / max(stats.payload_bits, 1),
            "seconds": self.elapsed,
            "seconds_per_step": self.elapsed / iters,
            "train_seconds": self.train_seconds,
            "workers": world,
            "optimizer": cfg.optimizer,
            "compression": cfg.compression,
            "bits": cfg.wire_bits or 32,
            "mode": cfg.mode if cfg.quantized else "allreduce",
            "dataset": self.description,
            "parameters": self.numel,
            "exchanges_per_step": 1,
            "step_seconds": avg("step_seconds"),
            "compute_seconds": avg("compute_seconds"),
            "encode_seconds": avg("encode_seconds"),
            "comm_seconds": avg("comm_seconds"),
            "decode_seconds": avg("decode_seconds"),
            "widths": widths,
            # per logging window: the hook's exact variance and bits per coordinate at the window's last step
            "windows": [
                {k: h[k] for k in ("step", "quant_variance", "bits_per_coordinate") if k in h} for h in self.history
            ],
            "width_changes": self.width_changes,
            "quant_variance": (summary or {}).get("variance") or 0.0,
            "wire_bits_per_coordinate": (summary or {}).get("bits_per_coordinate") or (cfg.wire_bits or 32),
            "allocator": allocator(),
            "units": dict(REPORT_UNITS),
        }

    def write_final(self, world: int) -> None:
        cfg = self.cfg
        title = (f"byte-level transformer ({self.numel:,} parameters) / {cfg.optimizer} / {cfg.compression} "
                 f"({cfg.bits} bits) / {world} workers")  # fmt: skip
        plot_lm_curves(self.history, self.evals, self.out / "curves.png", title)
