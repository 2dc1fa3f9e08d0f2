"""Optimizers on analytic VI problems; state_dict round trips; hyper-parameter validation."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from qoda.optim import OPTIMIZERS, QODA, create_optimizer
from qoda.optim.base import TwoCallOptimizer
from qoda.vi.problems import Noise, bilinear, logistic_game, monotone_linear, strongly_monotone
from qoda.vi.simulator import RunConfig, SimulatedAverager, fitted_slope, layerwise_plan, simulate

ALL = sorted(OPTIMIZERS)


def _params(prob):
    return [nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in prob.blocks]


def _set_grads(prob, params, gen):
    z = torch.cat([p.detach() for p in params])
    v = prob.oracle(z, Noise("absolute", 0.05), gen)
    for p, g in zip(params, v.split(list(prob.blocks)), strict=True):
        p.grad = g.clone()


def _iterate(opt, prob, params, gen, n):
    for _ in range(n):
        if isinstance(opt, TwoCallOptimizer):
            _set_grads(prob, params, gen)
            opt.extrapolation()
        _set_grads(prob, params, gen)
        opt.step()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("split_inside", [False, True])
def test_state_dict_round_trip_continues_identically(name, split_inside):
    """timm-style: prime, save, reload into a fresh copy, continue both: identical trajectories.

    ``split_inside`` saves two-call methods between extrapolation() and step()."""
    prob = bilinear(d=10, seed=1)
    hyper = {"lr": 0.05}
    pa = _params(prob)
    a = create_optimizer(name, pa, **hyper)
    gen = torch.Generator().manual_seed(0)
    _iterate(a, prob, pa, gen, 7)
    if split_inside and isinstance(a, TwoCallOptimizer):
        _set_grads(prob, pa, gen)
        a.extrapolation()
    saved = copy.deepcopy(a.state_dict())
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    b = create_optimizer(name, pb, **hyper)
    b.load_state_dict(saved)
    gen_b = copy.deepcopy(gen)
    for opt, ps, g in ((a, pa, gen), (b, pb, gen_b)):
        if split_inside and isinstance(opt, TwoCallOptimizer):
            _set_grads(prob, ps, g)
            opt.step()
        _iterate(opt, prob, ps, g, 5)
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    assert a.counters == b.counters


@pytest.mark.parametrize("name", ALL)
def test_exchanges_per_iteration(name):
    prob = bilinear(d=6)
    ps = _params(prob)
    opt = create_optimizer(name, ps, lr=0.1)
    _iterate(opt, prob, ps, torch.Generator().manual_seed(0), 10)
    k = OPTIMIZERS[name].calls_per_iteration
    assert opt.counters["exchanges"] == opt.counters["oracle_calls"] == 10 * k
    assert opt.group["t"] == 10


@pytest.mark.parametrize(
    ("name", "kw", "field"),
    [
        ("qoda", {"lr": -1e-3}, "lr"),
        ("gda", {"lr": float("inf")}, "lr"),
        ("og", {"lr": torch.tensor([0.1, 0.2])}, "lr"),
        ("qoda", {"q": 0.6}, "q"),
        ("qoda", {"rate": "fancy"}, "rate"),
        ("qoda", {"c_gamma": -1}, "c_gamma"),
        ("qgenx", {"lr": float("nan")}, "lr"),
        ("eg", {"lr": -0.1}, "lr"),
        ("extra_adam", {"betas": (0.5, 1.0)}, "betas"),
        ("optimistic_adam", {"eps": 0}, "eps"),
    ],
)
def test_invalid_hyper_parameters_name_the_field(name, kw, field):
    with pytest.raises(ValueError, match=field):
        create_optimizer(name, [nn.Parameter(torch.zeros(2))], **kw)
    with pytest.raises(ValueError, match="optimizer"):
        create_optimizer("sgd-ish", [nn.Parameter(torch.zeros(2))])


def test_two_call_api_misuse():
    opt = create_optimizer("eg", [nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(RuntimeError, match="extrapolation"):
        opt.step()
    opt.extrapolation()
    with pytest.raises(RuntimeError, match="twice"):
        opt.extrapolation()


def test_step_closure_does_both_calls():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = create_optimizer("eg", [p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    # x_half = x - 0.1 x = 0.9 x; x_new = x - 0.1 * 0.9 x = 0.91 x
    assert torch.allclose(p.detach(), torch.tensor([0.91, -1.82]))
    assert opt.counters["oracle_calls"] == 2


def test_gda_diverges_on_bilinear_and_the_others_converge():
    for name in ALL:
        r = simulate(RunConfig("bilinear", name, Noise("none", 0.0), None, workers=1, iterations=1000, d=20))
        first, last = r["history"][0], r["history"][-1]
        if name == "gda":
            # the iterate spirals outwards: |1 + i lr s| > 1 for every singular value s
            assert last["distance_last"] > 10 * first["distance_last"]
        elif name.endswith("adam"):  # no guarantee for Adam steps on games; they do make steady progress here
            assert last["gap"] < 0.1 * first["gap"], name
            assert r["slope"] < -0.5, (name, r["slope"])
        else:  # O(1/T) ergodic rate of the extra-gradient family on monotone problems
            assert last["gap"] < 0.05 * first["gap"], name
            assert r["slope"] < -0.7, (name, r["slope"])


@pytest.mark.parametrize("maker", [strongly_monotone, monotone_linear, logistic_game])
def test_qoda_converges_on_every_problem(maker):
    prob = maker(d=20, seed=3)
    r = simulate(
        RunConfig(problem=prob.name, method="qoda", noise=Noise("relative", 0.1), d=20, iterations=800, seed=3)
    )
    assert r["final_gap"] < 0.05 * r["history"][0]["gap"]
    assert r["history"][-1]["distance"] < 0.5 * r["history"][0]["distance"]


@pytest.mark.parametrize(("noise", "limit"), [("relative", -0.9), ("absolute", -0.45)])
def test_qoda_rates_on_bilinear(noise, limit):
    """The reference's claims: slope <= -0.9 (relative noise), <= -0.45 (absolute), also at 4 bits;
    4-bit quantized gap within 1.5x of unquantized."""
    base = RunConfig("bilinear", "qoda", Noise(noise, 0.1), None, workers=4, iterations=1500, d=20)
    r32 = simulate(base)
    r4 = simulate(RunConfig("bilinear", "qoda", Noise(noise, 0.1), 4, workers=4, iterations=1500, d=20))
    assert r32["slope"] <= limit and r4["slope"] <= limit
    assert r4["final_gap"] <= 1.5 * r32["final_gap"]
    assert r4["bits_sent"] < r32["bits_sent"] / 3  # 4 bits + 2 norms vs 32 bits per coordinate


def test_q_zero_stalls_compared_to_the_default_rule():
    """Separated rule with q = 0 decays the optimistic step too fast (reference section 3)."""
    cfg = {"problem": "bilinear", "method": "qoda", "noise": Noise("absolute", 0.1), "iterations": 1500, "d": 20}
    default = simulate(RunConfig(**cfg))
    q0 = simulate(RunConfig(**cfg, hyper={"q": 0.0}))
    assert default["final_gap"] < q0["final_gap"]


def test_gap_is_exact_for_affine_problems():
    """Closed-form / trust-region gap equals a brute-force maximisation over the ball."""
    for maker in (bilinear, monotone_linear, strongly_monotone):
        prob = maker(d=6, seed=2)
        x = prob.z_star + torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        exact = prob.gap(x)
        gen = torch.Generator().manual_seed(1)
        w = torch.randn(200_000, 6, dtype=torch.float64, generator=gen)
        w = (
            w
            / w.norm(dim=1, keepdim=True)
            * prob.radius
            * torch.rand(200_000, 1, generator=gen, dtype=torch.float64) ** (1 / 6)
        )
        z = prob.z_star + w
        vals = ((z @ prob.G.T + prob.q) * (x - z)).sum(1)
        assert float(vals.max()) <= exact + 1e-9
        assert float(vals.max()) >= exact * (1 - 0.05)  # sampled points come close to the maximum
        assert prob.gap(prob.z_star) == 0.0


def test_simulated_quantized_average_matches_arithmetic():
    """The simulated averager is (1/K) sum_k Q_k(g_k) with independent quantization per worker."""
    plan = layerwise_plan((5, 7), 8)
    avg = SimulatedAverager(plan, 3, seed=4)
    gs = [[torch.randn(5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)] for _ in range(3)]
    avg.set_worker_tensors(gs)
    out = [torch.zeros(5, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)]
    stats = avg.average_(out, 0)
    truth = [sum(g[i] for g in gs) / 3 for i in range(2)]
    for o, t in zip(out, truth, strict=True):
        assert torch.allclose(o, t, atol=0.05 * float(t.abs().max()) + 0.05)
    assert stats.payload_bits == 12 * 8 + 2 * 32


def test_fitted_slope():
    ts = np.array([10, 20, 40, 80, 160])
    assert math.isclose(fitted_slope(ts, 3.0 / ts), -1.0, abs_tol=1e-9)


@pytest.mark.parametrize("rate", ["separated", "single"])
def test_qoda_rates_follow_the_formulas_over_steps(rate):
    """eta_t = c_eta (1 + sum ||V_s - V_{s-1}||^2)^(-1/2) and gamma_t = c_gamma (1 + sum ||V_s||^2)^(q - 1/2)
    (or eta with rate="single"), checked against sums kept here over 6 steps of known dual vectors, and the
    iterate X_{t+1} - gamma V_t with X_{t+1} = X_1 + eta Y."""
    torch.manual_seed(3)
    x1 = torch.randn(4, dtype=torch.float64)
    p = nn.Parameter(x1.clone())
    c_eta, c_gamma, q, lr = 0.7, 1.3, 0.2, 0.5
    opt = QODA([p], lr=lr, c_eta=c_eta, c_gamma=c_gamma, q=q, rate=rate, precondition="none")
    s_diff = s_sq = 0.0
    y, prev = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for _ in range(6):
        v = torch.randn(4, dtype=torch.float64) * 3
        p.grad = v.clone()
        opt.step()
        s_diff += float((v - prev).square().sum())
        s_sq += float(v.square().sum())
        eta = lr * c_eta * (1 + s_diff) ** -0.5
        gamma = eta if rate == "single" else lr * c_gamma * (1 + s_sq) ** (q - 0.5)
        assert opt.rates() == pytest.approx((eta, gamma), rel=1e-12)
        y -= v
        torch.testing.assert_close(p.detach(), x1 + eta * y - gamma * v, rtol=1e-12, atol=1e-12)
        prev = v


@pytest.mark.parametrize("name", ALL)
def test_per_group_learning_rates(name):
    """Player groups: equal rates reproduce the single-group run exactly; with a constant
    operator the first iteration's displacement is linear in the group's rate (every method)."""
    torch.manual_seed(0)
    g1, g2 = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def run(groups):
        ps = [nn.Parameter(torch.zeros(5, dtype=torch.float64)), nn.Parameter(torch.zeros(3, dtype=torch.float64))]
        opt = create_optimizer(name, groups(ps), lr=0.05)
        for _ in range(3):
            for _call in range(OPTIMIZERS[name].calls_per_iteration):
                ps[0].grad, ps[1].grad = g1.clone(), g2.clone()
                if _call == 0 and isinstance(opt, TwoCallOptimizer):
                    opt.extrapolation()
            opt.step()
        return [p.detach().clone() for p in ps]

    single = run(lambda ps: ps)
    same = run(lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]]}])
    assert all(torch.equal(a, b) for a, b in zip(single, same, strict=True))

    def first(lr2):
        ps = [nn.Parameter(torch.zeros(5, dtype=torch.float64)), nn.Parameter(torch.zeros(3, dtype=torch.float64))]
        opt = create_optimizer(name, [{"params": [ps[0]]}, {"params": [ps[1]], "lr": lr2}], lr=0.05)
        for _call in range(OPTIMIZERS[name].calls_per_iteration):
            ps[0].grad, ps[1].grad = g1.clone(), g2.clone()
            if _call == 0 and isinstance(opt, TwoCallOptimizer):
                opt.extrapolation()
        opt.step()
        return ps[0].detach().clone(), ps[1].detach().clone()

    a0, a1 = first(0.05)
    b0, b1 = first(0.15)
    assert torch.equal(a0, b0)  # the other player's move does not depend on this group's rate
    torch.testing.assert_close(b1, 3 * a1, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.lr"):
        create_optimizer(
            name, [{"params": [nn.Parameter(torch.zeros(2))]}, {"params": [nn.Parameter(torch.zeros(2))], "lr": -1.0}]
        )


@pytest.mark.parametrize("problem", ["bilinear", "monotone_linear"])
def test_qoda_coordinate_scope_keeps_the_rate(problem):
    """The diagonal (per-coordinate) rates the GAN trainer uses still give the O(1/T) ergodic rate under
    relative noise (gap slope ~ -1 on the log-log plot), like the analysed global rule."""
    hyper = {"lr": 0.3, "scope": "coordinate", "rate": "single", "delta": 1e-8, "precondition": "none"}
    r = simulate(
        RunConfig(problem, "qoda", Noise("relative", 0.1), None, workers=4, iterations=2000, d=20, hyper=hyper)
    )
    assert r["slope"] < -0.9, r["slope"]
    assert r["final_gap"] < 0.01 * r["history"][0]["gap"]
    with pytest.raises(ValueError, match="scope"):
        QODA([nn.Parameter(torch.zeros(2))], scope="layer")


def test_adam_preconditioned_qoda_is_the_optimistic_recursion_on_adam_directions():
    """precondition="adam": from the second step on, the half-iterates move exactly like OptimisticAdam's
    (same Adam moments of the same dual vectors); the first step moves 2 lr d_1 instead of lr d_1."""
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(7, dtype=torch.float64))]
    b = [nn.Parameter(a[0].detach().clone())]
    qa, ob = QODA(a, lr=0.01, precondition="adam"), create_optimizer("optimistic_adam", b, lr=0.01)
    prev_a, prev_b = a[0].detach().clone(), b[0].detach().clone()
    for t in range(30):
        g = torch.randn(7, dtype=torch.float64)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        qa.step()
        ob.step()
        da, db = a[0].detach() - prev_a, b[0].detach() - prev_b
        if t == 0:
            torch.testing.assert_close(da, 2 * db, rtol=1e-12, atol=1e-15)
        else:
            torch.testing.assert_close(da, db, rtol=1e-9, atol=1e-15)
        prev_a, prev_b = a[0].detach().clone(), b[0].detach().clone()
    with pytest.raises(ValueError, match="precondition"):
        QODA(a, precondition="lion")


@pytest.mark.parametrize(
    "hyper",
    [
        {"precondition": "adam", "lr": 0.01},
        {"scope": "coordinate", "rate": "single", "delta": 1e-8, "lr": 0.1, "precondition": "none"},
    ],
)
def test_qoda_variants_state_dict_round_trip(hyper):
    prob = bilinear(d=10, seed=1)
    pa = _params(prob)
    a = QODA(pa, **hyper)
    gen = torch.Generator().manual_seed(0)
    _iterate(a, prob, pa, gen, 6)
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    b = QODA(pb, **hyper)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    gen_b = copy.deepcopy(gen)
    _iterate(a, prob, pa, gen, 5)
    _iterate(b, prob, pb, gen_b, 5)
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


# --------------------------------------------------------- torch.optim habits (schedulers, groups, grads)
ANCHORED = [
    ("qoda", {"lr": 0.05, "precondition": "none"}),
    ("qoda", {"lr": 0.05, "scope": "coordinate", "rate": "single", "delta": 1e-8, "precondition": "none"}),
    ("qoda", {"lr": 0.01, "precondition": "adam"}),
    ("qgenx", {"lr": 0.05}),
]


@pytest.mark.parametrize(("name", "hyper"), ANCHORED, ids=["qoda", "qoda-coordinate", "qoda-adam", "qgenx"])
def test_lr_scheduler_changes_the_step_without_a_jump(name, hyper):
    """Dual averaging's iterate is anchor + lr f_t Y: a scheduler's lr *= 0.1 used to rescale the
    whole path (one step moved ~30x a normal step).  Now the change re-anchors (the parameter, its
    optimistic offset included, is reproduced at the new lr), so the very next step is already
    ~10x smaller, as the ones after it."""
    prob = bilinear(d=10, seed=1)
    ps = _params(prob)
    opt = create_optimizer(name, ps, **hyper)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=200, gamma=0.1)
    gen = torch.Generator().manual_seed(0)
    moves = []
    for _ in range(240):
        before = torch.cat([p.detach().clone() for p in ps])
        _iterate(opt, prob, ps, gen, 1)
        sched.step()
        moves.append(float((torch.cat([p.detach() for p in ps]) - before).norm()))
    typical = float(np.median(moves[180:200]))
    assert moves[200] <= 0.2 * typical, (moves[200], typical)
    assert float(np.median(moves[220:240])) <= 0.2 * typical
    assert opt.param_groups[0]["lr"] == pytest.approx(hyper["lr"] * 0.1)


@pytest.mark.parametrize("name", ALL)
def test_add_param_group_then_step(name):
    """torch.optim's add_param_group: the new group is validated, gets its state and moves."""
    a, b = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = create_optimizer(name, [a], lr=0.01)
    a.grad = torch.ones_like(a)
    _step_all(opt, [a, b])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.betas"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "betas": (0.9, 1.5)})
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": -1.0})
    opt.add_param_group({"params": [b], "lr": 0.02})
    for _ in range(3):
        a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        _step_all(opt, [a, b])
    assert (b.detach() < 1).all() and torch.isfinite(b).all()


def _step_all(opt, ps):
    if isinstance(opt, TwoCallOptimizer):
        grads = [None if p.grad is None else p.grad.clone() for p in ps]
        opt.extrapolation()
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
    opt.step()


@pytest.mark.parametrize("name", ALL)
def test_parameters_without_grad_do_not_move(name):
    """A frozen parameter (never a .grad) passed to the optimizer stays where it is, as in torch,
    while the others move; a step with no gradient at all does nothing (as torch's)."""
    a, frozen = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.full((2,), 5.0))
    opt = create_optimizer(name, [a, frozen], lr=0.01)
    for _ in range(4):
        a.grad = torch.ones_like(a)
        _step_all(opt, [a, frozen])
    assert torch.equal(frozen.detach(), torch.full((2,), 5.0))
    assert (a.detach() < 1).all()
    a.grad = None
    before, counters = a.detach().clone(), opt.counters
    _step_all(opt, [a, frozen])
    assert torch.equal(a.detach(), before) and opt.counters == counters


@pytest.mark.parametrize("name", ["adam", "optimistic_adam", "extra_adam"])
def test_decoupled_weight_decay(name):
    """With a zero gradient the Adam direction is 0, so each iteration scales the point by exactly
    (1 - lr wd) (AdamW's decoupled decay); invalid values are named."""
    p = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    opt = create_optimizer(name, [p], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        p.grad = torch.zeros_like(p)
        _step_all(opt, [p])
    torch.testing.assert_close(p.detach(), torch.full((4,), 2.0 * 0.95**3, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight_decay"):
        create_optimizer(name, [p], weight_decay=-1.0)


def test_simultaneous_adam_with_weight_decay_is_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(6, dtype=torch.float64))
    b = nn.Parameter(a.detach().clone())
    ours = create_optimizer("adam", [a], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(6, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def test_names_resolve_like_timm():
    p = [nn.Parameter(torch.zeros(2))]
    for name in ("ExtraAdam", "extra-adam", "EXTRA_ADAM"):
        assert type(create_optimizer(name, p)).__name__ == "ExtraAdam"
    with pytest.raises(ValueError, match="unknown name"):
        create_optimizer("lion", p)


def test_qoda_defaults_lead_to_the_deep_learning_variant():
    """QODA(params) is the Adam-preconditioned variant (lr 1e-3), the analysed method is one
    argument away (lr 1), and the analysed rules' options are refused where they would be ignored."""
    p = [nn.Parameter(torch.zeros(3))]
    default, analysed = QODA(p), QODA(p, precondition="none")
    assert default.group["precondition"] == "adam" and default.group["lr"] == 1e-3
    assert analysed.group["precondition"] == "none" and analysed.group["lr"] == 1.0
    for kw in ({"scope": "coordinate"}, {"rate": "single"}, {"q": 0.1}, {"c_eta": 2.0}, {"delta": 1e-8}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}: .*precondition='none'"):
            QODA(p, **kw)
        QODA(p, precondition="none", **kw)
