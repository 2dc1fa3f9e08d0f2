"""Capabilities live in the registries (optimizers, compressions); everything else reads them."""

import pytest
from torch import nn

from qoda.bench.e2e import CONFIGS, calls_of, compute_bound_of
from qoda.bench.scaling import MODELLED
from qoda.comm.adaptive import AdaptiveAggregator
from qoda.comm.aggregate import Aggregator, Mode
from qoda.comm.baselines import PowerSGDAverager
from qoda.optim import OPTIMIZERS
from qoda.optim.base import TwoCallOptimizer
from qoda.train.compression import _single
from qoda.train.compressions import COMPRESSIONS, Transport
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
    cfg = TrainConfig(compression=name, bits=3)
    players = nn.ModuleDict({"generator": nn.Linear(64, 32), "critic": nn.Linear(32, 1)})
    avg = _single(cfg, players, None, seed=0)
    if spec.transport is Transport.POWERSGD:
        assert isinstance(avg, PowerSGDAverager) and cfg.wire_bits is None
        return
    assert isinstance(avg, AdaptiveAggregator if spec.adaptive else Aggregator)
    expected_mode = {Transport.FP32: Mode.FP32, Transport.FP16: Mode.FP16}.get(spec.transport, Mode(cfg.mode))
    assert avg.mode is expected_mode
    assert cfg.wire_bits == {Transport.FP32: 32, Transport.FP16: 16}.get(spec.transport, 3)
    assert cfg.quantized == spec.quantized and cfg.adaptive == (spec.levels == "fitted")


def test_benchmarks_read_calls_from_the_registry():
    for c in CONFIGS:
        opt = c.options.get("optimizer", TrainConfig.optimizer)
        assert calls_of(c.name) == OPTIMIZERS[opt].calls_per_iteration
        assert compute_bound_of(c.name) == ("compute_only_2call" if calls_of(c.name) == 2 else "compute_only")
    assert set(MODELLED) <= {c.name for c in CONFIGS}


@pytest.fixture
def gloo_world_1():
    """A 1-process gloo group on an in-memory store: no port, no environment variables."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()



def test_every_registered_optimizer_is_exported_under_its_class_name():
    """Registering an optimizer in OPTIMIZERS is all it takes to export it (qoda.optim and qoda)."""
    import qoda
    import qoda.optim

    for spec in OPTIMIZERS.values():
        name = spec.cls.__name__
        assert getattr(qoda.optim, name) is spec.cls and name in qoda.optim.__all__
        assert getattr(qoda, name) is spec.cls and name in qoda.__all__
        assert spec.calls_per_iteration == spec.cls.calls_per_iteration
