"""From the trainer's compression options to an averager (one exchange of the joint operator; the
language model's DDP hooks are built from the same policy and adaptation in :mod:`qoda.train.ddp`).

The choices and their capabilities are the registry :data:`qoda.train.compressions.COMPRESSIONS`
(builders and their options, level family, layer-wise or not, bits on the wire); this module holds
the averager builders its entries name (:func:`allreduce_averager`, :func:`powersgd_averager`,
:func:`quantized_averager`, :func:`compressor_averager`) and :func:`build_averager`, which calls
the entry's.

``layer_types``: ``player_class`` (default) gives each player's convolutions and linear
layers their own levels (``generator.conv``, ``critic.linear``, ...): the two players'
gradients have different statistics; ``module_class`` shares them across players;
``per_layer`` gives every tensor its own levels.  Tensors under 1,024 coordinates and 1-D
tensors (biases, norm scales) travel uncompressed, as the policy's defaults say.

``bit_allocation`` (``auto``: ``dp`` for ``layerwise_adaptive``, else ``uniform``): ``uniform``
quantizes every compressed tensor at ``bits``; ``dp`` makes
``bits`` an average budget over all coordinates (headers, norms and uncompressed tensors
counted) and gives every tensor its own width, chosen at each re-fit by dynamic programming on
the all-reduced statistics (:mod:`qoda.quant.allocation`); levels are fitted per (type, width).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from qoda.codec.compressor import Compressor
from qoda.codec.layerwise import fixed_message_bits
from qoda.comm.adaptive import AdaptiveAggregator
from qoda.comm.aggregate import Aggregator, Mode
from qoda.comm.averager import Averager
from qoda.comm.baselines import PowerSGDAverager
from qoda.comm.compressed import CompressedAverager
from qoda.comm.overlap import OverlappedAverager
from qoda.quant.adapt import AdaptConfig, RefitSchedule
from qoda.quant.allocation import WIDTHS, allocate_plan
from qoda.quant.config import Coding, Norm, QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan, LayerPolicy
from qoda.train.compressions import COMPRESSIONS
from qoda.train.config import ConfigError, TrainConfig


def quantizer_config(cfg: TrainConfig) -> QuantizerConfig:
    norm = cfg.quant_norm
    if norm == "auto":
        norm = "linf" if cfg.adaptive else "l2"
    spec = COMPRESSIONS[cfg.compression]
    # fitted levels start uniform; the plan of an all-reduce only lists the layers
    family = spec.levels if spec.quantized and not spec.adaptive else "uniform"
    # with bit allocation the widths (and levels) come from the allocation; the base width is a placeholder
    bits = int(cfg.bits) if cfg.allocation == "uniform" else min(WIDTHS)
    return QuantizerConfig(LevelSet.for_bits(bits, family), cfg.bucket_size, Norm(norm), coding=Coding(cfg.coding))


def _prefix_types(plan: LayerPlan) -> LayerPlan:
    """Qualify every type with the player owning the tensor (the first name component)."""
    entries, configs = [], {}
    for e in plan.entries:
        t = None if e.type_name is None else f"{e.name.split('.', 1)[0]}.{e.type_name}"
        entries.append(LayerEntry(e.name, e.shape, t))
        if t is not None:
            configs[t] = plan.configs[e.type_name]
    return LayerPlan(tuple(entries), configs)


def adapt_config(cfg: TrainConfig) -> AdaptConfig:
    """Re-fit schedule and bit allocation of the adaptive compressions."""
    dp = cfg.allocation == "dp"
    return AdaptConfig(
        schedule=RefitSchedule(tuple(cfg.refit_steps), cfg.refit_every), allocation=cfg.allocation,
        budget=float(cfg.bits) if dp else None,
    )  # fmt: skip


def layer_policy(cfg: TrainConfig) -> LayerPolicy:
    """What is quantized and how: one level set for all tensors (the global compressions), one per
    module class (``player_class`` / ``module_class``) or one per tensor (``per_layer``)."""
    qc = quantizer_config(cfg)
    if not COMPRESSIONS[cfg.compression].layerwise:
        return LayerPolicy.global_(qc)
    return LayerPolicy.per_layer(qc) if cfg.layer_types == "per_layer" else LayerPolicy.by_module_class(qc)


def layer_plan(cfg: TrainConfig, players: nn.Module) -> LayerPlan:
    """The layer plan over the task's parameters: both players' (``players`` = ModuleDict
    generator/critic; ``player_class`` qualifies every type with its player) or the language
    model's (one model: ``player_class`` and ``module_class`` coincide)."""
    plan = layer_policy(cfg).plan(players)
    by_player = cfg.task == "gan" and COMPRESSIONS[cfg.compression].layerwise and cfg.layer_types == "player_class"
    return _prefix_types(plan) if by_player else plan


def build_averager(cfg: TrainConfig, players: nn.Module, group: dist.ProcessGroup | None = None) -> Averager:
    """The averager of ``cfg.compression`` over ``group`` (checks the settings across ranks).

    With ``cfg.player_threads`` each player gets its own averager on its own new process group
    (created here, collectively, in the same order on every rank); see :mod:`qoda.comm.overlap`.
    """
    if cfg.player_threads:
        parts, averagers, names, offset = [], [], [], 0
        for k, (name, module) in enumerate(players.named_children()):
            n = len(list(module.parameters()))
            parts.append(list(range(offset, offset + n)))
            offset += n
            sub = nn.ModuleDict({name: module})  # keeps the "generator." / "critic." names and types
            averagers.append(_single(cfg, sub, dist.new_group(), seed=cfg.seed + k))
            names.append(name)
        return OverlappedAverager(parts, averagers, names)
    return _single(cfg, players, group, cfg.seed)


def _single(cfg: TrainConfig, players: nn.Module, group: dist.ProcessGroup | None, seed: int) -> Averager:
    """The averager of ``cfg.compression``'s registry entry over ``players``' parameters."""
    return COMPRESSIONS[cfg.compression].build_averager(cfg, players, group, seed)


# ---------------------------------------------------------------------------- the entries' builders
def allreduce_averager(
    cfg: TrainConfig, players: nn.Module, group: dist.ProcessGroup | None, seed: int, precision: str
) -> Averager:
    """An uncompressed all-reduce in ``precision`` (``fp32`` or ``fp16``)."""
    return Aggregator(layer_plan(cfg, players), Mode(precision), group, seed=seed)


def powersgd_averager(cfg: TrainConfig, players: nn.Module, group: dist.ProcessGroup | None, seed: int) -> Averager:
    """PyTorch's PowerSGD (rank ``powersgd_rank``, ``powersgd_start_iter`` all-reduces first)."""
    shapes = [p.shape for p in players.parameters()]
    return PowerSGDAverager(shapes, cfg.powersgd_rank, cfg.powersgd_start_iter, group, seed=seed)


def quantized_averager(cfg: TrainConfig, players: nn.Module, group: dist.ProcessGroup | None, seed: int) -> Averager:
    """qoda's layer-wise codec in ``cfg.mode``; adaptive levels re-fitted on the config's schedule."""
    plan = layer_plan(cfg, players)
    if cfg.adaptive:
        resolved = resolve_allocation(cfg, plan)
        if resolved.allocation != cfg.allocation:  # auto fell back to one width: the plan's widths change
            cfg, plan = resolved, layer_plan(resolved, players)
        return AdaptiveAggregator(plan, cfg.mode, group, seed=seed, adapt=adapt_config(resolved))
    return Aggregator(plan, cfg.mode, group, seed=seed)


def compressor_averager(
    cfg: TrainConfig, players: nn.Module, group: dist.ProcessGroup | None, seed: int,
    compressor: type[Compressor], **settings: Any,
) -> Averager:  # fmt: skip
    """Any compressor, built as ``compressor(shapes, **settings)``, averaged by all-gather
    (:class:`~qoda.comm.compressed.CompressedAverager`)."""
    return CompressedAverager(compressor([p.shape for p in players.parameters()], **settings), group, seed=seed)


def resolve_allocation(cfg: TrainConfig, plan: LayerPlan) -> TrainConfig:
    """``cfg`` with ``bit_allocation = 'auto'`` made explicit for ``plan``: ``dp`` when the budget
    ``bits`` can hold the plan (every tensor at 2 bits plus norms, headers and float32 tensors),
    else ``uniform`` at ``bits`` (a small model whose float32 biases alone exceed the budget; an
    integer ``bits`` only).  An explicit ``dp`` whose budget is too small raises, naming ``bits``.
    Deterministic in the plan, so every rank resolves alike."""
    if cfg.allocation != "dp":
        return cfg
    try:
        allocate_plan(plan, {}, float(cfg.bits), message_bits=fixed_message_bits)
    except ValueError as e:
        if cfg.bit_allocation == "auto" and float(cfg.bits).is_integer():
            return cfg.replace(bit_allocation="uniform", bits=int(cfg.bits))
        raise ConfigError(f"bits: {str(e).removeprefix('budget: ')}") from None
    return cfg.replace(bit_allocation="dp")
