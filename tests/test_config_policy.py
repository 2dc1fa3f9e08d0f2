import pytest
import torch
from torch import nn

from qoda.quant.config import QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerPolicy, NameRule


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"bucket_size": 0}, "bucket_size"),
        ({"bucket_size": 2.5}, "bucket_size"),
        ({"norm": "l3"}, "norm"),
        ({"coding": "huffman"}, "coding"),
        ({"levels": LevelSet.for_bits(13), "coding": "entropy"}, "coding"),
    ],
)
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        QuantizerConfig(**kw)


def test_config_levels_type_checked():
    with pytest.raises(TypeError, match="levels"):
        QuantizerConfig(levels=[0, 1])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.conv = nn.Conv2d(3, 64, 3)
        self.norm = nn.GroupNorm(4, 64)
        self.fc = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)
        self.tiny = nn.Linear(4, 4)


def test_module_class_preset():
    conv_cfg = QuantizerConfig.qsgd_inf(4)
    policy = LayerPolicy.by_module_class(QuantizerConfig.nuqsgd(4), {"conv": conv_cfg}, compress_1d=True, min_numel=64)
    plan = policy.plan(Net())
    types = {e.name: e.type_name for e in plan.entries}
    assert types["emb.weight"] == "embedding"
    assert types["conv.weight"] == "conv"
    assert types["conv.bias"] == "bias"
    assert types["norm.weight"] == "norm"
    assert types["fc.weight"] == "linear"
    assert types["tiny.weight"] is None  # 16 < min_numel
    assert plan.configs["conv"] is conv_cfg
    assert plan.configs["linear"] == QuantizerConfig.nuqsgd(4)
    assert [e.name for e in plan.entries] == [n for n, _ in Net().named_parameters()]


def test_default_exclusions_and_global():
    plan = LayerPolicy.global_(QuantizerConfig()).plan(Net())
    types = {e.name: e.type_name for e in plan.entries}
    assert types["conv.bias"] is None and types["norm.weight"] is None  # 1-D
    assert types["head.weight"] is None  # 640 < 1024
    assert types["emb.weight"] == "global" and types["fc.weight"] == "global"
    assert plan.types == ("global",)


def test_per_layer_and_rules():
    plan = LayerPolicy.per_layer(QuantizerConfig(), min_numel=0).plan(Net())
    named = [e for e in plan.entries if e.type_name is not None]
    assert len({e.type_name for e in named}) == len(named)
    rules = [(r"^emb\.", "embed"), (r"fc", None)]
    plan = LayerPolicy.by_name(rules, QuantizerConfig(), {"embed": QuantizerConfig.qsgd(8)}).plan(Net())
    types = {e.name: e.type_name for e in plan.entries}
    assert types["emb.weight"] == "embed" and types["fc.weight"] is None
    assert plan.configs["embed"].bits == 8


def test_policy_validation():
    with pytest.raises(ValueError, match="rules.pattern"):
        NameRule("(", "x")
    with pytest.raises(ValueError, match="mode"):
        LayerPolicy(mode="weird")
    with pytest.raises(ValueError, match="min_numel"):
        LayerPolicy(min_numel=-1)
    with pytest.raises(TypeError, match="configs"):
        LayerPolicy(configs={"a": 3})


def test_fingerprint_changes_with_settings():
    a = LayerPolicy.global_(QuantizerConfig.qsgd(4)).plan(Net()).fingerprint()
    b = LayerPolicy.global_(QuantizerConfig.qsgd(8)).plan(Net()).fingerprint()
    c = LayerPolicy.global_(QuantizerConfig.qsgd(4, 512)).plan(Net()).fingerprint()
    assert len({a, b, c}) == 3


def test_shared_parameters_appear_once():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    m.append(m[0])
    plan = LayerPolicy.global_(QuantizerConfig()).plan(m)
    assert len(plan.entries) == len(list(m.parameters())) == 2
    assert torch.Size([64, 64]) in [e.shape for e in plan.entries]
