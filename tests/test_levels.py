import math

import numpy as np
import pytest

from qoda.quant.levels import LevelSet


def test_uniform_levels_are_qsgd():
    lv = LevelSet.uniform(6)
    assert lv.values == tuple(float(__import__("numpy").float32(j / 7)) for j in range(8))
    assert lv.s == 6 and lv.index_bits == 3 and lv.code_bits == 4


def test_exponential_levels_are_nuqsgd():
    lv = LevelSet.exponential(4, 0.5)
    assert lv.values == (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16])
def test_for_bits_fills_the_code(bits):
    lv = LevelSet.for_bits(bits)
    assert lv.num_levels == 2 ** (bits - 1)
    assert lv.code_bits == bits
    assert math.ceil(math.log2(lv.num_levels)) + 1 == bits


@pytest.mark.parametrize(
    ("values", "msg"),
    [
        ([0.0, 0.5, 0.4, 1.0], "strictly increasing"),
        ([0.1, 0.5, 1.0], "first level must be 0"),
        ([0.0, 0.5, 0.9], "last level must be 1"),
        ([0.0, 0.5, 1.5, 1.0], "strictly increasing"),
        ([0.0, float("nan"), 1.0], "finite"),
        ([0.0, 0.3, 0.3, 1.0], "strictly increasing"),
        ([0.0, 0.5, 0.5 + 1e-12, 1.0], "strictly increasing"),  # equal once rounded to float32
        ([0.0], "at least"),
    ],
)
def test_invalid_levels_raise_naming_the_field(values, msg):
    with pytest.raises(ValueError, match=msg) as e:
        LevelSet.custom(values)
    assert "levels" in str(e.value)


@pytest.mark.parametrize("bad", [-1, 1.5, 40000])
def test_invalid_s(bad):
    with pytest.raises(ValueError, match="levels.s"):
        LevelSet.uniform(bad)


def test_invalid_bits_and_base():
    with pytest.raises(ValueError, match="bits"):
        LevelSet.for_bits(1)
    with pytest.raises(ValueError, match="levels.p"):
        LevelSet.exponential(3, 1.0)
    with pytest.raises(ValueError, match="family"):
        LevelSet.for_bits(4, "log")


def test_level_set_id_identifies_the_values():
    a, b = LevelSet.uniform(6), LevelSet.exponential(6)
    assert a.level_set_id != b.level_set_id
    assert a.level_set_id == LevelSet.custom(list(a.values)).level_set_id


def test_gaps_whose_inverse_overflows_float32_are_refused():
    """The kernels multiply by float32(1 / (l_{j+1} - l_j)); a gap below 2^-126 (found by the
    generated fuzzer: 1/gap = inf made the rounding biased) is refused, naming the field."""
    with pytest.raises(ValueError, match="levels: the gap"):
        LevelSet.custom([0.0, 1e-39, 0.5, 1.0])
    with pytest.raises(ValueError, match="levels: the gap"):
        LevelSet.exponential(14, 0.001)  # p^14 = 1e-42
    ok = LevelSet.custom([0.0, 2.0**-125, 1.0])
    assert np.isfinite(np.float32(1.0) / np.diff(ok.array)).all()


def test_a_new_level_family_is_one_registry_entry(monkeypatch):
    """A family registered in LEVEL_FAMILIES is a ``for_bits`` family and a registry ``levels``."""
    from dataclasses import replace

    from qoda.quant.levels import LEVEL_FAMILIES
    from qoda.train.compression import quantizer_config
    from qoda.train.compressions import COMPRESSIONS
    from qoda.train.config import TrainConfig

    def quadratic(s, p):
        return LevelSet(tuple((j / (s + 1)) ** 2 for j in range(s + 2)), family="quadratic")

    monkeypatch.setitem(LEVEL_FAMILIES, "quadratic", quadratic)
    lv = LevelSet.for_bits(3, "quadratic")
    assert lv.values == tuple(float(np.float32((j / 3) ** 2)) for j in range(4))
    monkeypatch.setitem(COMPRESSIONS, "qsgd2", replace(COMPRESSIONS["qsgd"], name="qsgd2", levels="quadratic"))
    assert quantizer_config(TrainConfig(compression="qsgd2", bits=3)).levels == lv
