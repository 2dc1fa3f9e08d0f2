"""The wire codec: bit-exact round trips, exact bit counts, length bounds, corruption."""

import struct

import numpy as np
import pytest
import torch

from qoda.codec import layerwise as lw
from qoda.codec import rans
from qoda.codec.format import HEADER_SIZE, CodecError, payload_crc
from qoda.codec.layerwise import LayerwiseCodec, segment_seed
from qoda.codec.length import entropy_code_length_bound, fixed_code_length
from qoda.codec.segment import decode, decode_into, decode_raw, encode, encode_raw, encode_tensor
from qoda.quant.config import QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerPolicy
from qoda.quant.quantizer import quantize
from qoda.report.digits import DigitsCNN

ROUND_TRIP = [
    QuantizerConfig.qsgd(b, bs, coding=c)
    for b, bs in ((2, 64), (3, 100), (4, 1024), (5, 33), (6, 512), (7, 1), (8, 256), (12, 1000))
    for c in ("fixed", "entropy")
] + [QuantizerConfig.nuqsgd(4, 128, coding="entropy"), QuantizerConfig.qsgd_inf(16, 64)]


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1001, generator=g),
        torch.randn(30, 17, generator=g) * 5,
        torch.zeros(64),
        torch.randn(3, generator=g),
    ]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: f"{c.bits}b-{c.coding.value}-B{c.bucket_size}-{c.norm.value}")
def test_round_trip_bit_exact(cfg):
    xs = _layers()
    q = quantize(xs, cfg, 11)
    enc = encode(q)
    assert np.array_equal(enc.data, encode_tensor(xs, cfg, 11).data)  # fused path: same bytes
    d = decode(enc.tobytes(), cfg, [t.shape for t in xs])
    assert torch.equal(d.codes, q.codes) and torch.equal(d.norms, q.norms)
    assert d.norms.numpy().tobytes() == q.norms.numpy().tobytes()  # bit for bit, incl. -0/+0
    assert torch.equal(d.dequantize(), q.dequantize())
    out = torch.full((q.numel,), 0.25)
    decode_into(enc.data, cfg, out, accumulate=True)
    assert torch.equal(out, q.dequantize() + 0.25)
    decode_into(enc.data, cfg, out, accumulate=False)
    assert torch.equal(out, q.dequantize())


@pytest.mark.parametrize("cfg", ROUND_TRIP[:8], ids=str)
def test_reported_bits_are_exact(cfg):
    xs = _layers(1)
    enc = encode_tensor(xs, cfg, 3)
    numels = [t.numel() for t in xs]
    n = sum(numels)
    if cfg.coding.value == "fixed":
        padding = (-n * cfg.bits) % 8
        assert enc.bits == 8 * len(enc) - padding
        assert enc.bits == fixed_code_length(numels, cfg)
    else:
        assert enc.bits == 8 * len(enc)
        q = quantize(xs, cfg, 3)
        counts = np.bincount(q.codes.numpy(), minlength=2 * cfg.levels.num_levels)
        table = 16 * 2 * cfg.levels.num_levels
        n_buckets = len(q.norms)
        stream_bits = enc.bits - 8 * HEADER_SIZE - 64 * len(numels) - 32 * n_buckets - table
        assert stream_bits <= rans.code_length_bound(counts)
        nz = counts[counts > 0] / n
        assert stream_bits >= n * float(-(nz * np.log2(nz)).sum()) - 1  # never below the entropy


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("maker", [QuantizerConfig.qsgd, QuantizerConfig.qsgd_inf, QuantizerConfig.nuqsgd])
def test_entropy_never_larger_than_fixed_plus_its_header(real_gradients, bits, maker):
    for g in real_gradients:
        fixed = encode_tensor(g, maker(bits, 1024), 0)
        ent = encode_tensor(g, maker(bits, 1024, coding="entropy"), 0)
        table_and_state = 2 * 2 * 2 ** (bits - 1) + 8 + 4
        assert len(ent) <= len(fixed) + table_and_state


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_entropy_length_within_expected_bound(real_gradients, bits):
    cfg = QuantizerConfig.nuqsgd(bits, 512, coding="entropy")
    g = real_gradients[1]
    measured = [encode_tensor(g, cfg, s).bits for s in range(8)]
    assert np.mean(measured) <= entropy_code_length_bound(g, cfg)


def test_raw_segment_round_trip():
    x = [torch.randn(5), torch.randn(2, 2).half()]
    enc = encode_raw(x)
    vals = decode_raw(enc.data)
    assert torch.equal(vals, torch.cat([x[0], x[1].float().reshape(-1)]))
    out = torch.ones(9)
    decode_into(enc.data, None, out)
    assert torch.equal(out, vals + 1)


def test_empty_segment_round_trip():
    for coding in ("fixed", "entropy"):
        cfg = QuantizerConfig.qsgd(4, coding=coding)
        enc = encode_tensor(torch.zeros(0), cfg, 0)
        assert decode(enc.data, cfg).numel == 0


# ----------------------------------------------------------------------------- bad payloads
def _payload(coding="fixed", n=3000):
    cfg = QuantizerConfig.qsgd(4, 256, coding=coding)
    return cfg, encode_tensor(torch.randn(n), cfg, 0).data


@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_every_truncation_raises(coding):
    cfg, data = _payload(coding, 200)
    for k in range(len(data)):
        with pytest.raises(CodecError, match="truncated"):
            decode(data[:k], cfg)
    with pytest.raises(CodecError, match="trailing"):
        decode(np.concatenate([data, np.zeros(1, np.uint8)]), cfg)


@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_random_bit_flips_always_detected(coding):
    cfg, data = _payload(coding)
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad = data.copy()
        for pos in rng.integers(0, 8 * len(bad), rng.integers(1, 4)):
            bad[pos // 8] ^= np.uint8(1 << (pos % 8))
        with pytest.raises(CodecError):
            decode_into(bad, cfg, torch.zeros(3000))


def _forge_crc(buf):
    buf[HEADER_SIZE - 4 : HEADER_SIZE] = np.frombuffer(struct.pack("<I", payload_crc(buf)), np.uint8)
    return buf


@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_forged_payloads_never_crash(coding):
    """Corruptions with a recomputed CRC: structurally invalid ones raise, none crash."""
    cfg, data = _payload(coding)
    rng = np.random.default_rng(1)
    raised = 0
    for _ in range(300):
        bad = data.copy()
        start = rng.integers(HEADER_SIZE, len(bad))
        span = bad[start : start + int(rng.integers(1, 16))]
        span[:] = rng.integers(0, 256, span.size)
        try:
            decode(_forge_crc(bad), cfg)
        except CodecError:
            raised += 1
    assert raised > 0


def test_forged_invalid_code_and_padding_detected():
    cfg = QuantizerConfig(LevelSet.uniform(4), 64)  # 6 levels in 3 index bits: codes 12..15 invalid
    data = encode_tensor(torch.randn(64 * 3 + 1), cfg, 0).data.copy()
    body_codes = data[-(((64 * 3 + 1) * 4 + 7) // 8) :]
    body_codes[0] = 0xFF
    with pytest.raises(CodecError, match="invalid level code"):
        decode(_forge_crc(data), cfg)
    data = encode_tensor(torch.randn(64 * 3 + 1), cfg, 0).data.copy()
    data[-1] |= 0xF0  # padding nibble
    with pytest.raises(CodecError, match="padding"):
        decode(_forge_crc(data), cfg)


def test_wrong_magic_and_version():
    cfg, data = _payload()
    bad = data.copy()
    bad[:4] = np.frombuffer(b"XXXX", np.uint8)
    with pytest.raises(CodecError, match="magic"):
        decode(bad, cfg)
    bad = data.copy()
    bad[4] = 9
    with pytest.raises(CodecError, match="version 9"):
        decode(bad, cfg)
    with pytest.raises(CodecError, match="payload"):
        decode("not bytes", cfg)


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (QuantizerConfig.qsgd(8, 256), "code_bits"),
        (QuantizerConfig.qsgd(4, 512), "bucket_size"),
        (QuantizerConfig.qsgd_inf(4, 256), "norm"),
        (QuantizerConfig.nuqsgd(4, 256), "level_set_id"),
        (QuantizerConfig.qsgd(4, 256, coding="entropy"), "coding"),
    ],
)
def test_mismatched_receiver_settings_named(other, field):
    _, data = _payload()
    with pytest.raises(CodecError, match=field):
        decode(data, other)


def test_layer_size_mismatch():
    cfg, data = _payload()
    with pytest.raises(CodecError, match="layer sizes"):
        decode(data, cfg, [torch.Size([2999])])
    with pytest.raises(ValueError, match="out"):
        decode_into(data, cfg, torch.zeros(10))


# ----------------------------------------------------------------------------- messages
def test_layerwise_message_round_trip_and_mismatch():
    model = DigitsCNN()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    policy = LayerPolicy.by_module_class(
        QuantizerConfig.nuqsgd(4), {"conv": QuantizerConfig.qsgd_inf(4, coding="entropy")}
    )
    plan = policy.plan(model)
    codec = LayerwiseCodec(plan)
    grads = [p.grad for p in model.parameters()]
    msg = codec.encode(grads, seed=5)
    out = codec.decode(msg.data)
    for e, g, o in zip(plan.entries, grads, out, strict=True):
        assert o.shape == g.shape
        if e.type_name is None:
            assert torch.equal(o, g)  # uncompressed
    for k, t in enumerate(codec.types):
        idx = plan.indices(t)
        q = quantize([grads[i] for i in idx], plan.configs[t], segment_seed(5, k))
        assert torch.equal(torch.cat([out[i].reshape(-1) for i in idx]), q.dequantize())
    assert 0 <= 8 * len(msg) - msg.bits < 8 * len(codec.types)  # only fixed-width padding
    other = LayerwiseCodec(LayerPolicy.global_(QuantizerConfig.nuqsgd(4)).plan(model))
    with pytest.raises(CodecError):
        other.decode(msg.data)
    with pytest.raises(CodecError, match="truncated"):
        codec.decode(msg.data[:-1])
    bad = msg.data.copy()
    bad[-5] ^= 1
    outs = [torch.zeros(e.shape) for e in plan.entries]
    with pytest.raises(CodecError):
        codec.decode_into(bad, outs)
    assert all((o == 0).all() for o in outs)  # nothing written on failure


def test_decode_into_strided_output_takes_the_copy_path():
    cfg = QuantizerConfig.qsgd(4, 128)
    x = torch.randn(500)
    enc = encode_tensor(x, cfg, 0)
    base = torch.ones(1000)
    out = base[::2]  # non-contiguous view: decoded in a temporary, then added
    decode_into(enc.data, cfg, out, accumulate=True)
    assert torch.equal(out, quantize(x, cfg, 0).dequantize() + 1)
    assert (base[1::2] == 1).all()


@pytest.mark.parametrize("cfg", [c for c in ROUND_TRIP if c.coding.value == "fixed"], ids=str)
def test_encode_into_reused_buffer_gives_the_same_bytes(cfg):
    xs = _layers(2)
    fresh = encode_tensor(xs, cfg, 7)
    buf = np.full(len(fresh) + 100, 0xAB, dtype=np.uint8)  # larger, dirty: reuse must not leak old bytes
    for seed in (3, 7):  # the second call overwrites the first completely
        reused = encode_tensor(xs, cfg, seed, out=buf)
    assert np.shares_memory(reused.data, buf)
    assert np.array_equal(reused.data, fresh.data) and reused.bits == fresh.bits
    assert (buf[len(fresh) :] == 0xAB).all()  # nothing written past the segment
    with pytest.raises(ValueError, match="out: need"):
        encode_tensor(xs, cfg, 7, out=np.empty(len(fresh) - 1, dtype=np.uint8))


def test_layerwise_message_into_reused_buffer():
    model = DigitsCNN()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    codec = LayerwiseCodec(LayerPolicy.by_module_class(QuantizerConfig.qsgd(4, 128)).plan(model))
    flats = codec.gather([p.grad for p in model.parameters()])
    fresh = codec.encode_flats(flats, seed=9)
    assert codec.message_size() == len(fresh)
    buf = np.full(len(fresh) + 7, 0x5A, dtype=np.uint8)
    codec.encode_flats(flats, seed=1, out=buf)
    again = codec.encode_flats(flats, seed=9, out=buf)
    assert np.array_equal(again.data, fresh.data) and again.bits == fresh.bits
    assert again.segment_bits == fresh.segment_bits and again.framing_bits == fresh.framing_bits
    entropy = LayerwiseCodec(LayerPolicy.global_(QuantizerConfig.qsgd(4, 128, coding="entropy")).plan(model))
    assert entropy.message_size() is None  # data-dependent size: encoded separately, then framed


# --------------------------------------------------- valid-but-unusual inputs (issue: reliability 2)
CONSTANT_CASES = {
    "all_zero": torch.zeros(2048),
    "single_element": torch.tensor([0.75]),
    "constant_linf": torch.full((1024,), -3.0),  # every |x| = norm: every code is the top level
}


@pytest.mark.parametrize("name", list(CONSTANT_CASES))
@pytest.mark.parametrize(
    "cfg",
    [QuantizerConfig.nuqsgd(4, 1024, coding="entropy"), QuantizerConfig.qsgd_inf(4, 1024, coding="entropy")],
    ids=["nuqsgd-l2", "qsgd-linf"],
)
def test_entropy_segment_of_one_repeated_code_round_trips(name, cfg):
    """One code with the whole frequency mass M: the rANS flush threshold ((L >> PREC) << 32) * M
    is 2^63 and overflowed int64, so such payloads failed to decode ("state out of range")."""
    x = CONSTANT_CASES[name]
    for seed in range(3):
        q = quantize(x, cfg, seed)
        enc = encode_tensor(x, cfg, seed)
        back = decode(enc.data, cfg)
        assert torch.equal(back.codes, q.codes) and torch.equal(back.norms, q.norms)
        out = torch.zeros(x.numel())
        decode_into(enc.data, cfg, out)
        assert torch.equal(out, q.dequantize())
        assert enc.bits == 8 * len(enc)


def test_rans_single_symbol_stream_is_the_initial_state():
    """With f = M the coding step is the identity: no words, final state L, for any length."""
    codes = np.full(100_001, 2, dtype=np.int32)
    freq, states, words = rans.encode_codes(codes, 6)
    assert freq[2] == rans.M and words.size == 0 and (states == rans.L).all()
    back = np.empty_like(codes)
    dummy = np.zeros(1, dtype=np.uint32)
    assert rans.decode(dummy, 0, states, *rans.decoder_tables(freq), back) == rans.OK
    assert np.array_equal(back, codes)


def test_layerwise_message_with_an_all_zero_entropy_layer_type():
    """An unused layer (all-zero gradient) in its own entropy-coded type no longer makes the
    whole message undecodable."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 32))
    policy = LayerPolicy.per_layer(QuantizerConfig.nuqsgd(3, 256, coding="entropy"))
    codec = LayerwiseCodec(policy.plan(model))
    xs = [torch.randn(e.shape) for e in codec.plan.entries]
    xs[2] = torch.zeros_like(xs[2])  # the second Linear's weight
    msg = codec.encode(xs, seed=4)
    back = codec.decode(msg.data)
    assert torch.equal(back[2], torch.zeros_like(xs[2]))


@pytest.mark.parametrize("coding", ["fixed", "entropy"])
@pytest.mark.parametrize("numel", [2**62, 2**40, 2**32 - 1, 2**27])
def test_forged_sizes_rejected_before_allocating(coding, numel):
    """A header (CRC forged) claiming a huge segment is rejected by arithmetic on the verified
    body length: a CodecError, microseconds, no allocation near the claimed size, no cache entry."""
    import tracemalloc

    from qoda.quant import quantizer

    cfg = QuantizerConfig.qsgd(4, 8, coding=coding)
    data = encode_tensor(torch.randn(10), cfg, 0).data.copy()
    data[24:32] = np.frombuffer(struct.pack("<Q", numel), np.uint8)  # numel field
    data[HEADER_SIZE : HEADER_SIZE + 8] = np.frombuffer(struct.pack("<Q", numel), np.uint8)  # layer size
    _forge_crc(data)
    before = quantizer._bucket_starts_cached.cache_info().currsize
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="corrupted"):
            decode(data, cfg)
        with pytest.raises(CodecError, match="corrupted"):
            decode_into(data, cfg, torch.zeros(10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, f"peak {peak} bytes for a {len(data)}-byte payload"
    assert quantizer._bucket_starts_cached.cache_info().currsize == before


def test_bucket_start_cache_holds_only_small_layouts():
    from qoda.quant import quantizer

    big = (quantizer.CACHED_MAX_BUCKETS * 8 + 1,)
    before = quantizer._bucket_starts_cached.cache_info().currsize
    starts = quantizer.bucket_starts(big, 8)
    assert len(starts) - 1 == quantizer.num_buckets(big, 8) == quantizer.CACHED_MAX_BUCKETS + 1
    assert quantizer._bucket_starts_cached.cache_info().currsize == before
    # at most 64 cached layouts of at most 2^16 + 1 int64 starts each: about 32 MiB in all
    cap = quantizer._bucket_starts_cached.cache_info().maxsize
    assert cap * (quantizer.CACHED_MAX_BUCKETS + 1) * 8 <= 2**25 + 2**10


def test_entropy_segment_claiming_a_huge_constant_tensor_is_bounded():
    """A valid entropy segment of equal codes costs no bits per coordinate (2^27 zeros take a few
    hundred bytes): decode without expected shapes refuses more than max_numel before allocating,
    decode_into checks the receiver's buffer first."""
    import tracemalloc

    cfg = QuantizerConfig.qsgd(4, 2**20, coding="entropy")
    n = 2**24
    data = encode_tensor(torch.zeros(n), cfg, 0).data
    assert len(data) < 400
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="max_numel"):
            decode(data, cfg, max_numel=2**20)
        with pytest.raises(ValueError, match="out"):
            decode_into(data, cfg, torch.zeros(10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert decode(data, cfg).numel == n  # within the default bound (2^26) it decodes


def _reseal_head(msg: np.ndarray, lengths: list[int]) -> np.ndarray:
    """``msg`` with its header's segment lengths replaced by ``lengths`` and the header CRC recomputed."""
    import zlib

    n = len(lengths)
    head = msg[: 20 + 8 * n].tobytes()[:20] + struct.pack(f"<{n}Q", *lengths)
    out = msg.copy()
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[len(head) : len(head) + 4] = np.frombuffer(struct.pack("<I", zlib.crc32(head)), dtype=np.uint8)
    return out


def _reference_decode(codec: LayerwiseCodec, payload: np.ndarray) -> None:
    """The per-segment path alone: split by the header's lengths, decode segment by segment."""
    segs = lw.unpack_message(payload, len(codec.groups), codec.plan_id)
    for g, seg in zip(codec.groups, segs, strict=True):
        decode_into(seg, g.config, torch.zeros(g.numel), accumulate=True, layer_numels=g.numels)


def _decode_error(decode) -> str | None:
    try:
        decode()
    except CodecError as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("shift", [1, 7, 44, -1, -13])
def test_shifted_segment_lengths_are_refused_by_the_fused_and_the_reference_path(shift):
    """Segment lengths changed in the message header, their sum kept and the header CRC
    recomputed: the fused decoder (one kernel call) must refuse what the per-segment reference
    refuses, with the same error (it used to decode such a message as if it were intact)."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 64), torch.nn.Linear(64, 5))
    plan = LayerPolicy.per_layer(QuantizerConfig.qsgd(4, 128), min_numel=100).plan(model)
    codec = LayerwiseCodec(plan)
    assert codec._layout(None) is not None and len(codec.groups) >= 2  # the fused path is taken
    grads = [torch.randn(e.shape) for e in plan.entries]
    msg = codec.encode(grads, seed=3).data
    lengths = list(codec._layout(None).lengths)
    for k in range(len(lengths) - 1):  # move `shift` bytes from segment k to segment k + 1
        forged = list(lengths)
        forged[k] -= shift
        forged[k + 1] += shift
        bad = _reseal_head(msg, forged)
        fused = _decode_error(lambda b=bad: codec.decode_flats_into(b, [torch.zeros(g.numel) for g in codec.groups]))
        reference = _decode_error(lambda b=bad: _reference_decode(codec, b))
        assert fused is not None and fused == reference, (k, fused, reference)
    assert _decode_error(lambda: codec.decode(msg)) is None  # the untouched message still decodes


def test_parameters_in_another_order_than_the_plan_name_the_tensor_passed():
    model = torch.nn.ModuleDict({"G": torch.nn.Sequential(torch.nn.Linear(16, 32)),
                                 "D": torch.nn.Sequential(torch.nn.Linear(32, 4))})  # fmt: skip
    codec = LayerwiseCodec(LayerPolicy.per_layer(QuantizerConfig.qsgd(4)).plan(model))
    d_first = [*model["D"].parameters(), *model["G"].parameters()]
    with pytest.raises(ValueError) as e:
        codec.check_tensors(d_first)
    msg = str(e.value)
    assert msg.startswith("tensors: tensor 0 has shape (4, 32) (128 elements), the shape of D.0.weight, where the "
                          "plan has G.0.weight (shape (32, 16), 512 elements)"), msg  # fmt: skip
    assert "plan's order (G.0.weight, G.0.bias, D.0.weight, D.0.bias)" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"tensor 1 has shape \(7,\) \(7 elements\), where the plan has G.0.bias"):
        codec.check_tensors([model["G"][0].weight, torch.zeros(7), *model["D"].parameters()])
