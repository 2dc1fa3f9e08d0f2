"""torch.optim's generic optimizer tests, re-implemented for every registered optimizer variant.

Each test runs on :func:`qoda.optim.factory.optimizer_variants` (every name of the registry and
every named variant of it), so a newly registered optimizer inherits them.  Gradients are drawn
from a seeded generator, independent of the point: then every method's move in an iteration does
not depend on where it starts, which is what makes "an outside change is kept and the step moves
from there" checkable against an untouched twin (and against ``torch.optim.Adam``)."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import nn

from qoda.comm.baselines import LocalAverager
from qoda.optim import OPTIMIZERS, create_optimizer
from qoda.optim.base import TwoCallOptimizer
from qoda.optim.factory import optimizer_variants

VARIANTS = optimizer_variants()
IDS = [v[0] for v in VARIANTS]
LR = 0.05


def _make(variant: tuple[str, str, dict], params, **kw) -> torch.optim.Optimizer:
    _, name, options = variant
    return create_optimizer(name, params, **{"lr": LR, **options, **kw})


def _calls(opt: torch.optim.Optimizer) -> int:
    return 2 if isinstance(opt, TwoCallOptimizer) else 1


Grad = Callable[[torch.Tensor], torch.Tensor | None]


def _iteration(opt: torch.optim.Optimizer, params: list[torch.Tensor], grad: Grad) -> None:
    """One iteration (both oracle calls for the two-call methods); ``grad(p)`` gives each call's gradient."""
    for call in range(_calls(opt)):
        for p in params:
            p.grad = grad(p)
        if call == 0 and isinstance(opt, TwoCallOptimizer):
            opt.extrapolation()
    opt.step()


class _random_grads:  # used like a function
    """A stream of gradients drawn from a seeded generator, independent of the point (deep-copyable)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=self.gen, dtype=p.dtype)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


def _values(ps) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ps]


# ---------------------------------------------------------------- copies
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_exactly_like_the_original(variant, how):
    """torch's pattern: a deep copy / pickle round trip of a primed optimizer continues the same
    trajectory (on its own copies of the parameters).  The averager is not copied: the copy's
    first exchange says so until one is attached; add_param_group works on the copy."""
    ps = list(_model().parameters())
    opt = _make(variant, ps, averager=LocalAverager())
    grads = _random_grads(1)
    for _ in range(3):
        _iteration(opt, ps, grads)
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_ps = twin.param_groups[0]["params"]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(ps, twin_ps, strict=True))
    with pytest.raises(RuntimeError, match=r"averager: .*copy"):
        _iteration(twin, twin_ps, _random_grads(2))
    assert twin.counters == opt.counters  # the refused exchange counted nothing
    assert all(torch.equal(a, b) for a, b in zip(ps, twin_ps, strict=True))  # nor moved anything
    twin.averager = LocalAverager()
    g_a, g_b = _random_grads(2), _random_grads(2)
    for _ in range(4):
        _iteration(opt, ps, g_a)
        _iteration(twin, twin_ps, g_b)
    assert all(torch.equal(a, b) for a, b in zip(ps, twin_ps, strict=True))
    assert twin.counters == opt.counters
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    twin.add_param_group({"params": [extra]})
    _iteration(twin, [*twin_ps, extra], _random_grads(3))
    assert not torch.equal(extra.detach(), torch.ones(3, dtype=torch.float64))


def test_a_copy_without_averager_needs_none():
    """An optimizer built without averager is copied without one: the copy steps at once."""
    p = nn.Parameter(torch.ones(2))
    twin = copy.deepcopy(create_optimizer("qoda", [p]))
    assert twin.averager is None
    q = twin.param_groups[0]["params"][0]
    q.grad = torch.ones(2)
    twin.step()
    assert not torch.equal(q.detach(), torch.ones(2))


# ---------------------------------------------------------------- gradients that are absent
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_step_without_any_gradient_does_nothing(variant):
    """As torch's optimizers: no parameter has a .grad -> no move, no exchange, no counter."""
    model = _model()
    ps = list(model.parameters())
    opt = _make(variant, ps, averager=LocalAverager())
    _iteration(opt, ps, _random_grads(0))
    before, counters, t = _values(ps), opt.counters, opt.group["t"]
    opt.zero_grad()
    if isinstance(opt, TwoCallOptimizer):
        opt.extrapolation()
    opt.step()
    opt.step(lambda: model(torch.ones(1, 4, dtype=torch.float64)).sum())  # a closure without backward
    assert all(torch.equal(a, b) for a, b in zip(ps, before, strict=True))
    assert opt.counters == counters and opt.group["t"] == t


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_integer_parameter_without_gradient_is_left_alone(variant):
    """torch's pattern: an integer tensor (no gradient possible) in a group does not break a step."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    counts = nn.Parameter(torch.arange(4), requires_grad=False)
    opt = _make(variant, [w, counts], averager=LocalAverager())
    for _ in range(3):
        _iteration(opt, [w, counts], lambda p: torch.ones_like(p) if p is w else None)
    assert torch.equal(counts.detach(), torch.arange(4))
    assert (w.detach() < 1).all()


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("how", ["requires_grad_false", "frozen_mid_run"])
def test_a_parameter_without_gradient_never_moves(variant, how):
    """Defect 5: a frozen layer (requires_grad=False from the start, or frozen after some steps
    with zero_grad(set_to_none=True)) does not move, under every method, while the others do.
    Before the fix QODA precondition='none' moved it 0.016, Q-GenX 0.008, OG 0.010 in 10 steps."""
    model = _model()
    if how == "requires_grad_false":
        model[0].requires_grad_(False)
    opt = _make(variant, model.parameters())
    data = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = model(data).square().mean()
        loss.backward()
        return loss

    def one(opt):
        if isinstance(opt, TwoCallOptimizer):
            opt.step(closure)
        else:
            closure()
            opt.step()

    if how == "frozen_mid_run":
        for _ in range(3):
            one(opt)
        model[0].requires_grad_(False)
    frozen, other = _values(model[0].parameters()), _values(model[2].parameters())
    for _ in range(10):
        one(opt)
    assert all(torch.equal(a, b) for a, b in zip(model[0].parameters(), frozen, strict=True))
    assert not torch.equal(model[2].weight.detach(), other[0])


# ---------------------------------------------------------------- complex parameters, weight decay
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_complex_parameters_are_supported_or_refused_by_name(variant):
    """Methods whose update is linear in the gradient (GDA, EG, OG) take complex parameters and move
    them exactly as the real view; the others refuse them at construction, naming the parameter."""
    z = nn.Parameter(torch.tensor([1 + 2j, -0.5j], dtype=torch.complex128))
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    if not OPTIMIZERS[variant[1]].cls.supports_complex:
        with pytest.raises(ValueError, match=r"param_groups\[0\]\.params\[1\]: complex parameter"):
            _make(variant, [w, z])
        return
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_c, opt_r = _make(variant, [z]), _make(variant, [r])
    g_c, g_r = _random_grads(0), _random_grads(0)
    for _ in range(4):
        _iteration(opt_c, [z], lambda p: torch.view_as_complex(g_c(r)))
        _iteration(opt_r, [r], g_r)
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_weight_decay_in_a_group_is_used_or_refused_by_name(variant):
    """The Adam variants take (decoupled) weight decay per group; the others refuse a non-zero
    value at construction (a silently ignored weight_decay was the alternative); 0 is accepted."""
    a, b = nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    groups = [{"params": [a]}, {"params": [b], "weight_decay": 0.5}]
    if "weight_decay" not in OPTIMIZERS[variant[1]].options:
        with pytest.raises(ValueError, match=r"param_groups\[1\]\.weight_decay: .*no weight decay"):
            _make(variant, groups)
        _make(variant, [{"params": [a]}, {"params": [b], "weight_decay": 0.0}])
        return
    opt = _make(variant, groups)
    for _ in range(2):
        _iteration(opt, [a, b], torch.zeros_like)  # zero gradient: only the decay moves
    torch.testing.assert_close(b.detach(), torch.full((2,), (1 - LR * 0.5) ** 2, dtype=torch.float64))
    assert torch.equal(a.detach(), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------- learning rates
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("schedule", ["warmup_from_zero", "cosine_through_t_max"])
def test_lr_zero_under_schedulers(variant, schedule):
    """Defect 4: LambdaLR warm-up from 0 and CosineAnnealingLR reaching 0 at T_max, as with
    torch.optim.Adam: a step at lr = 0 leaves the parameters bit for bit where they are (its
    gradient still enters the dual state and the counters), and training goes on from there."""
    ps = list(_model().parameters())
    opt = _make(variant, ps)
    if schedule == "warmup_from_zero":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, e / 3))
        zero_at = {0}
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        zero_at = {4}
    grads = _random_grads(0)
    for it in range(8):
        before, exchanges = _values(ps), opt.counters["exchanges"]
        _iteration(opt, ps, grads)
        moved = any(not torch.equal(a, b) for a, b in zip(ps, before, strict=True))
        assert moved == (it not in zero_at), (it, opt.param_groups[0]["lr"])
        assert opt.counters["exchanges"] == exchanges + _calls(opt)
        assert all(torch.isfinite(p).all() for p in ps)
        sched.step()


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_tensor_learning_rate_is_read_at_its_value(variant):
    """lr = torch.tensor(...) (compiled/capturable habit) gives the float run bit for bit, also
    under a scheduler (which writes the tensor in place)."""
    runs = []
    for lr in (LR, torch.tensor(LR, dtype=torch.float64)):
        ps = list(_model().parameters())
        opt = _make(variant, ps, lr=lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        grads = _random_grads(0)
        for _ in range(5):
            _iteration(opt, ps, grads)
            sched.step()
        runs.append(_values(ps))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("bad", [-0.1, float("nan"), torch.tensor([0.1, 0.2])])
def test_bad_lr_written_into_a_group_is_refused_before_the_exchange(variant, bad):
    """A bad lr written after construction is named and changes nothing (no exchange, no move)."""
    ps = list(_model().parameters())
    opt = _make(variant, ps)
    _iteration(opt, ps, _random_grads(0))
    before, counters = _values(ps), opt.counters
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(ValueError, match=r"param_groups\[0\]\.lr: must be a finite number >= 0"):
        _iteration(opt, ps, _random_grads(1))
    assert opt.counters == counters
    assert all(torch.equal(a, b) for a, b in zip(ps, before, strict=True))


# ---------------------------------------------------------------- outside changes (defect 3)
def _torch_adam(params, **_):
    return torch.optim.Adam(params, lr=LR)


REFERENCES = [*VARIANTS, ("torch-adam", "torch-adam", {})]
REF_IDS = [v[0] for v in REFERENCES]


def _build(variant, params):
    return _torch_adam(params) if variant[1] == "torch-adam" else _make(variant, params)


def _moves_with_and_without(variant, outside: Callable[[int, nn.Module], None], iterations: int = 8):
    """Two twins on the same gradients; ``outside(i, model)`` changes one twin's parameters
    before iteration ``i``.  Returns both twins' per-iteration moves (after - before, where
    before is the parameter as the outside change left it) and the changed twin's model."""
    moves, models = [], []
    for change in (True, False):
        model = _model()
        ps = list(model.parameters())
        opt = _build(variant, ps)
        grads = _random_grads(7)
        mine = []
        for i in range(iterations):
            if change:
                with torch.no_grad():
                    outside(i, model)
            before = _values(ps)
            _iteration(opt, ps, grads)
            mine.append([p.detach() - b for p, b in zip(ps, before, strict=True)])
        moves.append(mine)
        models.append(model)
    return moves[0], moves[1], models[0]


def _assert_same_moves(changed, untouched):
    # the re-anchoring adds one rounding of |X_1|, |Y| ~ 1 in float64: 1e-12 is generous
    for i, (a, b) in enumerate(zip(changed, untouched, strict=True)):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=lambda m, i=i: f"iteration {i}: {m}")


@pytest.mark.parametrize("variant", REFERENCES, ids=REF_IDS)
def test_weights_loaded_after_building_the_optimizer_are_trained_from(variant):
    """Habit 1: build the optimizer, then load pretrained/checkpointed weights into the model.
    The run trains from the loaded weights: bit for bit the run whose optimizer was built after
    loading, and every move equals the untouched twin's (before the fix QODA and Q-GenX pulled
    the parameters back to the weights they had at construction)."""
    loaded = {k: v + 3.0 for k, v in _model().state_dict().items()}

    def load(i, model):
        if i == 0:
            model.load_state_dict(loaded)

    changed, untouched, model = _moves_with_and_without(variant, load)
    _assert_same_moves(changed, untouched)
    after_loading = _model()
    after_loading.load_state_dict(loaded)
    ps = list(after_loading.parameters())
    opt = _build(variant, ps)
    grads = _random_grads(7)
    for _ in range(8):
        _iteration(opt, ps, grads)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ps, strict=True))


@pytest.mark.parametrize("variant", REFERENCES, ids=REF_IDS)
def test_weight_clipping_after_each_step_is_kept(variant):
    """Habit 2, WGAN weight clipping: p.clamp_(-c, c) after every step.  Each step moves from
    the clipped value by what the unclipped twin moves (before: QODA undid the clipping)."""
    c = 0.01

    def clip(i, model):
        for p in model.parameters():
            p.clamp_(-c, c)

    changed, untouched, model = _moves_with_and_without(variant, clip)
    _assert_same_moves(changed, untouched)
    with torch.no_grad():
        clip(0, model)
    assert max(float(p.detach().abs().max()) for p in model.parameters()) <= c


@pytest.mark.parametrize("variant", REFERENCES, ids=REF_IDS)
def test_a_weight_set_by_hand_is_kept(variant):
    """Habit 3: one weight set to 5.0 mid-run is 5.0 plus the twin's move after the next step
    (before the fix: QODA 0.02, Q-GenX 0.41 after one step)."""

    def set_weight(i, model):
        if i == 3:
            model[0].weight[0, 0] = 5.0

    changed, untouched, model = _moves_with_and_without(variant, set_weight, iterations=4)
    _assert_same_moves(changed, untouched)
    assert float(model[0].weight.detach()[0, 0]) == pytest.approx(5.0 + float(untouched[3][0][0, 0]), abs=1e-12)


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_state_dict_round_trip_resumes_bit_exactly_with_outside_changes(variant):
    """A checkpoint (model + optimizer state_dict, torch.save with weights_only loading) taken
    after the parameters were changed outside (clipping) resumes the uninterrupted trajectory
    bit for bit: the record of the last write travels in the state_dict."""

    def clip(model):
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-0.05, 0.05)

    model = _model()
    ps = list(model.parameters())
    opt = _make(variant, ps)
    grads = _random_grads(3)
    for _ in range(3):
        _iteration(opt, ps, grads)
        clip(model)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    rps = list(resumed.parameters())
    ropt = _make(variant, rps)
    ropt.load_state_dict(saved["opt"])
    rgrads = copy.deepcopy(grads)
    for _ in range(4):
        _iteration(opt, ps, grads)
        clip(model)
        _iteration(ropt, rps, rgrads)
        clip(resumed)
    assert all(torch.equal(a, b) for a, b in zip(ps, rps, strict=True))
    assert opt.counters == ropt.counters
