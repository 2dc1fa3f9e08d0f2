"""Property-based tests of the quantizer and the codec (Hypothesis), with the checks of ``qoda.testing.generate``.

Each property draws a few hundred derandomized cases (the same ones on every run, so CI is reproducible;
a failure is shrunk by Hypothesis to a minimal input).  ``qoda bench faults`` runs the same strategies and
checks on 100,000 cases in counting mode (:func:`qoda.testing.generate.run_generated`).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings

from qoda.quant.config import QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.testing import generate as gen

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Regression inputs of the defects these properties found (every code equal: rANS flush threshold;
# an all-subnormal bucket: 1/norm overflowed), run before the drawn cases.
_QSGD4 = LevelSet.for_bits(4)
SAME_CODE = [
    gen.SegmentCase((torch.zeros(10),), QuantizerConfig(_QSGD4, 16, "l2", "entropy"), 0, "tensor"),
    gen.SegmentCase((torch.ones(1),), QuantizerConfig(_QSGD4, 16, "l2", "entropy"), 0, "tensor"),
    gen.SegmentCase((torch.full((8,), -2.0),), QuantizerConfig(_QSGD4, 4, "linf", "entropy"), 3, "tensor"),
]
SUBNORMAL = [
    gen.SegmentCase((torch.full((4,), 1e-40),), QuantizerConfig(_QSGD4, 16), 0, "tensor"),
    gen.SegmentCase((torch.tensor([1.5456e-40, -1.0891e-40]),), QuantizerConfig(LevelSet.exponential(14), 8), 1),
]


def _with_examples(cases: list[gen.SegmentCase]):
    def deco(fn):
        for c in reversed(cases):
            fn = example(c)(fn)
        return fn

    return deco


@_with_examples(SAME_CODE)
@PROPERTY_SETTINGS
@given(gen.segment_cases())
def test_round_trip_is_bit_exact(case):
    """decode(encode(q)) == q; fused encoder same bytes; decode_into == q.dequantize()."""
    assert gen.assert_case(case, ["roundtrip", "invalid_input"])


@_with_examples(SAME_CODE)
@PROPERTY_SETTINGS
@given(gen.segment_cases())
def test_reported_bits_are_the_payload(case):
    gen.assert_case(case, ["bits"])


@_with_examples(SUBNORMAL)
@PROPERTY_SETTINGS
@given(gen.segment_cases())
def test_cpu_kernel_and_torch_path_agree(case):
    gen.assert_case(case, ["backends"])


@_with_examples(SUBNORMAL)
@PROPERTY_SETTINGS
@given(gen.segment_cases())
def test_error_within_the_level_interval(case):
    gen.assert_case(case, ["error_bound"])


@_with_examples(SUBNORMAL)
@settings(PROPERTY_SETTINGS, max_examples=200)
@given(gen.mc_cases())
def test_monte_carlo_unbiased(case):
    gen.assert_case(case, ["unbiased"])


# Found by the 100,000-case run: a level gap below 2^-128 (~2.9e-39) made 1/(l_{j+1} - l_j) overflow, so every
# coordinate inside that gap was rounded up (for_bits(9, "exponential", 0.7) has l_1 = 4.5e-40).  Such level
# sets are refused now; the strategies draw gaps down to exactly MIN_LEVEL_GAP.
@pytest.mark.parametrize(
    "make",
    [lambda: LevelSet.custom([0.0, 1.543530258453786e-41, 1.0]), lambda: LevelSet.for_bits(9, "exponential", 0.7)],
    ids=["custom", "for_bits-exponential"],
)
def test_level_gaps_whose_inverse_overflows_are_refused(make):
    with pytest.raises(ValueError, match="gap"):
        make()


@PROPERTY_SETTINGS
@given(gen.segment_cases(poison=True))
def test_invalid_inputs_raise_on_every_path(case):
    checked = gen.assert_case(case, ["invalid_input"])
    assert checked == ["invalid_input"]  # every poisoned case is invalid


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(gen.message_cases())
def test_layerwise_messages(case):
    gen.assert_case(case, ["message"])


def test_counting_mode_counts_and_keeps_failures(monkeypatch):
    ok = gen.run_generated(120, seed=3, workers=1, chunk=60)
    assert ok.cases == 120 and ok.ok, ok.as_dict()
    assert set(ok.checks) == set(gen.PROPERTIES), ok.checks  # every property exercised

    def broken(seg):
        raise gen.PropertyFailure("bits", "planted")

    monkeypatch.setitem(gen.SEGMENT_CHECKS, "bits", broken)
    bad = gen.run_generated(40, seed=3, workers=1).as_dict()
    assert bad["generated_cases"] == 40  # the run went on after the first failure
    assert bad["failures_by_property"] == {"bits": bad["checks"]["bits"]} and bad["failing_cases"] > 0
    assert len(bad["examples"]["bits"]) == 3 and bad["examples"]["bits"][0]["case"]["kind"] == "segment"
