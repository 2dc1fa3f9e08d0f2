"""The compressor contract's worked example: top-k (:mod:`qoda.codec.topk`), exact bits, and its
average across 2 gloo processes through the trainer's averager factory and its DDP hook."""

import copy
import pickle
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run, values
from qoda.codec.compressor import Compressor
from qoda.codec.format import CodecError
from qoda.codec.topk import TopK
from qoda.comm.ddp_hook import QodaHookState
from qoda.quant.adapt import AdaptConfig

SHAPES = [torch.Size([32, 40]), torch.Size([32]), torch.Size([7, 3, 2])]


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _exact_topk(tensors, k):
    """The dense vector keeping the ``k`` largest ``|g_i|`` (numpy's sort, independent of torch.topk)."""
    flat = np.concatenate([t.numpy().ravel() for t in tensors]).astype(np.float32)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    dense = np.zeros_like(flat)
    dense[keep] = flat[keep]
    return dense


def _flat(tensors):
    return np.concatenate([t.numpy().ravel() for t in tensors])


def test_message_is_exactly_64_bits_per_kept_coordinate_and_decodes_to_the_top_k():
    c = TopK(SHAPES, fraction=0.05)
    assert isinstance(c, Compressor)
    n = sum(s.numel() for s in SHAPES)
    assert c.k == round(0.05 * n) and c.message_size() == 8 * c.k and c.message_bits() == 64 * c.k
    x = _tensors(0)
    msg = c.encode(x, seed=123)
    assert len(msg) == c.message_size() and msg.bits == c.message_bits() == msg.code_bits
    assert torch.equal(c.encode(x, seed=7).data, msg.data)  # deterministic: the seed is unused
    outs = [torch.ones(s) for s in SHAPES]
    c.decode_into(msg.data, outs, accumulate=True)
    np.testing.assert_array_equal(_flat(outs), np.float32(1.0) + _exact_topk(x, c.k))  # added
    c.decode_into(msg.data.numpy().tobytes(), outs, accumulate=False)  # bytes on the wire decode alike
    np.testing.assert_array_equal(_flat(outs), _exact_topk(x, c.k))
    buf = np.zeros(c.message_size() + 5, dtype=np.uint8)
    assert np.array_equal(c.encode(x, 0, out=buf).data.numpy(), msg.data.numpy())  # into a reused buffer
    assert c.state_dict() == {}


def test_bad_input_and_damaged_messages_raise_one_line_errors():
    c = TopK(SHAPES, fraction=0.05)
    with pytest.raises(ValueError, match="fraction"):
        TopK(SHAPES, fraction=0.0)
    with pytest.raises(ValueError, match="tensors: shapes"):
        c.encode(_tensors(0)[:2], 0)
    bad = _tensors(0)
    bad[1][3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        c.encode(bad, 0)
    data = c.encode(_tensors(0), 0).data.clone()
    outs = [torch.zeros(s) for s in SHAPES]
    with pytest.raises(CodecError, match="bytes, expected"):
        c.decode_into(data[:-1], outs)
    data[:4] = torch.tensor([255, 255, 255, 127], dtype=torch.uint8)  # first index 2^31 - 1: out of range
    with pytest.raises(CodecError, match="indices"):
        c.decode_into(data, outs)


def test_error_feedback_memory_is_the_state_a_resumed_run_needs(gloo_world_1):
    from qoda.comm.compressed import CompressedAverager

    avg = CompressedAverager(TopK(SHAPES, 0.05, error_feedback=True))
    x1, x2 = _tensors(1), _tensors(2)
    first = [t.clone() for t in x1]
    avg.average_(first, step=0)
    k = avg.compressor.k
    np.testing.assert_array_equal(_flat(first), _exact_topk(x1, k))
    saved = pickle.loads(pickle.dumps(avg.state_dict()))
    memory = _flat(x1) - _exact_topk(x1, k)  # e_1 = g_1 - topk(g_1)
    np.testing.assert_array_equal(saved["compressor"]["memory"].numpy(), memory)
    second = [t.clone() for t in x2]
    avg.average_(second, step=1)
    fed = _flat(x2) + memory
    np.testing.assert_array_equal(_flat(second), _exact_topk([torch.from_numpy(fed)], k))  # topk(g_2 + e_1)
    resumed = CompressedAverager(TopK(SHAPES, 0.05, error_feedback=True))
    resumed.load_state_dict(saved)
    again = [t.clone() for t in x2]
    resumed.average_(again, step=1)
    assert all(torch.equal(a, b) for a, b in zip(again, second, strict=True))
    assert resumed.stats.calls == 2  # the costs resume too
    with pytest.raises(ValueError, match="stateless"):
        TopK(SHAPES, 0.05).load_state_dict(saved["compressor"])


def test_the_hook_checkpoints_each_group_compressor_state(gloo_world_1):
    """Error feedback through the DDP hook: a state saved after step 1 and loaded into a new hook
    gives step 2's averaged gradients bit for bit."""

    def step(state, model, seed):
        ddp = nn.parallel.DistributedDataParallel(model)
        state.register(ddp)
        ddp(torch.randn(8, 20, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return grads

    factory = partial(TopK, fraction=0.05, error_feedback=True)
    model, _ = _model_and_batch(0)
    state = QodaHookState(compressor=factory, start_iter=0)
    step(state, model, 1)
    saved = pickle.loads(pickle.dumps(state.state_dict()))
    assert [st["memory"] is not None for st in saved["compressors"].values()] == [True]
    straight = step(state, model, 2)
    other = QodaHookState(compressor=factory, start_iter=0)
    other.load_state_dict(saved)
    resumed = step(other, _model_and_batch(0)[0], 2)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))
    fresh = step(QodaHookState(compressor=factory, start_iter=0), _model_and_batch(0)[0], 2)
    assert not all(torch.equal(a, b) for a, b in zip(straight, fresh, strict=True))  # the memory mattered


def test_the_hook_takes_a_compressor_factory_and_refuses_what_does_not_apply():
    factory = partial(TopK, fraction=0.1)
    state = QodaHookState(compressor=factory)
    assert state.adapt is None and state.plan is None and state.state_dict()["settings"]["compressor"] == repr(factory)
    with pytest.raises(ValueError, match="mode"):
        QodaHookState(compressor=factory, mode="two_phase")
    with pytest.raises(ValueError, match="adapt"):
        QodaHookState(compressor=factory, adapt=AdaptConfig())
    with pytest.raises(TypeError, match="compressor"):
        QodaHookState(compressor=3)


def _players():
    torch.manual_seed(0)
    return nn.ModuleDict({"generator": nn.Linear(40, 32), "critic": nn.Linear(32, 1)})


def _factory_worker(rank, world):
    """Average each rank's tensors with the registry's ``topk`` entry; record the bytes this rank
    hands to the collectives (the bytes on the wire, before the ring sends them to K-1 peers)."""
    from qoda.train.compression import build_averager
    from qoda.train.config import TrainConfig

    players = _players()
    avg = build_averager(TrainConfig(compression="topk"), players)  # compares the settings across ranks
    sent = []
    gather = dist.all_gather

    def recording(outs, tensor, *args, **kw):
        sent.append(tensor.numel() * tensor.element_size())
        return gather(outs, tensor, *args, **kw)

    dist.all_gather = recording
    shapes = [p.shape for p in players.parameters()]
    mine = [torch.randn(s, generator=torch.Generator().manual_seed(10 + rank)) for s in shapes]
    tensors = [t.clone() for t in mine]
    stats = avg.average_(tensors, step=0)
    dist.all_gather = gather
    return _flat(tensors), stats.as_dict(), sent, avg.compressor.message_size(), avg.compressor.k, _hook(world)


def _model_and_batch(rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    return model, torch.randn(8, 20, generator=torch.Generator().manual_seed(50 + rank))


def _local_grads(rank):
    model, x = _model_and_batch(rank)
    model(x).square().sum().backward()
    return [p.grad for p in model.parameters()]


def _hook(world):
    """One DDP step with the registry's ``topk`` hook (no fp32 warm-up): the averaged gradients,
    the hook's costs and summary, and its checkpoint and pickle round trips."""
    from qoda.train.config import TrainConfig
    from qoda.train.ddp import build_comm_hook

    model, x = _model_and_batch(dist.get_rank())
    ddp = nn.parallel.DistributedDataParallel(model)
    hook = build_comm_hook(TrainConfig(task="lm", compression="topk", hook_start_iter=0), model, world)
    hook.register(ddp)
    ddp(x).square().sum().backward()
    state = hook.state
    restored = pickle.loads(pickle.dumps(state))
    restored.load_state_dict(copy.deepcopy(state.state_dict()))
    same = restored.compressor.func is TopK and restored.state_dict()["settings"] == state.state_dict()["settings"]
    return _flat([p.grad for p in model.parameters()]), hook.stats.as_dict(), state.summary(), same


def test_topk_through_the_averager_factory_on_2_processes():
    res = values(run(_factory_worker, 2, timeout=120))
    shapes = [p.shape for p in _players().parameters()]
    k = res[0][4]
    expected = np.zeros(sum(s.numel() for s in shapes), dtype=np.float32)
    for r in range(2):
        expected += _exact_topk([torch.randn(s, generator=torch.Generator().manual_seed(10 + r)) for s in shapes], k)
    expected *= np.float32(0.5)
    for flat, stats, sent, size, _, _ in res:
        np.testing.assert_array_equal(flat, expected)  # bit for bit, on both ranks
        assert stats["payload_bits"] == 8 * size == 64 * k  # the contract's exact message size
        assert sent == [8, size]  # one int64 size, then the message itself
        assert stats["bytes_sent"] == stats["bytes_received"] == (2 - 1) * sum(sent)
    # the DDP hook (one bucket: the model is tiny) averages the same way, with k of the model's size
    n = sum(p.numel() for p in _model_and_batch(0)[0].parameters())
    k = TopK([p.shape for p in _model_and_batch(0)[0].parameters()], 0.01).k
    expected = sum(_exact_topk(_local_grads(r), k) for r in range(2)) * np.float32(0.5)
    for *_, (flat, stats, summary, same) in res:
        np.testing.assert_array_equal(flat, expected)
        assert stats["payload_bits"] == 64 * k and stats["bytes_sent"] == 8 + 8 * k
        assert summary["bits_per_coordinate"] == 64 * k / n and summary["parameters"] == {} and same
