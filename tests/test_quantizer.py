"""The quantizer against the maths of reference section 2 (tolerances derived from the exact variance)."""

import math

import numpy as np
import pytest
import torch

from qoda.quant.config import QuantizerConfig
from qoda.quant.kernels import torch_ref
from qoda.quant.levels import LevelSet
from qoda.quant.quantizer import NonFiniteError, bucket_starts, level_tables, quantize
from qoda.quant.rng import uniforms_torch
from qoda.quant.variance import coordinate_variances, eps_q, eps_q_config, exact_variance

CONFIGS = [
    QuantizerConfig.qsgd(4, 64),
    QuantizerConfig.qsgd(2, 37),
    QuantizerConfig.qsgd_inf(3, 50),
    QuantizerConfig.nuqsgd(4, 128),
    QuantizerConfig.nuqsgd(8, 300),
    QuantizerConfig(LevelSet.custom([0, 0.05, 0.2, 0.21, 0.7, 1]), 40, "linf"),
]


def _mc(x, cfg, n, offset=0):
    return torch.stack([quantize(x, cfg, seed=offset + s).dequantize() for s in range(n)]).double()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.levels.family}-{c.bits}b-{c.norm.value}-B{c.bucket_size}")
def test_unbiased_z_test(cfg):
    """Each coordinate's Monte-Carlo mean is within 5 standard errors of x (exact variance)."""
    x = torch.randn(300, dtype=torch.float64).float() * torch.linspace(0.1, 3, 300)
    n = 1500
    samples = _mc(x, cfg, n)
    var = coordinate_variances(x, cfg)
    mean = samples.mean(0)
    # float32 products (norm * l_j) carry a relative rounding of 2^-24; 2^-24 probability grid
    se = torch.sqrt(var / n + (4e-7 * x.abs().double()) ** 2 + 1e-30)
    z = (mean - x.double()) / se
    assert z.abs().max() < 5.5, f"max |z| = {z.abs().max():.2f}"
    # and globally: sum z^2 ~ chi2(d), mean d, sd sqrt(2d)
    d = x.numel()
    assert abs(float((z**2).sum()) - d) < 6 * math.sqrt(2 * d)


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=str)
def test_exact_variance_matches_monte_carlo(cfg):
    x = torch.randn(500)
    n = 800
    err = ((_mc(x, cfg, n, 10_000) - x.double()) ** 2).sum(1)
    exact = exact_variance(x, cfg)
    assert abs(float(err.mean()) - exact) < 5 * float(err.std()) / math.sqrt(n)


def _vectors():
    g = torch.Generator().manual_seed(1)
    d = 4096
    sparse = torch.zeros(d)
    sparse[torch.randint(0, d, (40,), generator=g)] = torch.randn(40, generator=g)
    return {
        "normal": torch.randn(d, generator=g),
        "heavy_tailed": torch.distributions.StudentT(1.5).sample((d,)),
        "sparse": sparse,
        "constant": torch.full((d,), 0.3),
        "one_hot": torch.nn.functional.one_hot(torch.tensor(7), d).float(),
        "tiny": torch.randn(d, generator=g) * 1e-30,
        "ramp": torch.linspace(-1, 1, d),
    }


@pytest.mark.parametrize("cfg", [*CONFIGS, QuantizerConfig.qsgd(4, 4096), QuantizerConfig.qsgd(8, 1)], ids=str)
def test_variance_never_exceeds_eps_q(cfg):
    for name, x in _vectors().items():
        v = exact_variance(x, cfg)
        bound = eps_q_config(cfg, x.numel()) * float(x.double().square().sum())
        assert v <= bound * (1 + 1e-9) + 1e-300, f"{name}: {v} > {bound}"


def test_eps_q_is_attained_in_order_and_matches_qsgd_form():
    # uniform levels: the bound is the QSGD min(d/s^2, sqrt(d)/s) up to kappa = 1/8
    for s in (1, 3, 7, 15):
        lv = LevelSet.uniform(s)
        for d in (1, 16, 256, 4096):
            e = eps_q(lv, d)
            assert e <= 1 / 8 + min(d / (4 * (s + 1) ** 2), math.sqrt(d) / (s + 1)) + 1e-12
    # a constant vector puts every u = 1/sqrt(d) in the first interval: variance near the bound
    d, lv = 1024, LevelSet.uniform(1)
    cfg = QuantizerConfig(lv, d)
    x = torch.ones(d)
    ratio = exact_variance(x, cfg) / d
    assert ratio > 0.5 * eps_q(lv, d) - 0.125


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_numba_kernel_equals_torch_path_bitwise(cfg):
    xs = [torch.randn(1000) * 3, torch.randn(7, 13), torch.zeros(100), torch.randn(1)]
    q = quantize(xs, cfg, seed=42)
    numels = [t.numel() for t in xs]
    tabs = level_tables(cfg.levels)
    codes, norms = torch_ref.quantize_codes(
        torch.cat([t.reshape(-1) for t in xs]),
        torch.tensor(bucket_starts(numels, cfg.bucket_size)),
        torch.tensor(tabs.levels),
        torch.tensor(tabs.inv_width),
        tabs.intervals,
        cfg.norm.value == "linf",
        42,
    )
    assert torch.equal(q.norms, norms)
    assert torch.equal(q.codes.long(), codes)


def test_qsgd_special_case_textbook():
    """Uniform levels + L2 = QSGD: xi = (floor(u(s+1)) + [r < frac]) / (s+1)."""
    s, bucket = 6, 256
    cfg = QuantizerConfig(LevelSet.uniform(s), bucket)
    x = torch.randn(bucket * 8)
    q = quantize(x, cfg, seed=5).dequantize()
    r = uniforms_torch(x.numel(), 5)
    xb = x.view(-1, bucket).double()
    norm = xb.norm(dim=1, keepdim=True)
    scaled = xb.abs() / norm * (s + 1)
    low = scaled.floor()
    xi = (low + (r.view(-1, bucket).double() < scaled - low)) / (s + 1)
    textbook = (norm * xi * xb.sign()).view(-1)
    # same uniforms, same decisions: every coordinate lands on the textbook level
    assert torch.allclose(q.double(), textbook, rtol=1e-6, atol=0)


def test_nuqsgd_special_case_values():
    """Exponential levels: every value is 0 or +-norm * 2^-k, and it brackets |x|."""
    s = 6
    cfg = QuantizerConfig.nuqsgd(4, 512)
    x = torch.randn(512 * 4)
    q = quantize(x, cfg, seed=2)
    norm = q.norms.repeat_interleave(512)
    ratio = (q.dequantize().abs() / norm).double()
    allowed = torch.tensor([0.0] + [2.0**-k for k in range(s, -1, -1)], dtype=torch.float64)
    assert torch.isin(ratio.float(), allowed.float()).all()
    u = (x.abs() / norm).double()
    j = (torch.searchsorted(allowed, u, right=True) - 1).clamp(0, s)
    assert ((ratio == allowed[j]) | (ratio == allowed[(j + 1).clamp(max=s + 1)])).all()


def test_dtypes_and_strides():
    cfg = QuantizerConfig.qsgd(4, 64)
    x = torch.randn(33, 47)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(quantize(x.to(dt), cfg, 1).codes, quantize(x.to(dt).float(), cfg, 1).codes)
        assert quantize(x.to(dt), cfg, 1).dtype == dt
    xt = x.t()
    assert not xt.is_contiguous()
    assert torch.equal(quantize(xt, cfg, 1).codes, quantize(xt.contiguous(), cfg, 1).codes)
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.arange(10), cfg, 1)


def test_edge_cases():
    cfg = QuantizerConfig.qsgd(4, 16)
    z = quantize(torch.zeros(100), cfg, 0)
    assert (z.codes == 0).all() and (z.norms == 0).all() and (z.dequantize() == 0).all()
    one = quantize(torch.tensor([-2.5]), cfg, 0)
    assert one.dequantize().item() == -2.5  # u = 1 is a level: exact
    empty = quantize(torch.zeros(0), cfg, 0)
    assert empty.numel == 0 and empty.dequantize().numel() == 0
    layers = quantize([torch.randn(3, 3), torch.zeros(0), torch.randn(20)], cfg, 0)
    assert [s for s in layers.shapes] == [torch.Size([3, 3]), torch.Size([0]), torch.Size([20])]
    assert [t.shape for t in layers.dequantize_layers()] == list(layers.shapes)


def test_buckets_never_straddle_layers():
    cfg = QuantizerConfig.qsgd(4, 8)
    a, b = torch.randn(10), torch.randn(5)
    q = quantize([a, b], cfg, 0)
    assert list(bucket_starts([10, 5], 8)) == [0, 8, 10, 15]
    expect = torch.stack([a[:8].norm(), a[8:].norm(), b.norm()])
    assert torch.allclose(q.norms, expect)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_non_finite_input_raises(bad, norm):
    x = torch.randn(100)
    x[57] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf.*coordinates 0..63"):
        quantize(x, QuantizerConfig(bucket_size=64, norm=norm), 0)


def test_norm_overflow_raises():
    with pytest.raises(ValueError, match="overflows float32"):
        quantize(torch.full((4,), 3e38), QuantizerConfig.qsgd(4), 0)


def test_seed_reproducible_and_independent():
    x = torch.randn(10_000)
    cfg = QuantizerConfig.qsgd(2)
    a, b, c = (quantize(x, cfg, s).codes for s in (3, 3, 4))
    assert torch.equal(a, b)
    # independent draws: agreement rate equals the sum over coords of p^2 + (1-p)^2
    assert not torch.equal(a, c)
    u = np.random.default_rng(0).random(10**6)
    assert abs(np.mean(uniforms_torch(10**6, 9).numpy()) - np.mean(u)) < 5 * math.sqrt(1 / 12 / 10**6) * 2


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_torch_backend_same_quantization(cfg):
    """The device-agnostic path (what CUDA tensors take) gives the kernel's codes and values."""
    x = [torch.randn(777) * 2, torch.randn(5, 9)]
    a = quantize(x, cfg, 9)
    b = quantize(x, cfg, 9, backend="torch")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.norms, b.norms)
    assert torch.equal(a.dequantize(), b.dequantize(backend="torch"))
    with pytest.raises(NonFiniteError):
        quantize(torch.tensor([1.0, float("nan")]), cfg, 0, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        quantize(x, cfg, 0, backend="cuda-magic")


def test_dense_and_clustered_level_sets_use_exact_lookup():
    """Level sets too dense for one table step (scan path) and clustered ones agree with the torch path."""
    dense = LevelSet.custom(np.concatenate([[0.0], np.linspace(0.3, 0.3 + 1e-3, 200), [1.0]]))
    clustered = LevelSet.custom([0.0, 1e-6, 2e-6, 0.5, 0.5 + 1e-6, 1.0])
    assert not level_tables(dense).one_step
    x = torch.randn(4000)
    x[:100] = 0.3 * x[:100].sign() * 32  # many coordinates inside the dense cluster
    for lv in (dense, clustered):
        cfg = QuantizerConfig(lv, 1024)
        a, b = quantize(x, cfg, 1), quantize(x, cfg, 1, backend="torch")
        assert torch.equal(a.codes, b.codes)
        j = (a.codes >> 1).long()
        u = (x.abs() / a.norms.repeat_interleave(1024)[: x.numel()]).clamp_max(1)
        lvt = torch.tensor(lv.array)
        # the chosen level is a neighbour of u: l_{j-1} <= u <= l_{j+1}
        assert (lvt[(j - 1).clamp(min=0)] <= u + 1e-7).all()
        assert (lvt[(j + 1).clamp(max=len(lvt) - 1)] >= u - 1e-7).all()


# --------------------------------------------------------------- tiny (all-subnormal) buckets
@pytest.mark.parametrize(
    "cfg",
    [QuantizerConfig.qsgd_inf(4, 4), QuantizerConfig(LevelSet.custom([0, 0.05, 0.2, 0.21, 0.7, 1]), 8, "linf")],
    ids=["qsgd_inf", "custom"],
)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_subnormal_bucket_quantizes_like_its_exact_rescaling(cfg, backend):
    """A bucket whose norm is below 2^-126 (1/norm overflows float32) gets the codes of the same
    bucket scaled by 2^140 into the normal range: u is a scale-free ratio, so the tiny bucket is
    exactly as unbiased as a normal one.  Integers times 2^-149 are exact float32 subnormals."""
    k = torch.tensor([70.0, 0.0, -3.0, 21.0, 0.0, -70.0, 1.0, 55.0, 0.0, 2.0, -9.0, 69.0])
    tiny = k * 2.0**-149
    assert tiny.abs().max() < 2.0**-126 and (tiny[k != 0] != 0).all()
    for seed in range(20):
        q_tiny = quantize(tiny, cfg, seed, backend=backend)
        q_big = quantize(k * 2.0**-9, cfg, seed, backend=backend)
        assert torch.equal(q_tiny.codes, q_big.codes)
        assert torch.equal(q_tiny.norms.double() * 2.0**140, q_big.norms.double())
        assert (q_tiny.codes[k == 0] == 0).all()  # zeros stay zero (they came back as +-norm before)


def test_subnormal_bucket_unbiased_and_within_linf_bound():
    """The reported reproduction: E[Q(x)] = x (Hoeffding, values in norm*[l_j, l_{j+1}]) and
    |Q(x) - x| <= norm * (l_{j+1} - l_j), on both paths, with identical codes."""
    x = torch.tensor([1e-40, 0.0, 0.0, 3e-41])
    cfg = QuantizerConfig.qsgd_inf(4, 4)
    n = 2000
    samples = []
    for s in range(n):
        q = quantize(x, cfg, s)
        assert torch.equal(q.codes, quantize(x, cfg, s, backend="torch").codes)
        samples.append(q.dequantize().double())
    qs = torch.stack(samples)
    norm = float(q.norms[0])
    width = float(cfg.levels.array[1] - cfg.levels.array[0])  # uniform levels
    assert (qs - x.double()).abs().max() <= norm * width * (1 + 1e-6) + 2.0**-149
    # Hoeffding with delta = 1e-9 per coordinate; plus the subnormal output grid (2^-149).
    bound = norm * width * math.sqrt(math.log(2 / 1e-9) / (2 * n)) + 2.0**-149
    assert ((qs.mean(0) - x.double()).abs() <= bound).all()
    assert (qs[:, 1:3] == 0).all()
