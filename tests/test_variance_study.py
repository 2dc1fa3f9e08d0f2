"""The variance-per-bit study on real WGAN-GP and transformer gradients (small, fast settings)."""

import pytest

from qoda.bench.variance import run_variance_study


@pytest.fixture(scope="module")
def study():
    return run_variance_study(budgets=(3,), wgan_steps=1, lm_steps=1, log=lambda s: None)


def test_rows_cover_models_methods_codings(study):
    rows = study["rows"]
    assert {r["model"] for r in rows} == {"wgan@init", "wgan@1", "transformer@init", "transformer@1"}
    assert {r["method"] for r in rows} == {
        "qsgd",
        "qsgd_inf",
        "nuqsgd",
        "cgx_maxmin",
        "alq_global",
        "alq_layerwise",
        "alq_layerwise_dp",
    }
    assert {r["coding"] for r in rows} == {"fixed", "entropy"}
    for r in rows:
        assert r["normalized_variance"] > 0 and r["bits_per_coord"] > 0


def test_dp_allocation_meets_the_budget_and_fitted_levels_help(study):
    for model in {r["model"] for r in study["rows"]}:
        fixed = {r["method"]: r for r in study["rows"] if r["model"] == model and r["coding"] == "fixed"}
        # the DP spends at most the budget: never more bits than the uniform-width methods
        assert fixed["alq_layerwise_dp"]["bits_per_coord"] <= fixed["qsgd"]["bits_per_coord"] + 1e-9
        # levels fitted on another minibatch beat the fixed families on this one
        assert fixed["alq_global"]["normalized_variance"] < fixed["qsgd"]["normalized_variance"]
        assert fixed["alq_global"]["normalized_variance"] < fixed["nuqsgd"]["normalized_variance"]
        # max-min = the L-inf quantizer on centred buckets plus one float32 centre per bucket
        extra = fixed["cgx_maxmin"]["bits_per_coord"] - fixed["qsgd_inf"]["bits_per_coord"]
        # 32 bits per bucket of <= 1024 compressed coordinates (>= 90% of all coordinates here)
        assert 0.9 * 32 / 1024 <= extra <= 1.5 * 32 / 1024
        # the entropy coding of the same quantization is smaller
        ent = {r["method"]: r for r in study["rows"] if r["model"] == model and r["coding"] == "entropy"}
        assert ent["qsgd"]["bits_per_coord"] < fixed["qsgd"]["bits_per_coord"]
