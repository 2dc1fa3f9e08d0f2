"""qoda's DDP hook inside Lightning and accelerate, across 2 real gloo processes on 127.0.0.1.

The project's runner starts the processes and the gloo group; each framework then finds the
group through the usual environment variables (as under torchrun) and uses it.
"""

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from distributed import run, values
from qoda.quant.config import QuantizerConfig
from qoda.quant.variance import eps_q_config

BITS, BUCKET, LR, STEPS = 4, 256, 0.05, 16


def _env(rank, world):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), NODE_RANK="0", GROUP_RANK="0")  # fmt: skip


def _data(n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 40, generator=g)
    return x, x @ torch.linspace(-1, 1, 40).unsqueeze(1) + 0.01 * torch.randn(n, 1, generator=g)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 1))


def _state(adapt=True, **kw):
    from qoda import AdaptConfig, LayerPolicy, QodaHookState, RefitSchedule

    policy = LayerPolicy.global_(QuantizerConfig.qsgd(BITS, BUCKET), min_numel=64)
    # levels fitted at the first compressed step (2) and at 5; none after the resume point (8)
    ad = AdaptConfig(schedule=RefitSchedule((0, 5), every=1000), observe_every=1) if adapt else None
    return QodaHookState(policy=policy, mode="allgather", start_iter=2, adapt=ad, **kw)


def _noise_budget(ref_grad2):
    """Descent-lemma bound on the extra loss after STEPS steps: each step adds at most
    (lr^2 L / 2) E||Q(g) - g||^2 <= (lr^2 L / 2) eps_Q ||g||^2 (allgather of K = 2 quantized
    gradients: eps_Q / K, bounded by eps_Q); L <= 2 for this MSE on standard inputs, 10 is loose.
    The fitted (ALQ) levels have a variance no larger than the uniform ones they start from."""
    eps = eps_q_config(QuantizerConfig.qsgd(BITS, BUCKET))
    return STEPS * LR**2 * 10 / 2 * eps * max(ref_grad2, 1.0)


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


# ----------------------------------------------------------------------------- Lightning
def _lightning_worker(rank, world, tmp):
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from qoda.integrations.lightning import CHECKPOINT_KEY, QodaDDPStrategy, QodaHookCallback

    _env(rank, world)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.losses = []

        def training_step(self, batch, _):
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.losses.append(float(loss.detach()))
            return loss

        def on_after_backward(self):
            self.grad2 = float(sum(p.grad.square().sum() for p in self.parameters()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    x, y = _data()
    shard = slice(rank * 256, (rank + 1) * 256)
    # one full batch per epoch and per rank: the same batch at every step, so the comparison with
    # a resumed run does not depend on how Lightning replays a partly consumed epoch
    loader = DataLoader(TensorDataset(x[shard], y[shard]), batch_size=256)

    def fit(strategy, steps, ckpt=None, callbacks=()):
        module = Module()
        trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False, callbacks=list(callbacks))  # fmt: skip
        trainer.fit(module, loader, ckpt_path=ckpt)
        return module, trainer

    res = {}
    ref, _ = fit(DDPStrategy(process_group_backend="gloo"), STEPS)
    res["ref"] = (ref.losses, _params(ref), ref.grad2)
    state = _state()
    q, _ = fit(QodaDDPStrategy(state, process_group_backend="gloo"), STEPS)
    res["qoda"] = (q.losses, _params(q), state.iter, state.stats.as_dict(), sum(p.numel() for p in q.parameters()))
    # checkpoint at step 8, resume in a new trainer with a new state
    first = _state()
    _, trainer = fit(QodaDDPStrategy(first, process_group_backend="gloo"), 8)
    path = os.path.join(tmp, "half.ckpt")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)[CHECKPOINT_KEY]
    second = _state()
    resumed, _ = fit(QodaDDPStrategy(second, process_group_backend="gloo"), STEPS, ckpt=path)
    res["resume"] = (saved["iter"], _params(resumed), second.iter, second.stats.calls, state.stats.calls)
    # the callback on Lightning's own DDPStrategy (which ignores comm hooks on CPU)
    cb_state = _state(adapt=False)
    fit(DDPStrategy(process_group_backend="gloo"), 4, callbacks=[QodaHookCallback(cb_state)])
    res["callback"] = (cb_state.iter, cb_state.stats.calls)
    return res


def test_lightning_strategy_trains_like_ddp_checkpoints_and_resumes(tmp_path):
    pytest.importorskip("lightning")
    res = values(run(_lightning_worker, 2, str(tmp_path), timeout=150, pg_timeout=60))
    for r in res:
        ref_losses, _, ref_g2 = r["ref"]
        losses, params, it, stats, numel = r["qoda"]
        assert len(losses) == len(ref_losses) == STEPS and it == STEPS
        # the hook ran on CPU/gloo: 14 compressed steps (2 fp32 warm-up), bytes well under fp32's
        assert stats["calls"] >= STEPS - 2 and stats["bytes_sent"] > 0
        fp32_bytes = 4 * numel  # ring all-reduce with K = 2: 2 (K-1)/K * 4 bytes per float
        assert stats["bytes_sent"] / stats["calls"] < 0.3 * fp32_bytes
        # warm-up steps are fp32: identical losses; then the quantized run tracks the reference
        assert losses[:3] == ref_losses[:3]
        assert losses[-1] < 0.5 * losses[0]
        gap = abs(np.mean(losses[-4:]) - np.mean(ref_losses[-4:]))
        print(f"loss gap {gap:.5f}, budget {_noise_budget(ref_g2):.5f}, final {losses[-1]:.4f} vs {ref_losses[-1]:.4f}")
        assert gap <= _noise_budget(ref_g2) + 1e-3
        # resume: restored iteration (quantization seeds) and levels -> the same parameters, bit for bit
        saved_iter, resumed_params, resumed_iter, resumed_calls, straight_calls = r["resume"]
        assert saved_iter == 8 and resumed_iter == STEPS and resumed_calls == straight_calls
        assert np.array_equal(resumed_params, params)
        assert r["callback"][0] == 4 and r["callback"][1] > 0
    assert np.array_equal(res[0]["qoda"][1], res[1]["qoda"][1])  # replicas agree


# ----------------------------------------------------------------------------- accelerate
def _accelerate_worker(rank, world, tmp):
    from accelerate import Accelerator

    from qoda.integrations.accelerate import register_qoda_hook

    _env(rank, world)
    x, y = _data()
    shard = slice(rank * 256, (rank + 1) * 256)
    x, y = x[shard], y[shard]

    def train(hook, steps, start=0, save_at=None, load=None, overlap=False):
        accelerator = Accelerator(cpu=True)
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        model, opt = accelerator.prepare(model, opt)
        state = register_qoda_hook(accelerator, model, _state(overlap=overlap)) if hook else None
        if load:
            accelerator.load_state(load)
        losses, grad2 = [], 0.0
        for step in range(start, steps):
            i = (step * 32) % 256
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x[i : i + 32]), y[i : i + 32])
            accelerator.backward(loss)
            grad2 = float(sum(p.grad.square().sum() for p in model.parameters()))
            opt.step()
            losses.append(float(loss.detach()))
            if step + 1 == save_at:
                accelerator.save_state(os.path.join(tmp, "state"))
        return losses, _params(accelerator.unwrap_model(model)), state, grad2, accelerator

    res = {}
    ref_losses, _, _, ref_g2, acc = train(False, STEPS)
    res["distributed"] = (acc.distributed_type.value, acc.num_processes)
    res["ref"] = (ref_losses, ref_g2)
    losses, params, state, _, _ = train(True, STEPS, save_at=8, overlap=True)
    res["qoda"] = (losses, params, state.iter, state.stats.as_dict())
    _, resumed, rstate, _, _ = train(True, STEPS, start=8, load=os.path.join(tmp, "state"), overlap=True)
    res["resume"] = (np.array_equal(resumed, params), rstate.iter, rstate.stats.calls == state.stats.calls)
    return res


def test_accelerate_helper_trains_like_ddp_and_resumes_with_save_state(tmp_path):
    pytest.importorskip("accelerate")
    res = values(run(_accelerate_worker, 2, str(tmp_path), timeout=120, pg_timeout=60))
    for r in res:
        assert r["distributed"] == ("MULTI_CPU", 2)
        ref_losses, ref_g2 = r["ref"]
        losses, _, it, stats = r["qoda"]
        assert it == STEPS and stats["calls"] >= STEPS - 2 and stats["bytes_sent"] > 0
        assert stats["bytes_sent"] / stats["calls"] < 0.3 * 4 * (40 * 64 + 64 + 64 + 1)
        assert losses[:3] == ref_losses[:3]  # fp32 warm-up
        assert losses[-1] < 0.5 * losses[0]
        gap = abs(np.mean(losses[-4:]) - np.mean(ref_losses[-4:]))
        print(f"loss gap {gap:.5f}, budget {_noise_budget(ref_g2):.5f}, final {losses[-1]:.4f} vs {ref_losses[-1]:.4f}")
        assert gap <= _noise_budget(ref_g2) + 1e-3
        assert r["resume"] == (True, STEPS, True)  # save_state/load_state: same run, bit for bit
    assert np.array_equal(res[0]["qoda"][1], res[1]["qoda"][1])


def test_top_level_api_is_light_and_complete():
    import subprocess

    code = (
        "import sys, qoda; heavy = [m for m in ('torch', 'lightning', 'accelerate', 'numba') if m in sys.modules];"
        "from qoda import *; import qoda.integrations;"
        "assert all(hasattr(qoda, n) for n in qoda.__all__);"
        "assert 'lightning' not in sys.modules and 'accelerate' not in sys.modules;"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # `import qoda` alone imports none of them
    import qoda

    for name in ("QuantizerConfig", "LayerPolicy", "AdaptConfig", "QodaHookState", "qoda_hook", "Aggregator",
                 "create_optimizer", "OPTIMIZERS", "QODA", "QGenX", "ExtraAdam", "OptimisticAdam"):  # fmt: skip
        assert name in qoda.__all__ and getattr(qoda, name) is not None
    with pytest.raises(AttributeError):
        qoda.no_such_name  # noqa: B018


# ----------------------------------------------------------------------------- accelerate, as documented
def _torchrun(tmp, out, *extra):
    import subprocess

    from distributed import free_port

    script = os.path.join(os.path.dirname(__file__), "accelerate_script.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), script, os.path.join(tmp, out), *extra]  # fmt: skip
    import qoda

    src = os.path.dirname(os.path.dirname(os.path.abspath(qoda.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-3000:])
    import json

    with open(os.path.join(tmp, out + ".json")) as f:
        return np.load(os.path.join(tmp, out + ".npy")), json.load(f)


def test_accelerate_under_torchrun_with_three_buckets_resumes_bit_exactly(tmp_path):
    """The README's accelerate command (torchrun, Accelerator(cpu=True)): 2 processes, 3 DDP buckets,
    DP-allocated widths; save_state at step 4 and load_state in new processes: the same parameters."""
    pytest.importorskip("accelerate")
    tmp = str(tmp_path)
    straight, info = _torchrun(tmp, "straight", "--steps", "8")
    _torchrun(tmp, "first", "--steps", "4", "--save-at", "4", "--dir", os.path.join(tmp, "ckpt"))
    resumed, _ = _torchrun(tmp, "resumed", "--steps", "8", "--from-step", "4", "--load", os.path.join(tmp, "ckpt"))
    assert np.array_equal(straight, resumed)
    assert info["processes"] == 2 and len(info["layout"]) >= 3


# ----------------------------------------------------------------------------- Lightning, several buckets
def _lightning_buckets_worker(rank, world, tmp):
    import lightning as L
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    from qoda import AdaptConfig, LayerPolicy, QodaHookState, RefitSchedule
    from qoda.integrations.lightning import QodaDDPStrategy, QodaHookCallback

    _env(rank, world)

    class Memory(Logger):
        name, version = "memory", 0

        def __init__(self):
            super().__init__()
            self.metrics = []

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

        def log_hyperparams(self, *args, **kwargs):
            pass

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                nn.Linear(256, 10),
            )  # fmt: skip

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(rank)
    loader = DataLoader(TensorDataset(torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)),
                        batch_size=32)  # fmt: skip

    def fit(steps, ckpt=None, save=None):
        adapt = AdaptConfig(allocation="dp", budget=3.0, schedule=RefitSchedule((0, 4), every=3), observe_every=1)
        state = QodaHookState(policy=LayerPolicy.global_(QuantizerConfig.qsgd(4, 256)), start_iter=1, adapt=adapt)
        module, logger = Module(), Memory()
        trainer = L.Trainer(accelerator="cpu", devices=world, max_steps=steps, logger=logger, log_every_n_steps=1,
                            strategy=QodaDDPStrategy(state, process_group_backend="gloo", bucket_cap_mb=0.25),
                            callbacks=[QodaHookCallback(state)], enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False)  # fmt: skip
        trainer.fit(module, loader, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return _params(module), len(getattr(state, "layout", ())), logger.metrics

    straight, buckets, metrics = fit(8)
    path = os.path.join(tmp, "half.ckpt")
    fit(4, save=path)
    resumed, _, _ = fit(8, ckpt=path)
    logged = sorted({k for m in metrics for k in m if k.startswith("qoda/")})
    return straight, resumed, buckets, logged


def test_lightning_ckpt_path_resumes_bit_exactly_with_three_buckets_and_logs_the_summary(tmp_path):
    pytest.importorskip("lightning")
    res = values(run(_lightning_buckets_worker, 2, str(tmp_path), timeout=240, pg_timeout=60))
    for straight, resumed, buckets, _ in res:
        assert np.array_equal(straight, resumed)  # Trainer.fit(ckpt_path=...): bit for bit
        assert buckets >= 3
    assert np.array_equal(res[0][0], res[1][0])
    logged = res[0][3]  # rank 0 logs
    assert "qoda/bits_per_coordinate" in logged and "qoda/variance" in logged
    assert any(k.startswith("qoda/bits/net.") for k in logged)
