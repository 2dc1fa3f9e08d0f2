"""The codec on the tensors' device (qoda.codec.device), run here on CPU tensors: bytes equal to the
numba kernels', cross decoding, the same errors, no host copy of anything gradient-sized, and the
two paths never calling each other's compilers.

Most cases run the device path's ops in eager torch (``QODA_DEVICE_CODEC_EAGER=1``: the very ops
torch.compile compiles, without paying a compilation per width and level family); a few run it
compiled, one per layout, so the generated code itself is checked against numba.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qoda.codec import device as dev
from qoda.codec import fused
from qoda.codec.format import CodecError
from qoda.codec.layerwise import LayerwiseCodec
from qoda.comm.partition import chunk_bounds, chunk_pieces
from qoda.quant.config import Coding, Norm, QuantizerConfig
from qoda.quant.kernels import cpu
from qoda.quant.kernels import message as mk
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan
from qoda.quant.quantizer import NonFiniteError


def _config(bits: int, bucket: int, norm: str, levels: str) -> QuantizerConfig:
    cfg = replace(QuantizerConfig.qsgd(bits, bucket), norm=Norm(norm))
    if levels == "fitted":  # non-uniform levels: compare-with-every-level or bucketize
        s = len(cfg.levels.values)
        vals = tuple(float(np.float32((k / (s - 1)) ** 1.7)) for k in range(s))
        cfg = replace(cfg, levels=LevelSet(vals, "fitted"))
    return cfg


def _codec(numels, config: QuantizerConfig, raw: int = 3) -> LayerwiseCodec:
    entries = [LayerEntry(f"w{i}", torch.Size([n]), "t") for i, n in enumerate(numels)]
    if raw:
        entries.append(LayerEntry("b", torch.Size([raw]), None))
    return LayerwiseCodec(LayerPlan(tuple(entries), {"t": config}))


def _flats(codec: LayerwiseCodec, seed: int, kind: str = "normal") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = []
    for e in codec.plan.entries:
        x = torch.randn(e.numel, generator=g)
        if kind == "zeros":
            x = torch.zeros(e.numel)
        elif kind == "subnormal":  # bucket norms below 2^-126: the 2^64 pre-scaling
            x = x * 1e-41
        elif kind == "mixed":  # zero, subnormal and huge buckets, negative zeros
            x = x * torch.tensor([0.0, 1e-42, 1e30, -0.0, 1.0])[torch.arange(e.numel) % 5]
        xs.append(x)
    return codec.gather(xs)


def _assert_same_bytes_and_cross_decode(codec: LayerwiseCodec, flats, seed: int, pieces=None, tag: int = 0):
    dc = dev.DeviceCodec(codec, "cpu")
    assert dc.layout(pieces) is not None  # the device path is taken, not its host fallback
    ref = codec.encode_flats(flats, seed, pieces, tag)
    got = dc.encode_flats(flats, seed, pieces, tag)
    assert isinstance(got.data, torch.Tensor)
    assert np.array_equal(got.data.numpy(), ref.data)
    assert (got.bits, got.segment_bits, got.framing_bits) == (ref.bits, ref.segment_bits, ref.framing_bits)
    g = torch.Generator().manual_seed((seed + 1) % 2**63)
    for accumulate in (True, False):
        base = [torch.randn(f.numel(), generator=g) for f in flats]
        by_numba, by_device = [b.clone() for b in base], [b.clone() for b in base]
        codec.decode_flats_into(got.data.numpy(), by_numba, accumulate, pieces, tag)  # device-encoded, numba-decoded
        dc.decode_flats_into(torch.from_numpy(ref.data.copy()), by_device, accumulate, pieces, tag)  # and vice versa
        for a, b in zip(by_numba, by_device, strict=True):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit (NaN-free, -0.0 kept)


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setenv("QODA_DEVICE_CODEC_EAGER", "1")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_every_width_and_norm_same_bytes(eager, bits, norm):
    levels = "fitted" if bits % 2 else "uniform"
    # rows with a short last bucket; general; a single bucket
    for numels, bucket in (((256, 50), 64), ((100, 37, 1), 24), ((5,), 7)):
        codec = _codec(numels, _config(bits, bucket, norm, levels))
        _assert_same_bytes_and_cross_decode(codec, _flats(codec, bits), seed=bits * 31)


@pytest.mark.parametrize("kind", ["zeros", "subnormal", "mixed"])
def test_special_values_same_bytes(eager, kind):
    for norm in ("l2", "linf"):
        codec = _codec((64, 40, 13), _config(4, 16, norm, "fitted"))
        _assert_same_bytes_and_cross_decode(codec, _flats(codec, 3, kind), seed=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numels=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    bits=st.integers(2, 8),
    bucket=st.sampled_from([8, 16, 24, 50, 64]),
    norm=st.sampled_from(["l2", "linf"]),
    levels=st.sampled_from(["uniform", "fitted"]),
    seed=st.integers(0, 2**64 - 1),
    raw=st.integers(0, 4),
)
def test_random_plans_same_bytes(numels, bits, bucket, norm, levels, seed, raw):
    import os

    os.environ["QODA_DEVICE_CODEC_EAGER"] = "1"  # hypothesis runs without function-scoped fixtures
    try:
        codec = _codec(numels, _config(bits, bucket, norm, levels), raw)
        _assert_same_bytes_and_cross_decode(codec, _flats(codec, seed % 1000), seed)
    finally:
        del os.environ["QODA_DEVICE_CODEC_EAGER"]


def test_two_phase_chunks_same_bytes(eager):
    codec = _codec((300, 77), _config(4, 32, "l2", "uniform"))
    flats = _flats(codec, 1)
    bounds = [chunk_bounds(g.numels, None if g.config is None else g.config.bucket_size, 3) for g in codec.groups]
    for c in range(3):
        pieces = [chunk_pieces(g.numels, b[c], b[c + 1]) for g, b in zip(codec.groups, bounds, strict=True)]
        chunk = [f[b[c] : b[c + 1]] for f, b in zip(flats, bounds, strict=True)]
        _assert_same_bytes_and_cross_decode(codec, chunk, seed=c, pieces=pieces, tag=c + 1)


@pytest.mark.parametrize(
    "numels, bits, bucket, norm, levels",
    [((1024, 500), 4, 256, "l2", "uniform"), ((100, 37), 3, 24, "linf", "fitted")],
    ids=["rows", "general"],
)
def test_compiled_same_bytes(numels, bits, bucket, norm, levels):
    """The Inductor-generated code (not only the ops it compiles) against numba, per layout."""
    if dev.compiler() != "inductor":
        pytest.skip("no C++ compiler: the device path runs eager here")
    codec = _codec(numels, _config(bits, bucket, norm, levels))
    for seed in (0, 2**63 + 5):
        _assert_same_bytes_and_cross_decode(codec, _flats(codec, seed % 7, "mixed"), seed)


def test_nan_and_overflow_raise_the_cpu_codecs_errors(eager):
    codec = _codec((64, 40), _config(4, 16, "l2", "uniform"))
    dc = dev.DeviceCodec(codec, "cpu")
    for bad, err in ((float("nan"), NonFiniteError), (float("inf"), NonFiniteError), (3e38, ValueError)):
        flats = _flats(codec, 0)
        flats[0][20:] = bad  # 3e38: finite, but the bucket's L2 norm overflows float32
        with pytest.raises(err) as host:
            codec.encode_flats(flats, 1)
        with pytest.raises(err) as device:
            dc.encode_flats(flats, 1)
        assert str(device.value) == str(host.value)


def test_damaged_payloads_raise_the_cpu_codecs_errors_and_write_nothing(eager):
    codec = _codec((64, 40), _config(3, 16, "l2", "fitted"))
    dc = dev.DeviceCodec(codec, "cpu")
    msg = codec.encode_flats(_flats(codec, 0), 1).data
    rng = np.random.default_rng(0)
    for pos in [*rng.integers(0, msg.size, 20), msg.size - 1]:  # headers, norms, codes, padding
        bad = msg.copy()
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CodecError) as host:
            codec.decode_flats_into(bad, [torch.zeros(g.numel) for g in codec.groups])
        out = [torch.ones(g.numel) for g in codec.groups]
        with pytest.raises(CodecError) as device:
            dc.decode_flats_into(torch.from_numpy(bad), out)
        assert str(device.value) == str(host.value)
        assert all(bool((o == 1).all()) for o in out)
    # a valid CRC over invalid codes: the device checks (not the CRC) must catch them
    forged = msg.copy()
    seg = dc.layout(None).segments[0]
    forged[seg.codes_at] = 0b001  # code 1 at coordinate 0: a negative zero, never emitted
    for at, lo, hi, static in codec._layout(None).crcs:
        forged[at : at + 4] = np.frombuffer(fused._U32.pack(fused.crc32(forged[lo:hi], static)), np.uint8)
    with pytest.raises(CodecError, match="invalid level code at coordinate 0"):
        dc.decode_flats_into(torch.from_numpy(forged), [torch.zeros(g.numel) for g in codec.groups])


def test_no_host_copy_of_gradient_size(eager, monkeypatch):
    """Run the device path with every device-to-host exit patched to fail; only the module's two
    declared crossings (the packed message for its CRCs, one status scalar) may move data."""
    codec = _codec((4096, 1000), _config(4, 128, "l2", "uniform"), raw=16)
    dc = dev.DeviceCodec(codec, "cpu")
    flats = _flats(codec, 0)
    gradient_bytes = 4 * sum(f.numel() for f in flats)
    dc.encode_flats(flats, 0)  # layouts and header templates built before the patch
    crossed: list[int] = []
    numpy = torch.Tensor.numpy

    def to_host(t):
        crossed.append(t.numel() * t.element_size())
        return numpy(t.detach())

    def flag(t):
        crossed.append(t.numel() * t.element_size())
        return bool(torch.Tensor.__bool__(t))

    def refuse(*a, **k):
        raise AssertionError("a device-to-host copy outside the declared crossings")

    monkeypatch.setattr(dev, "to_host", to_host)
    monkeypatch.setattr(dev, "_flag", flag)
    for name in ("numpy", "cpu", "tolist", "item"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    msg = dc.encode_flats(flats, 1)
    size = msg.data.numel()
    assert max(crossed) == size and sum(crossed) <= size + 8  # the message once, for its CRCs; one flag
    crossed.clear()
    out = [torch.zeros(f.numel()) for f in flats]
    dc.decode_flats_into(msg.data, out)
    assert max(crossed) == size and sum(crossed) <= size + 8
    assert size < gradient_bytes / 6  # 4 bits a coordinate, plus norms and headers
    monkeypatch.undo()
    ref = [torch.zeros(f.numel()) for f in flats]
    codec.decode_flats_into(msg.data.numpy(), ref)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_the_paths_never_call_each_others_compilers(monkeypatch):
    codec = _codec((256, 40), _config(4, 64, "l2", "uniform"))
    flats = _flats(codec, 0)

    def refuse(*a, **k):
        raise AssertionError("called the other path's compiler or kernels")

    # the CPU (numba) path: no torch.compile, no device-path body
    with monkeypatch.context() as m:
        m.setattr(torch, "compile", refuse)
        m.setattr(dev, "compiled", refuse)
        msg = codec.encode_flats(flats, 3)
        codec.decode_flats_into(msg.data, [torch.zeros(f.numel()) for f in flats])
    # the device path: no numba kernel (fused message kernels, per-segment kernels)
    with monkeypatch.context() as m:
        m.setenv("QODA_DEVICE_CODEC_EAGER", "1")
        for mod, names in ((mk, ("encode_message", "decode_message")),
                           (cpu, ("quantize_pack", "unpack_dequantize", "quantize_to_codes"))):  # fmt: skip
            for name in names:
                m.setattr(mod, name, refuse)
        dc = dev.DeviceCodec(codec, "cpu")
        got = dc.encode_flats(flats, 3)
        dc.decode_flats_into(got.data, [torch.zeros(f.numel()) for f in flats])
    assert np.array_equal(got.data.numpy(), msg.data)


def test_entropy_groups_take_the_host_path(eager):
    cfg = replace(_config(4, 16, "l2", "uniform"), coding=Coding.ENTROPY)
    codec = _codec((64, 40), cfg)
    dc = dev.DeviceCodec(codec, "cpu")
    assert dc.layout(None) is None
    flats = _flats(codec, 0)
    got = dc.encode_flats(flats, 2)
    assert np.array_equal(got.data.numpy(), codec.encode_flats(flats, 2).data)
    out, ref = [torch.zeros(f.numel()) for f in flats], [torch.zeros(f.numel()) for f in flats]
    dc.decode_flats_into(got.data, out)
    codec.decode_flats_into(got.data.numpy(), ref)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def _protocol_worker(rank, world):
    """Both protocols with the device codec (forced onto this CPU group) against the CPU codec:
    identical averages, bit for bit, in allgather and two-phase (and entropy coding, which the
    device codec hands to the CPU codec)."""
    from qoda.comm.aggregate import Aggregator

    g = torch.Generator().manual_seed(rank)
    out = {}
    for mode, coding in (("allgather", "fixed"), ("two_phase", "fixed"), ("allgather", "entropy")):
        codec = _codec((300, 64), replace(_config(4, 32, "l2", "uniform"), coding=Coding(coding)), raw=5)
        results = []
        for forced in (False, True):
            agg = Aggregator(codec.plan, mode=mode, seed=3)
            assert agg.wire_device.type == "cpu" and agg.device_codec is None  # gloo: the CPU codec, decided once
            if forced:
                agg.context.device_codec = dev.DeviceCodec(agg.codec, agg.wire_device)
            g.manual_seed(rank)
            ts = [torch.randn(e.shape, generator=g) for e in codec.plan.entries]
            agg.average_(ts, step=1)
            results.append(torch.cat([t.reshape(-1) for t in ts]))
        out[f"{mode}/{coding}"] = bool(torch.equal(results[0], results[1]))
    return out


def test_protocols_with_the_device_codec_equal_the_cpu_codec(monkeypatch):
    from distributed import run, values

    monkeypatch.setenv("QODA_DEVICE_CODEC_EAGER", "1")  # the spawned ranks inherit it
    for res in values(run(_protocol_worker, 2, timeout=120)):
        assert res == {"allgather/fixed": True, "two_phase/fixed": True, "allgather/entropy": True}
