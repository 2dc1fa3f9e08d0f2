"""Capabilities live in the registries (optimizers, compressions); everything else reads them."""

import pytest
from torch import nn

from qoda.bench.e2e import CONFIGS, calls_of, compute_bound_of
from qoda.bench.scaling import MODELLED
from qoda.comm.adaptive import AdaptiveAggregator
from qoda.comm.aggregate import Aggregator, Mode
from qoda.comm.baselines import PowerSGDAverager
from qoda.comm.compressed import CompressedAverager
from qoda.optim import OPTIMIZERS
from qoda.optim.base import TwoCallOptimizer
from qoda.train.compression import _single
from qoda.train.compressions import COMPRESSIONS, resolve
from qoda.train.config import OPTIMIZER_CHOICES, ConfigError, TrainConfig


def test_optimizer_specs_match_their_classes():
    for name, spec in OPTIMIZERS.items():
        two_call = issubclass(spec.cls, TwoCallOptimizer)
        assert spec.calls_per_iteration == (2 if two_call else 1), name
        assert "lr" in spec.options and "averager" not in spec.options
    assert set(OPTIMIZER_CHOICES) == {n for n, s in OPTIMIZERS.items() if s.trains_gans}


@pytest.mark.parametrize("name", OPTIMIZER_CHOICES)
def test_trainer_passes_only_options_the_optimizer_accepts(name):
    cfg = TrainConfig(optimizer=name)
    assert set(cfg.optimizer_kwargs()) <= OPTIMIZERS[name].options


def test_skip_policy_follows_calls_per_iteration():
    for name in OPTIMIZER_CHOICES:
        if OPTIMIZERS[name].calls_per_iteration > 1:
            with pytest.raises(ConfigError, match="nonfinite"):
                TrainConfig(optimizer=name, nonfinite="skip")
        else:
            TrainConfig(optimizer=name, nonfinite="skip")


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_every_compression_builds_the_averager_its_spec_names(name, gloo_world_1):
    spec = COMPRESSIONS[name]
    resolve(spec.hook)  # the DDP hook's builder exists too (built in tests/test_lm_task.py)
    cfg = TrainConfig(compression=name, bits=3)
    players = nn.ModuleDict({"generator": nn.Linear(64, 32), "critic": nn.Linear(32, 1)})
    avg = _single(cfg, players, None, seed=0)
    assert cfg.quantized == spec.quantized and cfg.adaptive == (spec.levels == "fitted")
    if "compressor" in spec.options:
        assert isinstance(avg, CompressedAverager) and isinstance(avg.compressor, spec.options["compressor"])
        assert cfg.wire_bits == spec.bits
        return
    if not spec.quantized and "precision" not in spec.options:
        assert isinstance(avg, PowerSGDAverager) and cfg.wire_bits is None
        return
    assert isinstance(avg, AdaptiveAggregator if spec.adaptive else Aggregator)
    assert avg.mode is Mode(spec.options.get("precision", cfg.mode))
    assert cfg.wire_bits == (3 if spec.quantized else {"fp32": 32, "fp16": 16}[spec.options["precision"]])


def test_benchmarks_read_calls_from_the_registry():
    for c in CONFIGS:
        opt = c.options.get("optimizer", TrainConfig.optimizer)
        assert calls_of(c.name) == OPTIMIZERS[opt].calls_per_iteration
        assert compute_bound_of(c.name) == ("compute_only_2call" if calls_of(c.name) == 2 else "compute_only")
    assert set(MODELLED) <= {c.name for c in CONFIGS}


def test_every_registered_optimizer_is_exported_under_its_class_name():
    """Registering an optimizer in OPTIMIZERS is all it takes to export it (qoda.optim and qoda)."""
    import qoda
    import qoda.optim

    for spec in OPTIMIZERS.values():
        name = spec.cls.__name__
        assert getattr(qoda.optim, name) is spec.cls and name in qoda.optim.__all__
        assert getattr(qoda, name) is spec.cls and name in qoda.__all__
        assert spec.calls_per_iteration == spec.cls.calls_per_iteration
