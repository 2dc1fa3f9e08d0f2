"""The interleaved rANS coder: exact round trips, the exact length bound, corrupted streams, the
reciprocal division, the fused decode + dequantize, and the segment format version."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qoda.codec import rans
from qoda.codec.format import HEADER_SIZE, CodecError, payload_crc
from qoda.codec.segment import decode, decode_into, encode, encode_tensor
from qoda.quant.config import QuantizerConfig
from qoda.quant.kernels import cpu
from qoda.quant.quantizer import quantize

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DUMMY = np.zeros(1, dtype=np.uint32)


def _words(w: np.ndarray) -> np.ndarray:
    return w if w.size else DUMMY


def _decode(freq, states, words, n, nwords=None) -> tuple[int, np.ndarray]:
    back = np.full(n, -1, dtype=np.int32)
    nwords = words.size if nwords is None else nwords
    return rans.decode(_words(words), nwords, states, *rans.decoder_tables(freq), back), back


def _stream_bits(states: np.ndarray, words: np.ndarray) -> int:
    return 64 * states.size + 32 * words.size


def _round_trip(codes: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    freq, states, words = rans.encode_codes(codes, alphabet)
    assert states.size == rans.num_states(codes.size)
    assert int(freq.sum()) == (rans.M if codes.size else 0)
    status, back = _decode(freq, states, words, codes.size)
    assert status == rans.OK
    assert np.array_equal(back, codes)
    counts = np.bincount(codes, minlength=alphabet)
    assert _stream_bits(states, words) <= rans.code_length_bound(counts)
    return freq, states, words


@st.composite
def code_arrays(draw) -> tuple[np.ndarray, int]:
    """Random alphabets (2..600 codes, so both slot-table widths), skewed or flat distributions,
    lengths 0..5000 (any residue mod the lane count)."""
    alphabet = draw(st.integers(2, 600))
    n = draw(st.integers(0, 5000))
    seed = draw(st.integers(0, 2**32 - 1))
    concentration = draw(st.sampled_from([0.01, 0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(alphabet, concentration))
    return rng.choice(alphabet, size=n, p=p).astype(np.int32), alphabet


@SETTINGS
@given(code_arrays())
def test_round_trip_and_exact_bound(case):
    codes, alphabet = case
    _round_trip(codes, alphabet)


@pytest.mark.parametrize("n", [*range(10), 4095, 4097, 100_001])
def test_lengths_around_the_lane_count(n):
    rng = np.random.default_rng(n)
    _round_trip(rng.integers(0, 16, n).astype(np.int32), 16)
    _round_trip(np.where(rng.random(n) < 0.97, 0, rng.integers(0, 16, n)).astype(np.int32), 16)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 1000, 100_003])
def test_one_code_holds_the_whole_mass(n):
    """f = M: coding is the identity (no words, every state L); the renormalisation limit
    ``2^(63 - PREC) M - 1 = 2^63 - 1`` must not overflow."""
    freq, states, words = _round_trip(np.full(n, 5, dtype=np.int32), 8)
    assert words.size == 0 and (states == rans.L).all()
    if n:
        assert freq[5] == rans.M


def test_empty_stream_is_one_initial_state():
    freq, states, words = _round_trip(np.zeros(0, dtype=np.int32), 6)
    assert states.tolist() == [rans.L] and words.size == 0 and not freq.any()
    assert rans.code_length_bound(np.zeros(6, dtype=np.int64)) == 64.0


def test_every_alphabet_the_quantizer_uses():
    """2 (s + 2) codes for level sets of up to 8 bits, and a 12-bit set (uint16 slot table)."""
    rng = np.random.default_rng(0)
    for alphabet in [*range(4, 257, 2), 2 * 2048 + 4]:
        n = int(rng.integers(1, 700))
        p = rng.dirichlet(np.full(alphabet, 0.3))
        _round_trip(rng.choice(alphabet, size=n, p=p).astype(np.int32), alphabet)
        _round_trip(np.arange(n, dtype=np.int32) % alphabet, alphabet)  # flat: many codes with f = 1


def test_bound_is_tight_on_skewed_and_rare_codes():
    """Codes with frequency 1 (the reciprocal's special case) and a dominant code."""
    n = 200_000
    codes = np.zeros(n, dtype=np.int32)
    codes[::997] = np.arange(codes[::997].size) % 40 + 1
    freq, states, words = _round_trip(codes, 64)
    counts = np.bincount(codes, minlength=64)
    assert (freq[counts > 0] == 1).sum() > 0
    bits = _stream_bits(states, words)
    p = counts[counts > 0] / n
    assert bits >= n * float(-(p * np.log2(p)).sum()) - 64  # close to the empirical entropy
    assert bits <= rans.code_length_bound(counts)


def test_codes_outside_the_alphabet_are_refused():
    with pytest.raises(ValueError, match="outside"):
        rans.encode_codes(np.array([0, 9], dtype=np.int32), 8)
    with pytest.raises(ValueError, match="outside"):
        rans.encode_codes(np.array([0, -1], dtype=np.int32), 8)


def test_reciprocal_division_is_exact():
    """``mulhi64(x, r_f) >> shift == x // f`` and ``C(x) = x + bias + q (M - f)`` equals the textbook
    step for every frequency, at both ends of the encoder's state range and at multiples of f."""
    rng = np.random.default_rng(0)
    fs = [*range(1, 300), *rng.integers(300, rans.M, 300).tolist(), rans.M - 1, rans.M]
    for f in fs:
        freq = np.array([f, rans.M - f]) if f < rans.M else np.array([f])
        row = rans.encoder_table(freq).view(np.uint64).reshape(freq.size, -1)[0]
        limit, rcp, bias, cmpl, shift = (int(v) for v in row[:5])
        assert limit == (1 << (63 - rans.PREC)) * f - 1
        lo = (rans.L >> rans.PREC) * f  # smallest state after renormalisation
        xs = {lo, lo + 1, limit, limit - 1, *rng.integers(lo, limit, 50, endpoint=True).tolist()}
        xs |= {(x // f) * f + d for x in list(xs) for d in (-1, 0, 1)}
        for x in (int(v) for v in xs if lo <= v <= limit):
            q = ((x * rcp) >> 64) >> shift
            assert q == x // f - (f == 1), (f, x)
            assert x + bias + q * cmpl == (x // f) * rans.M + x % f, (f, x)


def test_truncated_and_padded_streams_are_errors():
    rng = np.random.default_rng(1)
    codes = rng.choice(16, size=20_001, p=np.r_[0.6, 0.0, np.full(14, 0.4 / 14)]).astype(np.int32)
    freq, states, words = _round_trip(codes, 16)
    assert words.size > 4
    for cut in (1, 2, words.size // 2, words.size):  # a missing tail: read past the end
        status, _ = _decode(freq, states, words[: words.size - cut], codes.size)
        assert status == rans.ERR_TRUNCATED
    status, _ = _decode(freq, states, np.append(words, np.uint32(7)), codes.size)
    assert status == rans.ERR_STATE  # a word left over
    status, _ = _decode(freq, states, words[1:], codes.size)  # shifted: garbage, caught at the end
    assert status in (rans.ERR_STATE, rans.ERR_TRUNCATED)
    status, _ = _decode(freq, states, words, codes.size, nwords=words.size + 1)  # nwords > words
    assert status == rans.ERR_STATE


def test_bad_initial_states_are_errors():
    codes = np.arange(103, dtype=np.int32) % 6
    freq, states, words = _round_trip(codes, 6)
    for bad in (rans.L - 1, 0, -5):
        s2 = states.copy()
        s2[2] = bad
        assert _decode(freq, s2, words, codes.size)[0] == rans.ERR_STATE
    assert _decode(freq, states[:3], words, codes.size)[0] == rans.ERR_STATE  # one state missing
    assert _decode(freq, np.append(states, rans.L), words, codes.size)[0] == rans.ERR_STATE
    s2 = states.copy()
    s2[0] ^= 1 << 40
    assert _decode(freq, s2, words, codes.size)[0] != rans.OK


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 3000), st.integers(2, 300))
def test_garbage_streams_end_in_a_status(seed, n, alphabet):
    """Random tables, states and words: the kernels return a status (bounded loops, clamped reads,
    every index masked by construction) and write only ``codes``/``out``."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, rans.M + 1, alphabet - 1))
    freq = np.diff(np.r_[0, cuts, rans.M]).astype(np.int64)
    states = rng.integers(rans.L, 2**63 - 1, rans.num_states(n), dtype=np.int64, endpoint=True)
    words = rng.integers(0, 2**32, int(rng.integers(0, 2 * n + 2)), dtype=np.int64).astype(np.uint32)
    status, back = _decode(freq, states, words, n)
    assert status in (rans.OK, rans.ERR_TRUNCATED, rans.ERR_STATE)
    assert ((back >= 0) & (back < alphabet)).all() and freq[back].all()
    starts = np.unique(np.r_[0, rng.integers(0, n + 1, 5), n]).astype(np.int64)
    slv = rng.standard_normal(alphabet).astype(np.float32)
    out = np.zeros(n + 1, dtype=np.float32)
    status2 = rans.decode_dequantize(
        _words(words), words.size, states, *rans.decoder_tables(freq), slv, starts,
        np.ones(starts.size - 1, np.float32), out[:n], False,
    )  # fmt: skip
    assert status2 == status and out[n] == 0


@pytest.mark.parametrize("accumulate", [True, False])
@pytest.mark.parametrize("n", [0, 1, 7, 1029, 4096])
def test_fused_decode_equals_dequantize_of_decoded_codes(n, accumulate):
    """Buckets that cut the 4-symbol rounds anywhere (sizes 1..9 and a long one)."""
    rng = np.random.default_rng(n)
    levels = np.array([0.0, 0.1, 0.25, 0.5, 1.0], dtype=np.float32)
    alphabet = 2 * levels.size
    p = np.r_[0.7, 0.0, np.full(alphabet - 2, 0.3 / (alphabet - 2))]
    codes = rng.choice(alphabet, size=n, p=p).astype(np.int32)
    freq, states, words = _round_trip(codes, alphabet)
    sizes = [*rng.integers(1, 10, 40).tolist(), 700]
    starts = np.unique(np.minimum(np.r_[0, np.cumsum(sizes)], n)).astype(np.int64)
    if starts[-1] != n:
        starts = np.append(starts, n)
    if n == 0:
        starts = np.zeros(1, dtype=np.int64)
    norms = rng.random(max(starts.size - 1, 0)).astype(np.float32) * 3
    base = rng.standard_normal(n).astype(np.float32)
    want = base.copy()
    assert cpu.dequantize_codes(codes, starts, norms, levels, want, accumulate)[0] == cpu.OK
    got = base.copy()
    status = rans.decode_dequantize(
        _words(words), words.size, states, *rans.decoder_tables(freq),
        rans.signed_levels(levels, alphabet), starts, norms, got, accumulate,
    )  # fmt: skip
    assert status == rans.OK
    assert got.tobytes() == want.tobytes()  # bit for bit


# ----------------------------------------------------------------------- segments (format v2)
ENTROPY_CONFIGS = [
    QuantizerConfig.qsgd(2, 64, coding="entropy"),
    QuantizerConfig.qsgd(4, 1024, coding="entropy"),
    QuantizerConfig.qsgd(8, 33, coding="entropy"),
    QuantizerConfig.nuqsgd(3, 100, coding="entropy"),
    QuantizerConfig.qsgd_inf(4, 7, coding="entropy"),
]


@pytest.mark.parametrize("cfg", ENTROPY_CONFIGS, ids=lambda c: f"{c.bits}b-B{c.bucket_size}-{c.norm.value}")
@pytest.mark.parametrize("numels", [(0,), (1,), (3,), (5, 0, 2), (1001, 30, 3), (4099,)])
def test_segment_round_trip_and_fused_paths(cfg, numels):
    g = torch.Generator().manual_seed(sum(numels))
    xs = [torch.randn(n, generator=g) * (i + 1) for i, n in enumerate(numels)]
    q = quantize(xs, cfg, 5)
    enc = encode(q)
    assert np.array_equal(enc.data, encode_tensor(xs, cfg, 5).data)  # fused CPU path: same bytes
    buf = np.zeros(len(enc) + 9, dtype=np.uint8)
    into = encode_tensor(xs, cfg, 5, out=buf)
    assert np.array_equal(into.data, enc.data) and into.data.base is not None
    d = decode(enc.data, cfg, [t.shape for t in xs])
    assert torch.equal(d.codes, q.codes)
    n = sum(numels)
    out = torch.full((n,), 0.5)
    decode_into(enc.data, cfg, out, accumulate=True)
    assert torch.equal(out, q.dequantize() + 0.5)
    decode_into(enc.data, cfg, out, accumulate=False)
    assert torch.equal(out, q.dequantize())
    stream = enc.bits - 8 * (HEADER_SIZE + 8 * len(numels) + 4 * len(q.norms) + 2 * 2 * cfg.levels.num_levels)
    counts = np.bincount(q.codes.numpy(), minlength=2 * cfg.levels.num_levels)
    assert stream <= rans.code_length_bound(counts)
    assert stream >= 64 * rans.num_states(n)


def _forge(data: np.ndarray) -> np.ndarray:
    data[40:44] = 0
    data[40:44] = np.frombuffer(struct.pack("<I", payload_crc(data)), np.uint8)
    return data


def _entropy_payload() -> tuple[QuantizerConfig, np.ndarray, int]:
    cfg = QuantizerConfig.qsgd(4, 128, coding="entropy")
    x = torch.randn(3001, generator=torch.Generator().manual_seed(3))
    data = encode_tensor(x, cfg, 1).data.copy()
    stream_at = HEADER_SIZE + 8 + 4 * math.ceil(3001 / 128) + 2 * 2 * cfg.levels.num_levels
    return cfg, data, stream_at


def test_segment_version_1_is_rejected_by_name():
    cfg, data, _ = _entropy_payload()
    data[4] = 1
    _forge(data)
    with pytest.raises(CodecError, match=r"version 1.*version 2"):
        decode(data, cfg)
    with pytest.raises(CodecError, match=r"version 1.*version 2"):
        decode_into(data, cfg, torch.zeros(3001))


@pytest.mark.parametrize(
    "mutation",
    ["drop_last_word", "flip_word_bit", "state_below_L", "state_top_bit", "extra_word", "mass_on_code_1"],
)
def test_corrupted_entropy_body_is_a_codec_error(mutation):
    """Each mutation with a forged CRC (so the structural checks and the stream checks answer)."""
    cfg, data, at = _entropy_payload()
    if mutation == "drop_last_word":
        data = data[:-4].copy()
        data[32:40] = np.frombuffer(struct.pack("<Q", data.size - HEADER_SIZE), np.uint8)
    elif mutation == "flip_word_bit":
        data[at + 8 * rans.LANES + 5] ^= 0x10
    elif mutation == "state_below_L":
        data[at + 8 : at + 16] = np.frombuffer(struct.pack("<Q", rans.L - 1), np.uint8)
    elif mutation == "state_top_bit":
        data[at + 15] |= 0x80
    elif mutation == "extra_word":
        data = np.append(data, np.zeros(4, np.uint8))
        data[32:40] = np.frombuffer(struct.pack("<Q", data.size - HEADER_SIZE), np.uint8)
    else:  # move one unit of frequency onto code 1 (a negative zero)
        freq = data[at - 2 * 16 : at].view(np.uint16)
        freq[0] -= 1
        freq[1] += 1
    _forge(data)
    with pytest.raises(CodecError, match="corrupted"):
        decode(data, cfg)
    with pytest.raises(CodecError, match="corrupted"):
        decode_into(data, cfg, torch.zeros(3001))
