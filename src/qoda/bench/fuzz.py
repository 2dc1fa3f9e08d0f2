"""Payload fuzzing: every damaged message must be rejected with :class:`CodecError`.

A corpus of real layer-wise messages (fixed-width 2/4/8-bit and rANS segments, L2 and L-inf
buckets, raw float32 segments, several layer plans) is mutated deterministically from
``(seed, case)``:

* ``bitflip`` - 1 to 8 random bits anywhere;
* ``truncate`` / ``extend`` - cut at a random length / append 1-64 random bytes;
* ``segment_header`` - one field of a segment header rewritten (version, coding, norm, dtype,
  bits, levels, bucket size, level-set id, layer count, numel) **with a valid CRC forged**;
* ``message_header`` - magic, version, segment count, plan tag or a segment length rewritten,
  with the message CRC forged;
* ``forged_sizes`` - a segment header claims sizes and counts far beyond its bytes (numel 2^27,
  2^32 - 1 or 2^62 with the layer sizes rewritten to add up; bucket size 1 or 2^20 with a huge
  numel; 2^20 to 2^32 - 1 layers; a body length of 2^40 to 2^64 - 1) **with a valid CRC forged**.
  Decoded both as part of the message and on its own with :func:`qoda.codec.segment.decode`
  (a receiver whose settings match the forged header, so the size checks are what is tested);
* ``forged_message`` - a message header claims 2^20 to 2^32 - 1 segments or a segment of 2^40
  to 2^64 - 1 bytes, with the message CRC forged.

Outcomes: ``detected`` (``CodecError``), ``silent`` (decoded to something other than the
original vector: the failure this bench exists to find), ``unclear`` (any other exception
type: not a clear error), ``harmless`` (accepted and decoded to exactly the original values:
a forged informational field such as the source dtype), ``unchanged`` (the mutation was a no-op).  Cases run in a child
process watched by the parent, so an interpreter crash (segfault in a kernel) or a hang is
counted, not fatal: the child is restarted after the failing case.

Memory: the child traces allocations (``tracemalloc``, which sees every numpy buffer the codec
allocates; torch's allocator is not traced, but the codec sizes its torch outputs from the
receiver's plan, never from a header) and reports the peak extra bytes of each case, and its ratio
to the payload's size.  The child's address space is capped (``RLIMIT_AS``, ``memory_cap`` bytes
above its size after start-up) so that a decoder that believes a forged size fails with
``MemoryError`` (an ``unclear`` outcome) instead of exhausting the machine.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import struct
import time
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from qoda.codec import format as fmt
from qoda.codec import layerwise as lw
from qoda.codec import rans
from qoda.codec.format import CodecError
from qoda.codec.segment import decode as decode_segment
from qoda.codec.segment import decode_raw
from qoda.quant.config import MAX_BUCKET_SIZE, Coding, Norm, QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan

MUTATIONS = ("bitflip", "truncate", "extend", "segment_header", "message_header", "forged_sizes", "forged_message")

# The segment header's fields and offsets, as the codec describes them (qoda.codec.format).
HEADER_FIELDS = tuple(name for name, _ in fmt.HEADER_LAYOUT)
SEGMENT_FIELDS = fmt.FIELDS
# rewritable fields of the ``segment_header`` mutation (everything but magic and the CRC)
_SEGMENT_FIELDS = tuple(SEGMENT_FIELDS[f] for f in HEADER_FIELDS[1:-1])
# The message header as documented in qoda.codec.layerwise: magic (4), version (1), status (1),
# 2 zero bytes, segment count (u32 at 8), tag (u32 at 12), origin (u32 at 16), one u64 length per
# segment from 20, then a CRC-32.
# corpus() checks this layout against the codec's own unpack_message on every message it builds.
MSG_COUNT, MSG_TAG, MSG_LENGTHS = 8, 12, 20


def _get(buf: np.ndarray, off: int, code: str) -> int:
    return struct.unpack_from("<" + code, buf[off : off + struct.calcsize(code)].tobytes())[0]


def _put(buf: np.ndarray, off: int, code: str, value: int) -> None:
    buf[off : off + struct.calcsize(code)] = np.frombuffer(struct.pack("<" + code, value), dtype=np.uint8)


def _plans() -> list[LayerPlan]:
    shapes = [torch.Size([64, 32]), torch.Size([3000]), torch.Size([16, 8, 3, 3]), torch.Size([10])]
    cfgs = [
        QuantizerConfig.qsgd(4), QuantizerConfig.qsgd(2, 256), QuantizerConfig(LevelSet.for_bits(8, "uniform"), 512,
        Norm.LINF), QuantizerConfig.nuqsgd(4, coding=Coding.ENTROPY), QuantizerConfig.qsgd(3, coding=Coding.ENTROPY),
    ]  # fmt: skip
    plans = []
    for i, c in enumerate(cfgs):
        other = cfgs[(i + 1) % len(cfgs)]
        entries = (LayerEntry("a", shapes[0], "x"), LayerEntry("b", shapes[1], "y"), LayerEntry("c", shapes[2], "x"),
                   LayerEntry("d", shapes[3], None))  # fmt: skip
        plans.append(LayerPlan(entries, {"x": c, "y": other}))
    return plans


def corpus(seed: int = 0) -> list[tuple[lw.LayerwiseCodec, np.ndarray, list[torch.Tensor]]]:
    """Real messages: ``(codec, payload, decoded original)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for plan in _plans():
        codec = lw.LayerwiseCodec(plan)
        for k in range(3):
            xs = [torch.randn(e.shape, generator=g) * (10.0**k) for e in plan.entries]
            msg = codec.encode(xs, seed=seed + k)
            segs = lw.unpack_message(msg.data, len(codec.groups), codec.plan_id)
            if segment_offsets(msg.data) != [int(sg.ctypes.data - msg.data.ctypes.data) for sg in segs]:
                raise RuntimeError("fuzz: the message layout differs from the one documented in qoda.codec.layerwise")
            out.append((codec, msg.data.copy(), codec.decode(msg.data)))
    return out


def segment_offsets(payload: np.ndarray) -> list[int]:
    n_seg = _get(payload, MSG_COUNT, "I")
    pos, offs = MSG_LENGTHS + 8 * n_seg + 4, []
    for k in range(n_seg):
        offs.append(pos)
        pos += _get(payload, MSG_LENGTHS + 8 * k, "Q")
    return offs


def _forge_message_crc(buf: np.ndarray) -> None:
    n_seg = _get(buf, MSG_COUNT, "I")
    end = MSG_LENGTHS + 8 * min(n_seg, 64) + 4
    if end <= buf.size:
        _put(buf, end - 4, "I", zlib.crc32(buf[: end - 4]))


def _forge_segment_crc(buf: np.ndarray, start: int) -> None:
    """Recompute the CRC of the segment at ``start`` over the bytes that are there."""
    body_len = _get(buf, start + SEGMENT_FIELDS["body_len"][0], "Q")
    seg = buf[start : min(start + fmt.HEADER_SIZE + body_len, buf.size)]
    if seg.size >= fmt.HEADER_SIZE:
        _put(seg, SEGMENT_FIELDS["crc"][0], "I", fmt.payload_crc(seg))


# Sizes and counts a forged header claims: far beyond any body, at the edges of the fields' ranges.
HUGE_NUMELS = (1 << 27, (1 << 32) - 1, 1 << 62)
HUGE_LAYERS = (1 << 20, 1 << 27, 1 << 31, (1 << 32) - 1)
HUGE_LENGTHS = (1 << 40, 1 << 62, (1 << 64) - 1)
HUGE_SEGMENTS = (1 << 20, 1 << 31, (1 << 32) - 1)


def _pick(values: tuple[int, ...], rng: np.random.Generator) -> int:
    return values[int(rng.integers(len(values)))]  # (rng.choice would turn 2^64 - 1 into a float)


FORGED_CLAIMS: dict[str, tuple[int, ...]] = {
    "numel": HUGE_NUMELS,  # numel (layer sizes rewritten to add up)
    "bucket1_numel": HUGE_NUMELS,  # bucket size 1 and a huge numel
    "bucket_max_numel": HUGE_NUMELS,  # bucket size MAX_BUCKET_SIZE and a huge numel
    "n_layers": HUGE_LAYERS,
    "body_len": HUGE_LENGTHS,
}


def forge_sizes(buf: np.ndarray, start: int, claim: str, value: int) -> None:
    """Make the segment at ``start`` claim ``value`` for ``claim`` (see :data:`FORGED_CLAIMS`), CRC forged."""
    f = SEGMENT_FIELDS
    if claim == "n_layers":
        _put(buf, start + f["n_layers"][0], "I", value)
    elif claim == "body_len":
        _put(buf, start + f["body_len"][0], "Q", value)
    else:
        if claim != "numel" and _get(buf, start + f["coding"][0], "B") != 0:  # raw segments have no buckets
            _put(buf, start + f["bucket_size"][0], "I", 1 if claim == "bucket1_numel" else MAX_BUCKET_SIZE)
        _put(buf, start + f["numel"][0], "Q", value)
        n_layers = _get(buf, start + f["n_layers"][0], "I")
        layers = start + fmt.HEADER_SIZE
        if n_layers and layers + 8 * n_layers <= buf.size:  # make the layer sizes add up to the claim
            rest = sum(_get(buf, layers + 8 * k, "Q") for k in range(1, n_layers))
            _put(buf, layers, "Q", (value - rest) % (1 << 64))
    _forge_segment_crc(buf, start)


def mutate(payload: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    kind = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    buf = payload.copy()
    if kind == "bitflip":
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(buf.size * 8))
            buf[pos // 8] ^= np.uint8(1 << (pos % 8))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(buf.size))].copy()
    elif kind == "extend":
        buf = np.concatenate([buf, rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8)])
    elif kind == "segment_header":
        offs = segment_offsets(buf)
        start = offs[int(rng.integers(len(offs)))]
        off, f = _SEGMENT_FIELDS[int(rng.integers(len(_SEGMENT_FIELDS)))]
        size = struct.calcsize(f)
        old = _get(buf, start + off, f)
        new = old
        while new == old:
            new = int(rng.integers(0, 1 << min(8 * size, 62))) if rng.random() < 0.5 else old + int(rng.integers(-3, 4))
            new %= 1 << (8 * size)
        _put(buf, start + off, f, new)
        _forge_segment_crc(buf, start)  # forge the segment CRC over what is there
    elif kind == "forged_sizes":
        offs = segment_offsets(buf)
        claim = list(FORGED_CLAIMS)[int(rng.integers(len(FORGED_CLAIMS)))]
        forge_sizes(buf, offs[int(rng.integers(len(offs)))], claim, _pick(FORGED_CLAIMS[claim], rng))
    elif kind == "forged_message":
        if rng.random() < 0.5:
            _put(buf, MSG_COUNT, "I", _pick(HUGE_SEGMENTS, rng))
        else:
            k = int(rng.integers(_get(buf, MSG_COUNT, "I")))
            _put(buf, MSG_LENGTHS + 8 * k, "Q", _pick(HUGE_LENGTHS, rng))
        _forge_message_crc(buf)
    else:  # message_header
        which = int(rng.integers(5))
        if which == 0:
            buf[int(rng.integers(4))] ^= np.uint8(int(rng.integers(1, 256)))
        elif which == 1:
            buf[4] = np.uint8((int(buf[4]) + int(rng.integers(1, 256))) % 256)
        elif which == 2:
            n = _get(buf, MSG_COUNT, "I")
            delta = int(rng.choice([-2, -1, 1, 2]))
            _put(buf, MSG_COUNT, "I", n + delta if n + delta >= 0 else n + 1)
        elif which == 3:
            _put(buf, MSG_TAG, "I", int(rng.integers(1 << 32)))
        else:
            k = MSG_LENGTHS + 8 * int(rng.integers(_get(buf, MSG_COUNT, "I")))
            old = _get(buf, k, "Q")
            v = old + int(rng.choice([-9, -5, -1, 1, 3, 8]))
            _put(buf, k, "Q", v if v >= 0 else old + 1)
        _forge_message_crc(buf)
    return kind, buf


def _decode_message(codec: lw.LayerwiseCodec, mutated: np.ndarray, expected: list[torch.Tensor]) -> str:
    try:
        got = codec.decode(mutated)
    except CodecError:
        return "detected"
    except Exception as e:  # any other exception type is not a clear error
        return f"unclear:{type(e).__name__}"
    same = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    return "harmless" if same else "silent"


def _decode_segments(codec: lw.LayerwiseCodec, original: np.ndarray, mutated: np.ndarray) -> str:
    """Decode every changed segment on its own (``decode`` / ``decode_raw``), by a receiver whose bucket
    size is the one the forged header claims: its other settings are the group's."""
    outcomes = []
    for g, start, end in zip(codec.groups, segment_offsets(original), [*segment_offsets(original)[1:], None],
                             strict=True):  # fmt: skip
        seg, orig = mutated[start : end if end is not None else mutated.size], original[start:end]
        if seg.size == orig.size and np.array_equal(seg, orig):
            continue
        try:
            if g.config is None:
                got = decode_raw(seg)
                same = torch.equal(got, decode_raw(orig))
            else:
                claimed = _get(seg, SEGMENT_FIELDS["bucket_size"][0], "I") if seg.size >= fmt.HEADER_SIZE else 0
                cfg = replace(g.config, bucket_size=claimed) if 1 <= claimed <= MAX_BUCKET_SIZE else g.config
                q, ref = decode_segment(seg, cfg), decode_segment(orig, g.config)
                same = torch.equal(q.codes, ref.codes) and torch.equal(q.norms, ref.norms)
            outcomes.append("harmless" if same else "silent")
        except CodecError:
            outcomes.append("detected")
        except Exception as e:
            outcomes.append(f"unclear:{type(e).__name__}")
    return _worst(outcomes)


def _worst(outcomes: list[str]) -> str:
    for bad in ("silent", "unclear"):
        hit = [o for o in outcomes if o.startswith(bad)]
        if hit:
            return hit[0]
    return "detected" if all(o == "detected" for o in outcomes) else "harmless"


def classify(codec: lw.LayerwiseCodec, original: np.ndarray, mutated: np.ndarray, expected: list[torch.Tensor],
             kind: str = "") -> str:  # fmt: skip
    """``unchanged``, ``detected``, ``harmless``, ``silent`` or ``unclear:<type>`` (see the module docstring).

    ``forged_sizes`` payloads are also decoded segment by segment (:func:`_decode_segments`)."""
    if mutated.size == original.size and np.array_equal(mutated, original):
        return "unchanged"
    outcome = _decode_message(codec, mutated, expected)
    if kind == "forged_sizes":
        outcome = _worst([outcome, _decode_segments(codec, original, mutated)])
    return outcome


def entropy_amplification(numel: int = 1 << 24) -> dict[str, Any]:
    """Decode allocation of a *valid* entropy-coded segment whose codes are all equal (0 bits each).

    rANS spends no bits on a symbol that holds the whole frequency mass, so such a segment is a header,
    its layer size, one zero norm per bucket (``MAX_BUCKET_SIZE`` coordinates), the frequency table and
    the final states: its size does not bound ``numel``.  :func:`qoda.codec.segment.decode` without expected
    layer sizes (the message decoder always passes them) allocates in proportion to ``numel``.
    """
    cfg = QuantizerConfig.qsgd(4, MAX_BUCKET_SIZE, coding=Coding.ENTROPY)
    freq = np.zeros(2 * cfg.levels.num_levels, dtype=np.uint16)
    freq[0] = rans.M
    parts = [np.array([numel], np.uint64), np.zeros(-(-numel // MAX_BUCKET_SIZE), np.float32), freq,
             np.full(rans.num_states(numel), rans.L, np.uint64)]  # fmt: skip
    header = fmt.Header(fmt.WireCoding.ENTROPY, 0, torch.float32, cfg.bits, cfg.levels.num_levels,
                        MAX_BUCKET_SIZE, cfg.levels.level_set_id, 1, numel, sum(p.nbytes for p in parts))  # fmt: skip
    payload = header.pack(parts)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        outcome = f"decoded {decode_segment(payload, cfg).numel} coordinates"
    except CodecError as e:
        outcome = f"CodecError: {e}"
    except MemoryError:
        outcome = "MemoryError"
    peak = max(0, tracemalloc.get_traced_memory()[1] - base)
    if not tracing:
        tracemalloc.stop()
    return {"payload_bytes": int(payload.size), "claimed_numel": numel, "outcome": outcome, "peak_bytes": peak,
            "ratio": round(peak / payload.size, 1)}  # fmt: skip


def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cap_address_space(extra: int) -> None:
    """Cap this process's address space ``extra`` bytes above its current size (Linux; else no cap)."""
    size = _vm_size()
    if size is None or extra <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _child(conn: Any, seed: int, start: int, stop: int, memory_cap: int) -> None:
    torch.set_num_threads(1)
    items = corpus(seed)
    for codec, payload, expected in items[:5]:  # warm-up: kernels compiled and loaded before the cap
        classify(codec, payload, payload[:-1].copy(), expected)
    _cap_address_space(memory_cap)
    tracemalloc.start()
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        codec, payload, expected = items[i % len(items)]
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        try:
            kind, bad = mutate(payload, rng)
            outcome = classify(codec, payload, bad, expected, kind)
        except Exception as e:  # a failure of the fuzzer itself: counted as unclear, never a pass
            kind, bad, outcome = "harness", payload, f"unclear:harness-{type(e).__name__}"
        peak = max(0, tracemalloc.get_traced_memory()[1] - base)
        conn.send((i, kind, outcome, peak, int(bad.size)))
    if start == 0:
        conn.send(("amplification", entropy_amplification()))
    conn.send(None)


#: A decode may allocate at most this multiple of the payload's bytes (plus ``MEMORY_SLACK``) before the
#: case counts as ``memory_over_limit``: a genuine message needs about 12 bytes (codes, values) per
#: coordinate and carries at least 2 bits per coordinate with fixed-width coding.
MEMORY_RATIO_LIMIT = 256
MEMORY_SLACK = 1 << 20
#: Address space the fuzzing child may grow by (``RLIMIT_AS``): a decoder that believes a forged size
#: gets a ``MemoryError`` instead of the machine's memory.
MEMORY_CAP = 4 << 30


@dataclass
class FuzzResult:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)  # first few non-detected damaged cases
    peak_bytes: int = 0  # largest traced allocation peak of one case (bytes beyond the child's baseline)
    peak_ratio: float = 0.0  # largest ratio of that peak to the case's payload size
    peak_by_kind: dict[str, int] = field(default_factory=dict)
    peak_cases: dict[str, dict] = field(default_factory=dict)  # the cases of peak_bytes and peak_ratio
    memory_over_limit: int = 0
    amplification: dict[str, Any] = field(default_factory=dict)  # see entropy_amplification()

    def record_memory(self, i: int, kind: str, peak: int, size: int, limit: float) -> None:
        info = {"case": i, "mutation": kind, "peak_bytes": peak, "payload_bytes": size}
        ratio = peak / max(1, size)
        if peak > self.peak_bytes:
            self.peak_bytes, self.peak_cases["bytes"] = peak, info
        if ratio > self.peak_ratio:
            self.peak_ratio, self.peak_cases["ratio"] = ratio, info
        self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), peak)
        if peak > limit * size + MEMORY_SLACK:
            self.memory_over_limit += 1
            if len(self.examples) < 10:
                self.examples.append({**info, "outcome": "memory_over_limit"})

    def as_dict(self) -> dict[str, Any]:
        return {
            "fuzz_cases": self.cases, "detected": self.outcomes["detected"], "unchanged": self.outcomes["unchanged"],
            "harmless": self.outcomes["harmless"],
            "silent_corruptions": self.outcomes["silent"], "crashes": self.crashes, "hangs": self.hangs,
            "unclear_errors": sum(v for k, v in self.outcomes.items() if k.startswith("unclear")),
            "by_mutation": {k: dict(v) for k, v in sorted(self.by_kind.items())}, "seconds": self.seconds,
            "peak_extra_bytes_max": self.peak_bytes, "peak_extra_ratio_max": round(self.peak_ratio, 3),
            "peak_extra_bytes_by_mutation": dict(sorted(self.peak_by_kind.items())),
            "peak_cases": self.peak_cases, "memory_over_limit": self.memory_over_limit,
            "entropy_amplification": self.amplification,
            "examples": self.examples,
        }  # fmt: skip


def run_fuzz(
    cases: int = 10_000,
    seed: int = 0,
    case_timeout: float = 20.0,
    memory_ratio_limit: float = MEMORY_RATIO_LIMIT,
    memory_cap: int = MEMORY_CAP,
) -> FuzzResult:
    """Run ``cases`` mutations in a watched child process (restarted after a crash or hang)."""
    ctx = mp.get_context("spawn")
    res = FuzzResult()
    t0 = time.perf_counter()
    nxt = 0
    while nxt < cases:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, seed, nxt, cases, memory_cap), daemon=True)
        proc.start()
        child.close()
        first = True
        try:
            while True:
                if not parent.poll(case_timeout + (60.0 if first else 0.0)):  # start-up imports the kernels
                    res.hangs += 1
                    proc.kill()
                    nxt += 1
                    break
                first = False
                try:
                    msg = parent.recv()
                except EOFError:  # the child died: an interpreter crash on case `nxt`
                    res.crashes += 1
                    if len(res.examples) < 10:
                        res.examples.append({"case": nxt, "outcome": "crash"})
                    nxt += 1
                    break
                if msg is None:
                    nxt = cases
                    break
                if msg[0] == "amplification":
                    res.amplification = msg[1]
                    continue
                i, kind, outcome, peak, size = msg
                res.cases += 1
                res.outcomes[outcome] += 1
                res.by_kind.setdefault(kind, Counter())[outcome] += 1
                if outcome not in ("detected", "unchanged", "harmless") and len(res.examples) < 10:
                    res.examples.append({"case": i, "mutation": kind, "outcome": outcome})
                res.record_memory(i, kind, peak, size, memory_ratio_limit)
                nxt = i + 1
        finally:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            parent.close()
    res.cases += res.crashes + res.hangs
    res.seconds = time.perf_counter() - t0
    return res
