"""``qoda bench variance``: normalised variance against measured bits on real gradients.

Gradients: the WGAN-GP ResNet generator + critic of :mod:`qoda.gan.models` on the digits
(upsampled to 32x32; both players' gradients at the same point, the VI operator), and the
byte-level transformer of :mod:`qoda.lm` on standard-library source, each at initialisation and
after some training.  For every average budget ``b`` bits per coordinate and every method, the
gradient is encoded by the real codec; the row holds the bits it produced and the exact
normalised variance ``E||Q(g) - g||^2 / ||g||^2``.  ``cgx_maxmin`` is CGX-style max-min uniform
quantization (see :func:`measure_maxmin`).  Adaptive methods fit their levels to the
gradient of a *different* minibatch at the same parameters (never to the one they quantize).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qoda.codec.layerwise import LayerwiseCodec, fixed_message_bits
from qoda.quant.allocation import allocate_plan
from qoda.quant.config import Coding, QuantizerConfig
from qoda.quant.fitting import fit_alq, levels_for_bits, plan_statistics
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerPlan, LayerPolicy
from qoda.quant.variance import plan_variance

BUDGETS = (2, 3, 4, 5, 6, 8)
DP_BITS = (2, 3, 4, 5, 6, 7, 8)
BUCKET = 1024


@dataclass
class Snapshot:
    model: str  # e.g. "wgan@init"
    module: nn.Module
    grads: list[torch.Tensor]  # the gradient that is quantized
    fit_grads: list[torch.Tensor]  # another minibatch at the same parameters


# ----------------------------------------------------------------------------- gradients
def _digits32(seed: int) -> torch.Tensor:
    from qoda.report.digits import load_digits_tensors

    x, _, _, _ = load_digits_tensors(seed)
    return nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False) * 2 - 1


def wgan_snapshots(train_steps: int = 30, batch: int = 32, seed: int = 0) -> list[Snapshot]:
    from qoda.gan.models import ResNetCritic, ResNetGenerator, gradient_penalty

    torch.manual_seed(seed)
    data = _digits32(seed)
    G, D = ResNetGenerator(channels=1), ResNetCritic(channels=1)
    both = nn.ModuleDict({"G": G, "D": D})
    gen = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(G.parameters(), lr=5e-5, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=5e-4, betas=(0.5, 0.9))

    def operator() -> list[torch.Tensor]:
        """(grad_G L_G, grad_D L_D) at the current point, one minibatch."""
        real = data[torch.randint(0, len(data), (batch,), generator=gen)]
        z = torch.randn(batch, G.latent, generator=gen)
        fake = G(z)
        d_loss = D(fake.detach()).mean() - D(real).mean() + 10.0 * gradient_penalty(D, real, fake.detach(), gen)
        g_loss = -D(fake).mean()
        gd = torch.autograd.grad(d_loss, list(D.parameters()))
        gg = torch.autograd.grad(g_loss, list(G.parameters()))
        by_param = dict(zip(list(G.parameters()) + list(D.parameters()), list(gg) + list(gd), strict=True))
        return [by_param[p].detach().clone() for p in both.parameters()]

    snaps = [Snapshot("wgan@init", both, operator(), operator())]
    for _ in range(train_steps):
        grads = operator()
        for p, g in zip(both.parameters(), grads, strict=True):
            p.grad = g
        opt_d.step()
        opt_g.step()
    snaps.append(Snapshot(f"wgan@{train_steps}", both, operator(), operator()))
    return snaps


def lm_snapshots(train_steps: int = 60, batch: int = 16, seed: int = 0) -> list[Snapshot]:
    from qoda.lm.corpus import batches, load_corpus
    from qoda.lm.model import ByteTransformer

    torch.manual_seed(seed)
    data = load_corpus()
    model = ByteTransformer()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def grad() -> list[torch.Tensor]:
        x, y = batches(data, batch, 128, gen)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        return [g.detach().clone() for g in torch.autograd.grad(loss, list(model.parameters()))]

    snaps = [Snapshot("transformer@init", model, grad(), grad())]
    for _ in range(train_steps):
        for p, g in zip(model.parameters(), grad(), strict=True):
            p.grad = g
        opt.step()
    snaps.append(Snapshot(f"transformer@{train_steps}", model, grad(), grad()))
    return snaps


# ----------------------------------------------------------------------------- methods
def _with_levels(plan: LayerPlan, levels: dict[str, LevelSet], coding: Coding) -> LayerPlan:
    configs = {t: replace(c, levels=levels.get(t, c.levels), coding=coding) for t, c in plan.configs.items()}
    return LayerPlan(plan.entries, configs)


def method_plans(snap: Snapshot, bits: int, coding: Coding, cache: dict) -> dict[str, LayerPlan]:
    """The plans of every method at ``bits`` (adaptive ones fitted on ``snap.fit_grads``)."""
    m, s = snap.module, levels_for_bits(bits)
    plans = {
        "qsgd": LayerPolicy.global_(QuantizerConfig.qsgd(bits, BUCKET, coding=coding)).plan(m),
        "qsgd_inf": LayerPolicy.global_(QuantizerConfig.qsgd_inf(bits, BUCKET, coding=coding)).plan(m),
        "nuqsgd": LayerPolicy.global_(QuantizerConfig.nuqsgd(bits, BUCKET, coding=coding)).plan(m),
        "cgx_maxmin": LayerPolicy.global_(QuantizerConfig.qsgd_inf(bits, BUCKET, coding=coding)).plan(m),
    }
    for name, policy in (
        ("alq_global", LayerPolicy.global_(QuantizerConfig.qsgd_inf(bits, BUCKET))),
        ("alq_layerwise", LayerPolicy.by_module_class(QuantizerConfig.qsgd_inf(bits, BUCKET))),
    ):
        base = policy.plan(m)
        key = (snap.model, name, bits)
        if key not in cache:
            cache[key] = {t: fit_alq(st, s) for t, st in plan_statistics(base, snap.fit_grads).items()}
        plans[name] = _with_levels(base, cache[key], coding)
    dp = _dp_plan(snap, bits, coding, cache)
    if dp is not None:
        plans["alq_layerwise_dp"] = dp
    return plans


def _dp_plan(snap: Snapshot, budget_bits: int, coding: Coding, cache: dict) -> LayerPlan | None:
    """The library's bit allocation (:func:`qoda.quant.allocation.allocate_plan`) on per-layer types:
    per-tensor widths from ``DP_BITS`` and levels, minimal fitted variance with *every* bit of the
    fixed-width message (norms, headers, uncompressed tensors) within ``budget_bits`` per coordinate."""
    base = LayerPolicy.per_layer(QuantizerConfig.qsgd_inf(2, BUCKET)).plan(snap.module)
    key = (snap.model, "per_tensor_stats")
    if key not in cache:
        cache[key] = plan_statistics(base, snap.fit_grads, per_tensor=True)
    plan_key = (snap.model, "dp_plan", budget_bits)  # one allocation per budget, for both codings
    if plan_key not in cache:
        try:
            alloc = allocate_plan(base, cache[key], budget_bits, DP_BITS, message_bits=fixed_message_bits)
            cache[plan_key] = alloc.plan
        except ValueError:  # the budget cannot hold every tensor at 2 bits plus norms and headers (budget 2)
            cache[plan_key] = None
    return None if cache[plan_key] is None else _with_levels(cache[plan_key], {}, coding)


def measure(plan: LayerPlan, grads: list[torch.Tensor], seed: int) -> tuple[float, float]:
    """(normalised exact variance, bits per coordinate the codec produced) of ``grads``."""
    codec = LayerwiseCodec(plan)
    msg = codec.encode(grads, seed)
    return plan_variance(grads, plan), msg.bits / sum(g.numel() for g in grads)


def measure_maxmin(plan: LayerPlan, grads: list[torch.Tensor], seed: int) -> tuple[float, float]:
    """CGX-style max-min uniform quantization, built from the codec's L-inf quantizer.

    Each bucket is shifted by its centre ``c = (max + min) / 2`` (one extra float32 on the
    wire), then quantized with uniform levels on ``[-r, r]``, ``r = (max - min) / 2``: the
    sign-magnitude grid has ``2^b - 1`` equally spaced points on ``[min, max]`` where CGX has
    ``2^b``.  The quantization error is that of the centred bucket, so the exact variance and
    the encoded size are measured on it (plus 32 bits per bucket for the centres).
    """
    centred = list(grads)
    buckets = 0
    for t in plan.types:
        bucket = plan.configs[t].bucket_size
        for i in plan.indices(t):
            chunks = grads[i].reshape(-1).split(bucket)
            buckets += len(chunks)
            centred[i] = torch.cat([c - (c.max() + c.min()) / 2 for c in chunks]).view_as(grads[i])
    codec = LayerwiseCodec(plan)
    msg = codec.encode(centred, seed)
    sq = sum(float(g.double().square().sum()) for g in grads)
    bits_per_coord = (msg.bits + 32 * buckets) / sum(g.numel() for g in grads)
    return plan_variance(centred, plan, normalized=False) / sq, bits_per_coord


def run_variance_study(
    budgets: tuple[int, ...] = BUDGETS,
    wgan_steps: int = 30,
    lm_steps: int = 60,
    log=print,
) -> dict:
    t0 = time.perf_counter()
    snaps = wgan_snapshots(wgan_steps) + lm_snapshots(lm_steps)
    rows, cache = [], {}
    for snap in snaps:
        for bits in budgets:
            for coding in (Coding.FIXED, Coding.ENTROPY):
                for method, plan in method_plans(snap, bits, coding, cache).items():
                    fn = measure_maxmin if method == "cgx_maxmin" else measure
                    var, bpc = fn(plan, snap.grads, seed=bits)
                    rows.append({"model": snap.model, "method": method, "coding": coding.value,
                                 "budget_bits": bits, "bits_per_coord": bpc, "normalized_variance": var})  # fmt: skip
            log(f"{snap.model:18s} {bits}b done")
    return {"benchmark": "variance", "bucket_size": BUCKET, "seconds": time.perf_counter() - t0,
            "rows": rows, "summary": summary(rows)}  # fmt: skip


def summary(rows: list[dict]) -> dict:
    """Variance ratios at 4 bits, fixed-width coding, per model."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        v = {r["method"]: r["normalized_variance"] for r in rows
             if r["model"] == model and r["budget_bits"] == 4 and r["coding"] == "fixed"}  # fmt: skip
        if not v:
            continue
        best = min(v.get("alq_layerwise", float("inf")), v.get("alq_layerwise_dp", float("inf")))
        out[model] = {
            "layerwise_vs_qsgd": v["alq_layerwise"] / v["qsgd"],
            "layerwise_vs_global_alq": v["alq_layerwise"] / v["alq_global"],
            "layerwise_dp_vs_qsgd": v["alq_layerwise_dp"] / v["qsgd"],
            "layerwise_dp_vs_global_alq": v["alq_layerwise_dp"] / v["alq_global"],
            "best_layerwise_vs_global_alq": best / v["alq_global"],
        }
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in res["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8), squeeze=False)
    methods = sorted({r["method"] for r in res["rows"]})
    for ax, model in zip(axes[0], models, strict=True):
        for i, m in enumerate(methods):
            for coding, style in (("fixed", "-o"), ("entropy", ":x")):
                pts = sorted((r["bits_per_coord"], r["normalized_variance"]) for r in res["rows"]
                             if r["model"] == model and r["method"] == m and r["coding"] == coding)  # fmt: skip
                ax.semilogy([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", ms=3,
                            label=f"{m} ({coding})")  # fmt: skip
        ax.set_title(model)
        ax.set_xlabel("measured bits per coordinate")
        ax.set_ylabel("E||Q(g)-g||^2 / ||g||^2")
    axes[0, 0].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(res: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    png = path.with_suffix(".png")
    plot(res, png)
    return png
