"""The distributed WGAN-GP training loop (one process per worker).

Per iteration ``t`` (tuning guide in the README, section "qoda train"):

1. Oracle: each worker draws its own batch (its data shard, :class:`ShardSampler`, indexed by
   the optimizer's oracle-call counter) and latents, and sets ``.grad`` to the WGAN-GP operator
   ``V = (grad_G L_G, grad_D L_D)`` at the current point (:func:`wgan_gp_operator`).
2. Exchange: the optimizer hands the whole operator to its averager (fp32/fp16 all-reduce or
   layer-wise quantized aggregation, adaptive levels re-fitted on schedule) and steps both
   players jointly.  Two-call methods (Q-GenX, ExtraAdam) repeat 1-2 at the extrapolated point.
3. The generator's EMA is updated (decay warmed up, :func:`ema_decay`); rank 0 logs losses,
   learning rates, bits and the step time split into compute / encode / communication / decode;
   every ``eval_every`` steps all workers compute the FID of the EMA and of the raw generator
   together; every ``sample_every`` steps rank 0 writes sample grids of both (PNG and
   TensorBoard); every ``checkpoint_every`` steps a sharded atomic checkpoint is committed.

Everything random is a function of ``(seed, rank, counters)`` or lives in the checkpoint, so
``--resume`` continues bit for bit.

:func:`run_worker` drives any :class:`~qoda.train.task.Task`: :class:`Trainer` here (the GAN,
``--task gan``) or the language model of ``--task lm`` (:mod:`qoda.lm.task`).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qoda.codec.layerwise import fixed_message_bits
from qoda.comm.aggregate import derive_seed
from qoda.comm.averager import Averager
from qoda.data.images import ImageDataset, load_dataset
from qoda.data.sampler import ShardSampler
from qoda.eval.features import build_extractor, default_cache_dir
from qoda.eval.fid import FIDEvaluator
from qoda.gan.models import LATENT, DCGANCritic, DCGANGenerator, ResNetCritic, ResNetGenerator
from qoda.optim import create_optimizer
from qoda.optim.base import VIOptimizer
from qoda.quant.kernels.warmup import announce_if_slow
from qoda.quant.policy import LayerPlan
from qoda.quant.variance import plan_variance
from qoda.train import checkpoint
from qoda.train.compression import build_averager
from qoda.train.config import ConfigError, TrainConfig
from qoda.train.game import GameLosses, wgan_gp_operator
from qoda.train.outputs import REPORT_UNITS, grid_tensor, plot_curves, save_grid
from qoda.train.task import Task, build_task
from qoda.utils.atomic import atomic_write_json
from qoda.utils.system import allocator


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda``; ``cuda`` without a usable GPU raises :class:`ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: 'cuda' requested but this torch ({torch.__version__}) sees no CUDA device; use --device cpu "
                "or auto"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the EMA update that follows ``updates`` earlier ones: ``min(decay, (1 + t) / (10 + t))``.

    The warm-up lets the average forget the random initialisation after a few dozen updates
    (after ``k`` updates its weight is ``1 / C(k + 9, 9)`` while the cap is not reached) instead
    of the ``decay ** k`` of a constant decay (0.999: still 22% after 1,500 updates)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, updates: int) -> None:
    """One EMA update of ``ema`` towards ``model`` (parameters averaged with :func:`ema_decay`,
    buffers copied)."""
    weight = 1.0 - ema_decay(decay, updates)
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, weight)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def build_models(cfg: TrainConfig, channels: int) -> tuple[nn.Module, nn.Module]:
    if cfg.model == "dcgan":
        return DCGANGenerator(LATENT, cfg.width, channels, cfg.norm), DCGANCritic(cfg.width, channels)
    return ResNetGenerator(LATENT, cfg.width, channels, cfg.norm), ResNetCritic(cfg.width, channels)


def _plan_of(averager: Averager) -> LayerPlan:
    """The current layer plan (levels included) of a quantizing averager."""
    plan = averager.plan
    if plan is None:
        raise TypeError(f"{type(averager).__name__} does not quantize with a layer plan")
    return plan


def plan_summary(plan: LayerPlan | None, numel: int) -> dict[str, Any]:
    """Bits per coordinate of every compressed tensor (``widths``; absent tensors travel as float32)
    and of one whole message of ``plan`` (``wire_bits_per_coordinate``: codes, norms, headers and
    uncompressed tensors, fixed-width size); fp32 for an averager without a plan."""
    if plan is None:
        return {"widths": {}, "wire_bits_per_coordinate": 32.0}
    return {"widths": plan.widths(), "wire_bits_per_coordinate": fixed_message_bits(plan) / max(numel, 1)}


def quantization_variance(params: list[torch.Tensor], plan: LayerPlan) -> float:
    """Exact ``E||Q(g) - g||^2 / ||g||^2`` of this worker's current gradients under ``plan``."""
    return plan_variance([p.grad for p in params], plan)


class WorkerLostError(RuntimeError):
    """A collective failed because a peer died or stalled (raised on the surviving workers)."""


_TRANSPORT_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "broken pipe", "peer")


def _is_transport_failure(e: RuntimeError) -> bool:
    """A torch.distributed transport error (not one of qoda's own, which carry their own message)."""
    from qoda.comm.aggregate import AggregationError

    if isinstance(e, AggregationError | WorkerLostError):
        return False
    msg = str(e).lower()
    return any(m in msg for m in _TRANSPORT_MARKERS)


def _console(message: str) -> None:
    """One ``qoda train:`` line on stderr, above the progress bar if one is shown."""
    from tqdm import tqdm

    tqdm.write(f"qoda train: {message}", file=sys.stderr)


class NonFiniteGradientError(FloatingPointError):
    """A worker produced NaN/Inf gradients (raised on every worker at the same step)."""


class Trainer:
    """One worker of a ``qoda train`` run (``world`` processes, this is ``rank``)."""

    def __init__(
        self, cfg: TrainConfig, rank: int = 0, world: int = 1, data: ImageDataset | None = None,
        averager: Averager | None = None,
    ) -> None:  # fmt: skip
        """``averager`` replaces the one ``cfg.compression`` builds (benchmarks: the compute-only
        bound uses :class:`~qoda.comm.baselines.LocalAverager`)."""
        self.cfg, self.rank, self.world = cfg, rank, world
        self.out = Path(cfg.out)
        self.data = data if data is not None else load_dataset(cfg.dataset, cfg.data_root and Path(cfg.data_root))
        self.device = resolve_device(cfg.device)
        self.images = self.data.images.to(self.device)
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            torch.manual_seed(cfg.seed)  # identical initial models on every worker
            generator, critic = build_models(cfg, self.data.channels)
        self.generator, self.critic = generator.to(self.device), critic.to(self.device)
        self.players = nn.ModuleDict({"generator": self.generator, "critic": self.critic})
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.ema_updates = 0  # number of EMA updates so far (the warm-up's t; checkpointed)
        self.averager: Averager = averager if averager is not None else build_averager(cfg, self.players)
        groups = [
            {"params": list(self.generator.parameters()), "lr": cfg.lr_g},
            {"params": list(self.critic.parameters()), "lr": cfg.lr_d},
        ]
        self.optimizer: VIOptimizer = create_optimizer(
            cfg.optimizer, groups, averager=self.averager, lr=cfg.lr_g, **cfg.optimizer_kwargs()
        )
        self.sampler = ShardSampler(len(self.data), rank, world, cfg.batch_size, cfg.seed)
        self.rng = torch.Generator().manual_seed(derive_seed(cfg.seed, rank, 0x5A17) & 0x7FFFFFFFFFFFFFFF)
        self.fixed_z = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(cfg.seed + 12345)).to(
            self.device
        )
        self.step = 0
        self.skipped = 0  # iterations dropped by nonfinite = "skip"
        self.quant_variance: float | None = None  # at the last log step, on the local gradient before the exchange
        self.elapsed = 0.0  # training seconds before this process (resume)
        self.history: list[dict[str, float]] = []
        self.width_changes: list[dict[str, Any]] = []  # {"step", "widths"} whenever the widths change
        self.evals: list[dict[str, Any]] = []
        self.fid: FIDEvaluator | None = None
        self.numel = sum(p.numel() for p in self.players.parameters())

    # ------------------------------------------------------------------ state
    def _common_state(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "fingerprint": self.cfg.fingerprint(),
            "generator": self.generator.state_dict(),
            "critic": self.critic.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_updates": self.ema_updates,
            "channels": self.data.channels,
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "width_changes": self.width_changes,
            "evals": self.evals,
            "elapsed": self.elapsed,
            "skipped": self.skipped,
        }

    def _rank_state(self) -> dict[str, Any]:
        return {
            "rng": self.rng.get_state(),
            "torch_rng": torch.random.get_rng_state(),
            "counters": self.optimizer.counters,
            "averager": self.averager.state_dict(),
        }

    def save_checkpoint(self) -> None:
        common = self._common_state() if self.rank == 0 else None
        checkpoint.save(self.out, self.step, common, self._rank_state(), self.rank, self.world)

    def load_checkpoint(self) -> None:
        common, mine = checkpoint.load(self.out, self.cfg, self.rank, self.world)
        self.generator.load_state_dict(common["generator"])
        self.critic.load_state_dict(common["critic"])
        self.ema.load_state_dict(common["ema"])
        self.optimizer.load_state_dict(common["optimizer"])
        self.optimizer.group.update(mine["counters"])
        self.history, self.evals, self.elapsed = common["history"], common["evals"], float(common["elapsed"])
        self.width_changes = list(common.get("width_changes", []))
        self.step = int(common["step"])
        self.ema_updates = int(common.get("ema_updates", self.step))  # one update per iteration
        self.skipped = int(common.get("skipped", 0))
        self.rng.set_state(mine["rng"])
        torch.random.set_rng_state(mine["torch_rng"])
        self.averager.load_state_dict(mine["averager"])

    # ------------------------------------------------------------------ one iteration
    def _oracle(self, update_generator: bool, call: int) -> Any:
        calls = self.optimizer.calls_per_iteration
        idx = self.sampler.batch(self.step * calls + call)
        z = torch.randn(len(idx), LATENT, generator=self.rng).to(self.device)  # CPU stream on any device
        start = None
        if self.averager.starts_parts:  # average the generator's part (part 0) during the critic's

            def start(grads: list[torch.Tensor]) -> None:
                self.averager.start(0, grads, self.optimizer.group["exchanges"])

        return wgan_gp_operator(
            self.generator,
            self.critic,
            self.images[idx.to(self.device)],
            z,
            self.cfg.gp_weight,
            self.rng,
            update_generator,
            on_generator_grads=start,
        )

    def train_step(self) -> dict[str, float]:
        """One iteration; returns its record (losses at the last oracle call, costs of its exchanges)."""
        cfg = self.cfg
        update_g = (self.step % cfg.n_critic) == cfg.n_critic - 1
        before = copy.copy(self.averager.stats)
        t0 = time.perf_counter()
        skipped = False
        calls = self.optimizer.calls_per_iteration
        if calls == 2:  # extra-gradient: the first oracle call and the extrapolation
            self._oracle(update_g, 0)
            self._check_finite()
            self.optimizer.extrapolation()
        losses = self._oracle(update_g, calls - 1)
        measuring = 0.0
        if self._check_finite():
            if cfg.quantized and ((self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.steps):
                t_q = time.perf_counter()  # on this worker's gradient, before the exchange averages it in place
                self.quant_variance = quantization_variance(list(self.players.parameters()), self.averager.plan)
                measuring = time.perf_counter() - t_q
            self.optimizer.step()
        else:
            skipped = True
            self.skipped += 1
        update_ema(self.ema, self.generator, cfg.ema, self.ema_updates)
        self.ema_updates += 1
        seconds = time.perf_counter() - t0 - measuring
        after = self.averager.stats
        comm = {k: getattr(after, k) - getattr(before, k) for k in ("payload_bits", "encode_seconds",
                                                                  "comm_seconds", "decode_seconds")}  # fmt: skip
        exchanges = calls
        if not skipped and not all(math.isfinite(v) for v in asdict(losses).values()):
            raise FloatingPointError(f"step {self.step}: non-finite loss {asdict(losses)}; lower the learning rates")
        self.step += 1
        if skipped:  # the losses of a dropped step are not finite: log zeros, flagged by "skipped"
            losses = GameLosses(*(v if math.isfinite(v) else 0.0 for v in asdict(losses).values()))
        return {
            "step": self.step,
            "loss_d": losses.critic,
            "loss_g": losses.generator,
            "wasserstein": losses.wasserstein,
            "penalty": losses.penalty,
            "bits": comm["payload_bits"],
            "compression_ratio": 32.0 * self.numel * exchanges / max(comm["payload_bits"], 1),
            "step_seconds": seconds,
            "encode_seconds": comm["encode_seconds"],
            "comm_seconds": comm["comm_seconds"],
            "decode_seconds": comm["decode_seconds"],
            "compute_seconds": seconds - comm["encode_seconds"] - comm["comm_seconds"] - comm["decode_seconds"],
            "skipped": float(skipped),
        }

    def track_widths(self) -> dict[str, int] | None:
        """Record the current widths in :attr:`width_changes` when they differ from the last record
        (``{"step": completed steps, "widths": {name: bits}}``); returns them when they changed."""
        if not self.cfg.quantized:
            return None
        widths = self.averager.plan.widths()
        if self.width_changes and self.width_changes[-1]["widths"] == widths:
            return None
        self.width_changes.append({"step": self.step, "widths": widths})
        return widths

    def _check_finite(self) -> bool:
        """Collective: are every worker's gradients finite?  One small all-reduce, so that all
        workers take the same decision (policy ``nonfinite``) and none waits for another."""
        finite = torch.stack([torch.isfinite(p.grad).all() for p in self.players.parameters()]).all()
        if not self.averager.communicates:  # no communication at all (compute-only bound)
            if bool(finite):
                return True
            raise NonFiniteGradientError(f"step {self.step}: non-finite (NaN/Inf) gradients on rank {self.rank}")
        bad = torch.zeros(self.world, dtype=torch.int64, device=self.device)  # NCCL moves device tensors only
        bad[self.rank] = (~finite).long()
        dist.all_reduce(bad)
        ranks = [r for r, b in enumerate(bad.tolist()) if b]
        if not ranks:
            return True
        if self.cfg.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"step {self.step}: non-finite (NaN/Inf) gradients on rank(s) {ranks}; every worker stops here "
                "(lower the learning rates, or set nonfinite = 'skip' to drop such steps on every worker)"
            )
        return False

    # ------------------------------------------------------------------ evaluation and outputs
    def _ensure_fid(self) -> FIDEvaluator:
        if self.fid is None:
            cfg = self.cfg
            cache = Path(cfg.cache_dir) if cfg.cache_dir else None
            model = Path(cfg.fid_model) if cfg.fid_model else None

            def make() -> FIDEvaluator:
                ex = build_extractor(cfg.fid_extractor, self.data, cache, model)
                return FIDEvaluator(ex, cfg.fid_extractor, self.data, cfg.fid_samples, cache_dir=cache)

            def announced() -> FIDEvaluator:  # a cold cache trains the classifier: ~40 s without output
                what = f"{cfg.fid_extractor} on {self.data.name}, cached in {cache or default_cache_dir()}"
                with announce_if_slow(f"preparing the FID features ({what})...", _console):
                    return make()

            if self.world > 1:  # rank 0 trains/caches the extractor and real statistics first
                if self.rank == 0:
                    self.fid = announced()
                dist.barrier()
                if self.rank != 0:
                    self.fid = make()
            else:
                self.fid = announced()
        assert self.fid is not None
        return self.fid

    def evaluate(self) -> dict[str, Any]:
        """Collective: FID of the EMA generator (``fid``) and of the raw one (``fid_raw``), on the
        same latents; the row is appended to :attr:`evals`."""
        fid = self._ensure_fid()
        ema = fid(self.ema, LATENT, seed=self.cfg.seed + 777)
        raw = fid(self.generator, LATENT, seed=self.cfg.seed + 777)
        row = {"step": self.step, "seconds": self.elapsed, "fid": ema.fid, "fid_raw": raw.fid,
               "fid_extractor": ema.extractor, "fid_samples": ema.samples}  # fmt: skip
        self.evals.append(row)
        return row

    @torch.no_grad()
    def sample_images(self, raw: bool = False) -> torch.Tensor:
        """The EMA (or raw) generator's images of the run's 64 fixed latents, in ``[-1, 1]``."""
        gen = self.generator if raw else self.ema
        was_training = gen.training
        gen.eval()
        try:
            return gen(self.fixed_z)
        finally:
            gen.train(was_training)

    def write_samples(self, name: str) -> dict[str, torch.Tensor]:
        """Write ``samples/<name>.png`` (EMA generator) and ``samples/<name>_raw.png`` (raw
        generator); returns their grids as CHW tensors in ``[0, 1]`` (``{"ema": ..., "raw": ...}``)."""
        grids = {}
        for kind, suffix in (("ema", ""), ("raw", "_raw")):
            images = self.sample_images(raw=kind == "raw")
            save_grid(images, self.out / "samples" / f"{name}{suffix}.png")
            grids[kind] = grid_tensor(images)
        return grids

    # ------------------------------------------------------------------ the task contract (qoda.train.task)
    hparam_metrics = ("eval/fid_ema", "eval/fid_raw")

    @property
    def description(self) -> str:
        return self.data.description

    def log_window(self, window: list[dict[str, float]], writer: Any, bar: Any) -> None:
        _log_window(self, window, writer, bar)

    def after_step(self, lead: bool, writer: Any, bar: Any) -> None:
        _evaluate_sample_save(self, lead, writer, bar)

    def report(self, world: int) -> dict[str, Any]:
        return build_report(self, world)

    def write_final(self, world: int) -> None:
        """Rank 0, at the end: the final sample grids and the curves."""
        cfg = self.cfg
        self.write_samples("final")
        title = f"{cfg.optimizer} / {cfg.compression} ({cfg.bits} bits) / {world} workers / {self.data.name}"
        plot_curves(self.history, self.evals, self.out / "curves.png", title)


def _threads(world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // world)


def run_worker(
    cfg: TrainConfig, rank: int, world: int, data: ImageDataset | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """Train on this worker (``torch.distributed`` already initialised when ``world > 1``).

    Returns the report on rank 0 (``None`` elsewhere).  ``on_step(step)`` is called with the
    number of completed steps at the start and after every step (the launcher's progress).
    """
    torch.set_num_threads(_threads(world))
    own_group = not dist.is_initialized()
    if own_group:  # one worker: a single-process group, so every code path is the distributed one
        if world != 1:
            raise RuntimeError("run_worker: torch.distributed must be initialised for world > 1")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return _run(cfg, rank, world, data, on_step)
    finally:
        if own_group:
            dist.destroy_process_group()


def _run(
    cfg: TrainConfig, rank: int, world: int, data: ImageDataset | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any] | None:  # fmt: skip
    """The training loop of one worker: 1. build (and resume) the trainer; 2. rank 0 opens its
    outputs; 3. per step: train, log, evaluate, sample, checkpoint; 4. a failed collective becomes
    one :class:`WorkerLostError` line; 5. rank 0 writes the report, samples and curves.  The job
    itself (GAN or language model) is a :class:`~qoda.train.task.Task`."""
    out = Path(cfg.out)
    trainer = build_task(cfg, rank, world, data)  # 1.
    if cfg.resume and checkpoint.latest(out) is not None:
        trainer.load_checkpoint()
    if on_step is not None:
        on_step(trainer.step)
    lead = rank == 0
    writer, bar = _open_outputs(trainer, world) if lead else (None, None)  # 2.
    session_start = time.perf_counter()
    base_elapsed = trainer.elapsed
    window: list[dict[str, float]] = []
    try:
        while trainer.step < cfg.steps:  # 3.
            rec = trainer.train_step()
            changed = trainer.track_widths()
            if changed is not None and writer is not None:  # the widths whenever they change
                for name, bits in changed.items():
                    writer.add_scalar(f"quant/width/{name}", bits, trainer.step)
            trainer.elapsed = base_elapsed + (time.perf_counter() - session_start)
            rec["seconds"] = trainer.elapsed
            window.append(rec)
            s = trainer.step
            if s % cfg.log_every == 0 or s == cfg.steps:
                trainer.log_window(window, writer, bar)
                window = []
            trainer.after_step(lead, writer, bar)
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(s)
        if writer is not None:
            log_config_end(writer, trainer.step)
    except RuntimeError as e:  # 4.
        if world > 1 and _is_transport_failure(e):
            ptr = checkpoint.latest(out)
            last = f"step {ptr['step']}" if ptr else "none yet"
            raise WorkerLostError(
                f"rank {rank}, step {trainer.step}: a collective failed, so another worker died, stalled longer "
                f"than timeout_seconds={cfg.timeout_seconds:g}, or the network broke (last committed checkpoint: "
                f"{last}; rerun with --resume). Transport said: {str(e).splitlines()[0][:200]}"
            ) from e
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    if not trainer.evals or trainer.evals[-1]["step"] != trainer.step:  # resumed at the end
        trainer.evaluate()
    if not lead:
        return None
    report = trainer.report(world)  # 5.
    trainer.write_final(world)
    atomic_write_json(report, out / "report.json")
    return report


def _open_outputs(trainer: Task, world: int) -> tuple[Any, Any]:
    """Rank 0's run folder: the resolved config, the TensorBoard writer (config and hparams
    logged) and, with ``progress``, the tqdm bar."""
    cfg, out = trainer.cfg, Path(trainer.cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json({**cfg.to_dict(), "world": world, "dataset_description": trainer.description},
                      out / "config.json")  # fmt: skip
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"), purge_step=trainer.step if trainer.step else None)
    log_config(writer, cfg, world, trainer.description, trainer.step, trainer.hparam_metrics)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=trainer.step, desc="qoda train", unit="step", dynamic_ncols=True)
    return writer, bar


def _log_window(trainer: Trainer, window: list[dict[str, float]], writer: Any, bar: Any) -> None:
    """The mean of the steps since the last log into the history, TensorBoard and the bar."""
    cfg, s = trainer.cfg, trainer.step
    mean = window_mean(window, s, trainer.elapsed)
    if cfg.quantized and trainer.quant_variance is not None:
        mean["quant_variance"] = trainer.quant_variance
    # bits on the wire per coordinate of one exchange, measured over the window
    mean["bits_per_coordinate"] = mean["bits"] / max(trainer.numel * trainer.optimizer.calls_per_iteration, 1)
    trainer.history.append(mean)
    if writer is not None:
        for k in ("loss_d", "loss_g", "wasserstein", "penalty", "bits", "compression_ratio", "step_seconds",
                  "compute_seconds", "encode_seconds", "comm_seconds", "decode_seconds", "quant_variance",
                  "bits_per_coordinate"):  # fmt: skip
            if k in mean:
                writer.add_scalar(f"train/{k}", mean[k], s)
        if cfg.quantized:  # the current widths (they change at re-fits with bit allocation)
            summary = plan_summary(trainer.averager.plan, trainer.numel)
            writer.add_scalar("quant/wire_bits_per_coordinate", summary["wire_bits_per_coordinate"], s)
            for name, bits in summary["widths"].items():
                writer.add_scalar(f"quant/width/{name}", bits, s)
        for player, group in zip(("g", "d"), trainer.optimizer.param_groups, strict=False):
            writer.add_scalar(f"train/lr_{player}", group["lr"], s)
        writer.add_scalar("train/ema_decay", ema_decay(cfg.ema, trainer.ema_updates - 1), s)
    if bar is not None:
        bar.set_postfix(W=f"{mean['wasserstein']:.3f}", bits=f"{mean['bits'] / 1e6:.2f}M",
                        ratio=f"{mean['compression_ratio']:.1f}x", s_step=f"{mean['step_seconds']:.3f}",
                        refresh=False)  # fmt: skip


def window_mean(window: list[dict[str, float]], step: int, elapsed: float) -> dict[str, float]:
    """The mean of every key of the window's step records, at ``step`` and ``elapsed`` seconds."""
    mean = {k: sum(r[k] for r in window) / len(window) for k in window[-1]}
    mean["step"], mean["seconds"] = step, elapsed
    return mean


def _evaluate_sample_save(trainer: Trainer, lead: bool, writer: Any, bar: Any) -> None:
    """FID (every worker, together), sample grids (rank 0) and checkpoints, each on its cadence."""
    cfg, s = trainer.cfg, trainer.step
    if s % cfg.eval_every == 0 or s == cfg.steps:
        row = trainer.evaluate()
        if writer is not None:
            writer.add_scalar("eval/fid_ema", row["fid"], s)
            writer.add_scalar("eval/fid_raw", row["fid_raw"], s)
        if bar is not None:
            bar.write(f"step {s}: FID {row['fid']:.2f} EMA, {row['fid_raw']:.2f} raw ({row['fid_extractor']}, "
                      f"{row['fid_samples']} samples)")  # fmt: skip
    if lead and (s % cfg.sample_every == 0 or s == cfg.steps):
        grids = trainer.write_samples(f"step-{s:07d}")
        if writer is not None:
            for kind, grid in grids.items():
                writer.add_image(f"samples/{kind}", grid, s)  # CHW float in [0, 1]
    if s % cfg.checkpoint_every == 0 or s == cfg.steps:
        trainer.save_checkpoint()


def build_report(trainer: Trainer, world: int) -> dict[str, Any]:
    cfg, hist = trainer.cfg, trainer.history
    stats = trainer.averager.stats
    iters = max(trainer.step, 1)
    exchanges = trainer.optimizer.calls_per_iteration
    last = trainer.evals[-1]
    tail = hist[len(hist) // 2 :] or hist

    def avg(k: str) -> float:
        vals = [h[k] for h in tail if k in h]
        return sum(vals) / len(vals) if vals else 0.0

    return {
        "steps": trainer.step,
        "fid": last["fid"],
        "fid_raw": last.get("fid_raw"),
        "fid_extractor": last["fid_extractor"],
        "fid_samples": last["fid_samples"],
        "ema_decay": cfg.ema,
        "ema_updates": trainer.ema_updates,
        "bits_per_step": stats.payload_bits / iters,
        "compression_ratio": 32.0 * trainer.numel * exchanges * iters / max(stats.payload_bits, 1),
        "seconds": trainer.elapsed,
        "seconds_per_step": trainer.elapsed / iters,
        "workers": world,
        "optimizer": cfg.optimizer,
        "compression": cfg.compression,
        "bits": cfg.wire_bits or 32,  # bits per coordinate on the wire (PowerSGD: recorded as 32, counted in bytes)
        "mode": cfg.mode if cfg.quantized else "allreduce",
        "dataset": trainer.data.description,
        "parameters": trainer.numel,
        "exchanges_per_step": exchanges,
        "bytes_sent_per_step": stats.bytes_sent / iters,
        "step_seconds": avg("step_seconds"),
        "compute_seconds": avg("compute_seconds"),
        "encode_seconds": avg("encode_seconds"),
        "comm_seconds": avg("comm_seconds"),
        "decode_seconds": avg("decode_seconds"),
        "quant_variance": avg("quant_variance") if cfg.quantized else 0.0,
        "fid_history": trainer.evals,
        # per logging window: exact variance (at the window's last step) and measured bits per coordinate
        "windows": [{k: h[k] for k in ("step", "quant_variance", "bits_per_coordinate") if k in h} for h in hist],
        "width_changes": trainer.width_changes,
        "skipped_steps": trainer.skipped,
        "levels": {t: list(c.levels.values) for t, c in _plan_of(trainer.averager).configs.items()}
        if cfg.quantized
        else {},
        **plan_summary(trainer.averager.plan if cfg.quantized else None, trainer.numel),
        "allocator": allocator(),
        "units": dict(REPORT_UNITS),
        "samples": {"ema": "samples/final.png", "raw": "samples/final_raw.png"},
    }


# TensorBoard's HParams dashboard compares runs by these metrics (the scalars of the same tags).
HPARAM_METRICS = Trainer.hparam_metrics


def config_markdown(cfg: TrainConfig, world: int, dataset: str) -> str:
    """The resolved config as a Markdown table (TensorBoard's text dashboard)."""
    rows = [("world", world), ("dataset_description", dataset), *cfg.to_dict().items()]
    lines = ["| option | value |", "|---|---|"]
    lines += [f"| {k} | {' '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in rows]
    return "\n".join(lines)


def log_config(
    writer: Any, cfg: TrainConfig, world: int, dataset: str, step: int, metrics: tuple[str, ...] = HPARAM_METRICS
) -> None:
    """The run's configuration in TensorBoard: a text table (``config``) and the HParams
    dashboard's session (hyperparameters, with ``metrics``, the task's, as metrics).

    Written into the run's own event file, not the sub-run ``SummaryWriter.add_hparams`` creates,
    so the dashboard shows these hyperparameters beside this run's FID curves."""
    from torch.utils.tensorboard.summary import hparams

    writer.add_text("config", config_markdown(cfg, world, dataset), step)
    hp: dict[str, Any] = {"world": world}
    for k, v in cfg.to_dict().items():
        if isinstance(v, list):
            v = " ".join(map(str, v))
        hp[k] = "none" if v is None else str(v).lower() if isinstance(v, bool) else v
    experiment, start, _end = hparams(hp, dict.fromkeys(metrics, 0.0))
    fw = writer._get_file_writer()
    fw.add_summary(experiment, step)
    fw.add_summary(start, step)


def log_config_end(writer: Any, step: int) -> None:
    """Mark the HParams session of :func:`log_config` as finished (the run reached its last step)."""
    from torch.utils.tensorboard.summary import hparams

    _experiment, _start, end = hparams({}, {})
    writer._get_file_writer().add_summary(end, step)
