"""``qoda bench entropy``: the rANS coder side by side with memcpy, the previous coder and ``constriction``.

All coders code the same codes (QSGD of standard-normal float32, L2 buckets) with the same
frequency table, one thread, in one run, so that ratios survive a noisy shared machine.  Each
figure is the best of ``repeats`` timed calls after a warm-up, in GB/s of the float32 input the
codes stand for (4 bytes per symbol) and in million symbols per second.

Rows (``coder``):

* ``single-state (v1)``: the wire format 1 coder (one 64-bit state, a 64-bit division per
  symbol), kept here as a private reference; encode = count + encode, decode = decode to codes;
* ``interleaved (v2)``: :mod:`qoda.codec.rans` on the same terms;
* ``constriction``: ``AnsCoder`` with a ``Categorical(freq / M)`` model (its own 24-bit
  fixed-point precision), encode = model + ``encode_reverse``, decode = model + ``decode``;
  absent (with the reason) if the package is not installed; it is not a dependency;
* ``v1 segment path`` / ``v2 segment path``: what ``qoda bench codec`` times for entropy
  coding: encode = quantize + rANS (+ framing), decode = rANS decode + dequantize + accumulate
  into a float32 buffer (v2: :func:`~qoda.codec.segment.encode_tensor` and
  :func:`~qoda.codec.segment.decode_into`; v1: its kernels in that order, without framing).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numba as nb
import numpy as np
import torch

from qoda.bench.codec import _best  # one timing rule for both codec benchmarks
from qoda.codec import rans
from qoda.codec.segment import decode_into, encode_tensor
from qoda.quant.config import QuantizerConfig
from qoda.quant.kernels import cpu
from qoda.quant.quantizer import bucket_starts, level_tables, scratch_for
from qoda.quant.rng import seed_keys


# ------------------------------------------------------------------ the format-1 coder (reference)
@nb.njit(nogil=True, cache=True)
def _v1_encode(codes, freq, cum, out):  # pragma: no cover - compiled
    """Format 1: one state, renormalise 32 bits, ``x // f`` and ``x % f`` per symbol."""
    x = np.int64(rans.L)
    w = out.shape[0]
    for i in range(codes.shape[0] - 1, -1, -1):
        s = codes[i]
        f = freq[s]
        if (x >> 32) >= (rans.L >> rans.PREC) * f:
            w -= 1
            out[w] = x & 0xFFFFFFFF
            x >>= 32
        x = ((x // f) << rans.PREC) + (x % f) + cum[s]
    return w, x


@nb.njit(nogil=True, cache=True)
def _v1_decode(words, state, freq, cum, slot_code, codes):  # pragma: no cover - compiled
    x = np.int64(state)
    pos = 0
    nw = words.shape[0]
    for i in range(codes.shape[0]):
        slot = x & (rans.M - 1)
        s = slot_code[slot]
        x = freq[s] * (x >> rans.PREC) + slot - cum[s]
        if x < rans.L:
            if pos >= nw:
                return rans.ERR_TRUNCATED
            x = (x << 32) | np.int64(words[pos])
            pos += 1
        codes[i] = s
    return rans.OK if x == rans.L and pos == nw else rans.ERR_STATE


def _v1_tables(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cum = np.zeros(freq.size, dtype=np.int64)
    np.cumsum(freq[:-1], out=cum[1:])
    return cum, np.repeat(np.arange(freq.size, dtype=np.int32), freq)


def _v1_encode_codes(codes: np.ndarray, alphabet: int) -> tuple[np.ndarray, int, np.ndarray]:
    freq = rans.normalize_frequencies(np.bincount(codes, minlength=alphabet))
    cum, _ = _v1_tables(freq)
    words = np.empty(codes.size + 1, dtype=np.uint32)
    first, state = _v1_encode(codes, freq, cum, words)
    return freq, int(state), words[first:]


# ------------------------------------------------------------------------------------ bench
def _row(coder: str, numel: int, te: float, td: float, nbytes: int | None) -> dict[str, Any]:
    gb = 4 * numel / 1e9
    return {
        "coder": coder,
        "encode_gbps": gb / te,
        "decode_gbps": gb / td,
        "encode_msym_s": numel / te / 1e6,
        "decode_msym_s": numel / td / 1e6,
        "bits_per_coord": None if nbytes is None else 8 * nbytes / numel,
        "bytes": nbytes,
    }


def _constriction_row(codes: np.ndarray, freq: np.ndarray, repeats: int) -> dict[str, Any]:
    try:
        import constriction  # type: ignore[import-not-found]
    except ImportError as e:  # pragma: no cover - depends on the environment
        return {"coder": "constriction", "unavailable": f"{type(e).__name__}: {e}"}
    probs = freq.astype(np.float64) / rans.M
    n = codes.size

    def enc() -> np.ndarray:
        model = constriction.stream.model.Categorical(probs, perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(codes, model)
        return coder.get_compressed()

    compressed = enc()

    def dec() -> np.ndarray:
        model = constriction.stream.model.Categorical(probs, perfect=False)
        return constriction.stream.stack.AnsCoder(compressed).decode(model, n)

    if not np.array_equal(dec(), codes):  # pragma: no cover - a library defect
        raise RuntimeError("constriction: round trip differs")
    row = _row("constriction", n, _best(enc, repeats), _best(dec, repeats), int(compressed.nbytes))
    row["version"] = getattr(constriction, "__version__", None) or _dist_version("constriction")
    return row


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return None


def run_entropy_bench(
    numel: int = 1 << 24, bits: int = 4, repeats: int = 5, seed: int = 0, bucket_size: int = 1024
) -> dict[str, Any]:
    """Encode/decode throughput and size of each coder on the codes of ``numel`` standard normals."""
    if numel < 1 or repeats < 1:
        raise ValueError("numel and repeats must be positive")
    torch.set_num_threads(1)
    nb.set_num_threads(1)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(numel)
    memcpy_before = 4 * numel / 1e9 / _best(lambda: out.copy_(x), repeats)

    cfg = QuantizerConfig.qsgd(bits, bucket_size, coding="entropy")
    tabs = level_tables(cfg.levels)
    alphabet = 2 * cfg.levels.num_levels
    starts = bucket_starts([numel], bucket_size)
    k1, k2 = seed_keys(seed)
    norms = np.empty(len(starts) - 1, dtype=np.float32)
    codes = np.empty(numel, dtype=np.int32)
    xn = x.numpy()

    def quantize() -> None:
        status, _ = cpu.quantize_to_codes(xn, starts, *tabs.kernel_args, 0, k1, k2, norms, codes, scratch_for(cfg))
        assert status == cpu.OK

    quantize()
    counts = np.bincount(codes, minlength=alphabet)
    p = counts[counts > 0] / numel
    entropy = float(-(p * np.log2(p)).sum())
    rows: list[dict[str, Any]] = []

    # v1: one state
    freq1, state1, words1 = _v1_encode_codes(codes, alphabet)
    cum1, slot1 = _v1_tables(freq1)
    back = np.empty(numel, dtype=np.int32)
    assert _v1_decode(words1, state1, freq1, cum1, slot1, back) == 0 and np.array_equal(back, codes)
    te = _best(lambda: _v1_encode_codes(codes, alphabet), repeats)
    td = _best(lambda: _v1_decode(words1, state1, freq1, cum1, slot1, back), repeats)
    rows.append(_row("single-state (v1)", numel, te, td, 8 + words1.nbytes))

    # v2: interleaved states
    freq, states, words = rans.encode_codes(codes, alphabet)
    tables = rans.decoder_tables(freq)
    wv = words if words.size else np.zeros(1, dtype=np.uint32)
    assert rans.decode(wv, words.size, states, *tables, back) == rans.OK and np.array_equal(back, codes)
    te = _best(lambda: rans.encode_codes(codes, alphabet), repeats)
    td = _best(lambda: rans.decode(wv, words.size, states, *tables, back), repeats)
    rows.append(_row("interleaved (v2)", numel, te, td, states.nbytes + words.nbytes))

    rows.append(_constriction_row(codes, freq, repeats))

    # the segment paths (what `qoda bench codec` times)
    levels = tabs.levels
    acc = np.zeros(numel, dtype=np.float32)

    def v1_encode() -> None:
        quantize()
        _v1_encode_codes(codes, alphabet)

    def v1_decode() -> None:
        _v1_decode(words1, state1, freq1, cum1, slot1, back)
        cpu.dequantize_codes(back, starts, norms, levels, acc, True)

    te = _best(v1_encode, repeats)
    td = _best(v1_decode, repeats)
    rows.append(_row("v1 segment path", numel, te, td, None))
    enc = encode_tensor(x, cfg, seed)
    buf = np.empty(len(enc), dtype=np.uint8)
    te = _best(lambda: encode_tensor(x, cfg, seed, out=buf), repeats)
    td = _best(lambda: decode_into(enc.data, cfg, out, accumulate=True), repeats)
    rows.append(_row("v2 segment path", numel, te, td, len(enc)))

    memcpy = max(memcpy_before, 4 * numel / 1e9 / _best(lambda: out.copy_(x), repeats))
    for r in rows:
        if "encode_gbps" in r:
            r["encode_vs_memcpy"] = r["encode_gbps"] / memcpy
            r["decode_vs_memcpy"] = r["decode_gbps"] / memcpy
    v1, v2 = rows[0], rows[1]
    seg1, seg2 = rows[-2], rows[-1]
    return {
        "benchmark": "entropy",
        "numel": numel,
        "bits": bits,
        "bucket_size": bucket_size,
        "threads": 1,
        "data": "standard normal float32, QSGD codes (L2 buckets)",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "numba": nb.__version__,
        "load_average_1min": os.getloadavg()[0],  # a shared machine: other work slows every row alike
        "alphabet": alphabet,
        "entropy_bits_per_coord": entropy,
        "memcpy_gbps": memcpy,
        "lanes": rans.LANES,
        "precision_bits": rans.PREC,
        "encode_speedup_vs_v1": v2["encode_gbps"] / v1["encode_gbps"],
        "decode_speedup_vs_v1": v2["decode_gbps"] / v1["decode_gbps"],
        "segment_encode_speedup_vs_v1": seg2["encode_gbps"] / seg1["encode_gbps"],
        "segment_decode_speedup_vs_v1": seg2["decode_gbps"] / seg1["decode_gbps"],
        "rows": rows,
    }


def format_entropy(res: dict[str, Any]) -> str:
    lines = [
        f"entropy coding, {res['numel']:,} float32 -> {res['bits']}-bit QSGD codes (bucket {res['bucket_size']}), "
        f"1 thread; empirical entropy {res['entropy_bits_per_coord']:.4f} bits/coord; memcpy "
        f"{res['memcpy_gbps']:.2f} GB/s; load average {res['load_average_1min']:.1f}",
        "",
        "| coder | encode GB/s | decode GB/s | encode Msym/s | decode Msym/s | encode/memcpy | decode/memcpy "
        "| bits/coord | bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        if "unavailable" in r:
            lines.append(f"| {r['coder']} | unavailable: {r['unavailable']} | | | | | | | |")
            continue
        bpc = "" if r["bytes"] is None else f"{r['bits_per_coord']:.4f}"
        size = "" if r["bytes"] is None else f"{r['bytes']:,}"
        lines.append(
            f"| {r['coder']} | {r['encode_gbps']:.3f} | {r['decode_gbps']:.3f} | {r['encode_msym_s']:.0f} | "
            f"{r['decode_msym_s']:.0f} | {r['encode_vs_memcpy']:.3f} | {r['decode_vs_memcpy']:.3f} | {bpc} | {size} |"
        )
    lines.append(
        f"\n{res['lanes']} interleaved states vs one: encode {res['encode_speedup_vs_v1']:.1f}x, decode "
        f"{res['decode_speedup_vs_v1']:.1f}x; segment path (quantize + encode, decode + dequantize + accumulate): "
        f"encode {res['segment_encode_speedup_vs_v1']:.1f}x, decode {res['segment_decode_speedup_vs_v1']:.1f}x"
    )
    return "\n".join(lines)


def write_json(res: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
