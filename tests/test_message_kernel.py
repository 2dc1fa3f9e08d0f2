"""The fused message kernels (qoda.codec.fused): byte-identical to the per-segment reference."""

import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qoda.codec.format import CodecError
from qoda.codec.layerwise import LayerwiseCodec, segment_seed, unpack_message
from qoda.codec.segment import decode_into
from qoda.comm.partition import chunk_bounds, chunk_pieces
from qoda.quant.config import Norm, QuantizerConfig
from qoda.quant.kernels import message as mk
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan
from qoda.quant.quantizer import NonFiniteError
from qoda.quant.rng import seed_keys

WIDTHS = (2, 3, 4, 5, 8)


def _config(bits: int, bucket: int, norm: str, levels: str) -> QuantizerConfig:
    cfg = replace(QuantizerConfig.qsgd(bits, bucket), norm=Norm(norm))
    if levels == "fitted":  # non-uniform levels: the select / look-up paths
        s = len(cfg.levels.values)
        vals = tuple(float(np.float32((k / (s - 1)) ** 1.7)) for k in range(s))
        cfg = replace(cfg, levels=LevelSet(vals, "fitted"))
    return cfg


def _plan(shapes_types, configs) -> LayerPlan:
    entries = tuple(LayerEntry(f"l{i}", torch.Size(s), t) for i, (s, t) in enumerate(shapes_types))
    return LayerPlan(entries, configs)


def _tensors(plan: LayerPlan, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(e.shape, generator=g) * scale * (1 + i % 3) for i, e in enumerate(plan.entries)]


def _reference_decode(codec, payload, flats, accumulate, pieces, tag):
    segs = unpack_message(payload, len(codec.groups), codec.plan_id ^ tag)
    for k, (g, seg, flat) in enumerate(zip(codec.groups, segs, flats, strict=True)):
        numels = g.numels if pieces is None else pieces[k]
        decode_into(seg, g.config, flat, accumulate=accumulate, layer_numels=numels)


def _check_message(codec: LayerwiseCodec, flats, seed: int, pieces=None, tag: int = 0) -> None:
    """Fused encode == reference encode (bytes, bits), fused decode == reference decode."""
    assert codec._layout(pieces) is not None  # the fused path is taken
    ref = codec.encode_flats_reference(flats, seed, pieces, tag)
    got = codec.encode_flats(flats, seed, pieces, tag)
    assert np.array_equal(got.data, ref.data)
    assert (got.bits, got.segment_bits, got.framing_bits) == (ref.bits, ref.segment_bits, ref.framing_bits)
    out = np.full(got.data.size + 7, 0xAB, dtype=np.uint8)  # into a reused, larger buffer
    assert np.array_equal(codec.encode_flats(flats, seed, pieces, tag, out=out).data, ref.data)
    for accumulate in (True, False):
        a = [torch.full_like(f, 0.25) for f in flats]
        b = [torch.full_like(f, 0.25) for f in flats]
        codec.decode_flats_into(got.data, a, accumulate=accumulate, pieces=pieces, tag=tag)
        _reference_decode(codec, ref.data, b, accumulate, pieces, tag)
        for x, y in zip(a, b, strict=True):
            assert x.numpy().tobytes() == y.numpy().tobytes()


SHAPES = [((1001,), "a"), ((30, 17), "b"), ((64,), None), ((3,), None), ((4096,), "a"), ((5, 7), "b"), ((2048,), "c")]


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("levels", ["uniform", "fitted"])
def test_fused_message_equals_reference(bits, norm, levels):
    configs = {
        "a": _config(bits, 1024, norm, levels),
        "b": _config(WIDTHS[(WIDTHS.index(bits) + 1) % len(WIDTHS)], 100, norm, "uniform"),
        "c": _config(3, 7, norm, levels),
    }
    plan = _plan(SHAPES, configs)
    codec = LayerwiseCodec(plan)
    flats = codec.gather(_tensors(plan, bits))
    _check_message(codec, flats, seed=bits * 1000 + 17)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_fused_chunk_messages_equal_reference(k):
    """Two-phase chunk messages: pieces of layers, empty pieces, an empty raw segment."""
    configs = {"a": _config(4, 64, "l2", "uniform"), "b": _config(3, 33, "linf", "fitted")}
    plan = _plan([((300,), "a"), ((70,), "b"), ((5,), None), ((129,), "a"), ((1,), "b")], configs)
    codec = LayerwiseCodec(plan)
    flats = codec.gather(_tensors(plan, k))
    bounds = [chunk_bounds(g.numels, None if g.config is None else g.config.bucket_size, k) for g in codec.groups]
    for c in range(k):
        pieces = [chunk_pieces(g.numels, b[c], b[c + 1]) for g, b in zip(codec.groups, bounds, strict=True)]
        chunk = [f[b[c] : b[c + 1]] for f, b in zip(flats, bounds, strict=True)]
        _check_message(codec, chunk, seed=c, pieces=pieces, tag=c + 1)


def test_fused_message_without_raw_segment_and_special_values():
    configs = {"a": _config(4, 16, "l2", "uniform"), "b": _config(5, 8, "linf", "fitted")}
    plan = _plan([((40,), "a"), ((3,), "b"), ((17,), "b")], configs)
    codec = LayerwiseCodec(plan)
    for scale in (0.0, 1e-39, 1e-44, 1e37):  # all zero, subnormal, tiny, near overflow (L-inf)
        flats = codec.gather([t * scale if scale else t * 0 for t in _tensors(plan, 1)])
        if scale == 1e37:
            flats[0].zero_()  # L2 would overflow: keep the L-inf group only
        _check_message(codec, flats, seed=5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fused_encode_fails_like_the_reference(bad):
    plan = _plan(SHAPES, {"a": _config(4, 1024, "l2", "uniform"), "b": _config(2, 100, "l2", "fitted"),
                          "c": _config(3, 7, "l2", "uniform")})  # fmt: skip
    codec = LayerwiseCodec(plan)
    flats = codec.gather(_tensors(plan, 0))
    flats[1][123] = bad
    with pytest.raises(NonFiniteError) as ref:
        codec.encode_flats_reference(flats, 1)
    with pytest.raises(NonFiniteError) as got:
        codec.encode_flats(flats, 1)
    assert str(got.value) == str(ref.value)


def _codec_and_message():
    plan = _plan(SHAPES, {"a": _config(4, 1024, "l2", "uniform"), "b": _config(3, 100, "linf", "fitted"),
                          "c": _config(5, 7, "l2", "uniform")})  # fmt: skip
    codec = LayerwiseCodec(plan)
    flats = codec.gather(_tensors(plan, 3))
    return codec, flats, codec.encode_flats(flats, 9).data.copy()


def _error(codec, payload, flats):
    try:
        codec.decode_flats_into(payload, [torch.zeros_like(f) for f in flats])
    except CodecError as e:
        return str(e)
    return None


def test_fused_decode_errors_match_the_reference():
    """Corrupted messages raise the same CodecError as the per-segment path (which the fused
    path defers to for every check made before decoding)."""
    codec, flats, msg = _codec_and_message()
    layout = codec._layout(None)
    rng = np.random.default_rng(0)
    for _ in range(60):  # random bit flips: always detected, same message as the reference
        bad = msg.copy()
        i = int(rng.integers(layout.head_size, bad.size))
        bad[i] ^= np.uint8(1 << int(rng.integers(8)))
        got = _error(codec, bad, flats)
        try:
            _reference_decode(codec, bad, [torch.zeros_like(f) for f in flats], True, None, 0)
            ref = None
        except CodecError as e:
            ref = str(e)
        assert got is not None and got == ref


def _reseal(buf: np.ndarray, layout, s: int) -> None:
    at, _, hi, _ = layout.crcs[s]
    buf[at : at + 4] = 0
    seg0 = layout.meta[s][mk.M_HDR]
    crc = zlib.crc32(buf[seg0:hi])
    buf[at : at + 4] = np.frombuffer(np.uint32(crc).tobytes(), dtype=np.uint8)


def test_fused_decode_invalid_code_padding_and_norm_with_valid_crc():
    codec, flats, msg = _codec_and_message()
    layout = codec._layout(None)
    row = layout.meta[0]  # 4-bit uniform: code 1 (negative zero) is invalid
    bad = msg.copy()
    bad[row[mk.M_CODES] + 3] = (bad[row[mk.M_CODES] + 3] & 0xF0) | 1
    _reseal(bad, layout, 0)
    assert _error(codec, bad, flats) == "payload corrupted: invalid level code at coordinate 6"
    row = layout.meta[1]  # 3-bit segment with padding bits in its last byte
    n = int(row[mk.M_NUMEL])
    assert (3 * n) % 8, "the test needs padding"
    bad = msg.copy()
    bad[row[mk.M_END] - 1] |= 0x80
    _reseal(bad, layout, 1)
    assert _error(codec, bad, flats) == "payload corrupted: non-zero padding bits"
    bad = msg.copy()  # a negative norm
    bad[row[mk.M_NORMS] + 3] |= 0x80
    _reseal(bad, layout, 1)
    assert _error(codec, bad, flats) == "payload corrupted: a bucket norm is negative or not finite"


def test_fused_decode_partial_writes_as_the_reference():
    """A CRC failure in the last segment: the fused path writes nothing and defers to the
    per-segment path, which leaves exactly today's partial writes (the segments before it)."""
    codec, flats, msg = _codec_and_message()
    bad = msg.copy()
    bad[-5] ^= 1  # the raw segment (last)
    acc = [torch.zeros_like(f) for f in flats]
    ref = [torch.zeros_like(f) for f in flats]
    with pytest.raises(CodecError, match="CRC"):
        codec.decode_flats_into(bad, acc)
    with pytest.raises(CodecError, match="CRC"):
        _reference_decode(codec, bad, ref, True, None, 0)
    assert all(torch.equal(a, b) for a, b in zip(acc, ref, strict=True))


def test_segment_keys_match_python():
    rng = np.random.default_rng(1)
    for seed in [0, 1, (1 << 64) - 1, *(int(v) for v in rng.integers(0, 1 << 63, 20))]:
        for k in range(6):
            want = seed_keys(segment_seed(seed, k))
            assert tuple(int(v) for v in mk.segment_keys(np.uint64(seed), k)) == want


def test_non_contiguous_or_foreign_buffers_take_the_reference_path():
    codec, flats, msg = _codec_and_message()
    strided = [torch.zeros(2 * f.numel())[::2] for f in flats]
    codec.decode_flats_into(msg, strided, accumulate=False)
    dense = [torch.zeros_like(f) for f in flats]
    codec.decode_flats_into(msg, dense, accumulate=False)
    assert all(torch.equal(a, b) for a, b in zip(strided, dense, strict=True))
    doubles = [f.double() for f in flats]  # the segment headers record the source dtype: declined
    assert np.array_equal(codec.encode_flats(doubles, 9).data, codec.encode_flats_reference(doubles, 9).data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    raw=st.lists(st.integers(1, 20), min_size=0, max_size=2),
    widths=st.lists(st.sampled_from(WIDTHS), min_size=2, max_size=2),
    bucket=st.sampled_from([1, 3, 8, 64, 1000]),
    norm=st.sampled_from(["l2", "linf"]),
    levels=st.sampled_from(["uniform", "fitted"]),
    seed=st.integers(0, (1 << 64) - 1),
)
def test_fused_message_property(sizes, raw, widths, bucket, norm, levels, seed):
    types = ["a" if i % 2 == 0 else "b" for i in range(len(sizes))]
    configs = {
        "a": _config(widths[0], bucket, norm, levels),
        "b": _config(widths[1], max(1, bucket // 2), norm, "uniform"),
    }
    configs = {t: c for t, c in configs.items() if t in types}
    shapes = [((n,), t) for n, t in zip(sizes, types, strict=True)] + [((n,), None) for n in raw]
    plan = _plan(shapes, configs)
    codec = LayerwiseCodec(plan)
    _check_message(codec, codec.gather(_tensors(plan, seed % 1000)), seed)


@pytest.mark.parametrize("width", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("accumulate", [True, False])
def test_tree_decoder_equals_table_decoder(width, full, accumulate):
    """The branch-free tree decoder (widths <= TREE_MAX_BITS) == the table decoder, bit for bit:
    values (norms 0, -0, tiny, large), aligned and unaligned buckets, and the first invalid code."""
    from qoda.codec.segment import _pack_codes
    from qoda.quant.kernels import cpu

    rng = np.random.default_rng(width + 10 * full)
    nl = (1 << (width - 1)) if full else max(2, (1 << (width - 1)) - 3)
    levels = np.sort(rng.random(nl).astype(np.float32))
    levels[0], levels[-1] = 0.0, 1.0
    slv, bad = cpu.signed_level_table(levels, width)
    assert (cpu.tree_levels(slv, bad, width)[1] > 0) == (width <= cpu.TREE_MAX_BITS)
    starts = np.array([0, 7, 1031, 2048, 2050, 3000], dtype=np.int64)
    norms = np.array([0.0, -0.0, 1e-40, 3.5, 7e30], dtype=np.float32)
    codes = rng.integers(0, 2 * nl, starts[-1]).astype(np.int32)
    codes[codes == 1] = 0
    dummy = np.empty(0, dtype=np.int32)

    def both(cs):
        data = np.zeros((cs.size * width + 7) // 8, dtype=np.uint8)
        _pack_codes(cs, width, data)
        a, b = np.full(cs.size, 0.25, np.float32), np.full(cs.size, 0.25, np.float32)
        got = cpu.unpack_dequantize(data, starts, norms, slv, bad, width, a, accumulate, dummy, False)
        ref = cpu.unpack_dequantize(data, starts, norms, slv, bad, width, b, accumulate, np.empty_like(cs), True)
        return got, ref, a, b

    got, ref, a, b = both(codes)
    assert got == ref == (cpu.OK, -1)
    assert a.tobytes() == b.tobytes()
    for at in (0, 5, 1500, 2999):
        for wrong in [1, *([2 * nl] if 2 * nl < (1 << width) else [])]:
            cs = codes.copy()
            cs[at] = wrong
            got, ref, _, _ = both(cs)
            assert got == ref == (cpu.ERR_BAD_CODE, at)


@pytest.mark.parametrize("width", [2, 3, 4, 5, 6, 7])
def test_unpack8_inverts_pack8(width):
    """The decoder's byte spreading (``_unpack8``) is the inverse of the packer's ``_pack8``,
    and ignores the bits above ``8 * width`` (the next group's codes in an 8-byte load)."""
    import numba as nb

    from qoda.quant.kernels import cpu

    @nb.njit
    def roundtrip(vs, w):
        out = np.empty((vs.shape[0], 2), dtype=np.uint64)
        for i in range(vs.shape[0]):
            p = cpu._pack8(vs[i], w)
            out[i, 0] = p
            out[i, 1] = cpu._unpack8(p | (np.uint64(0xFFFFFFFFFFFFFFFF) << np.uint64(8 * w)), w)
        return out

    rng = np.random.default_rng(width)
    codes = rng.integers(0, 1 << width, (500, 8), dtype=np.uint8)
    vs = codes.copy().view(np.uint64).ravel()
    out = roundtrip(vs, width)
    assert np.all(out[:, 0] < (np.uint64(1) << np.uint64(8 * width)))
    assert np.array_equal(out[:, 1], vs)
