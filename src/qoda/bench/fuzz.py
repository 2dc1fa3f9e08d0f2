"""Payload fuzzing: every damaged message must be rejected with :class:`CodecError`.

A corpus of real layer-wise messages (fixed-width 2/4/8-bit and rANS segments, L2 and L-inf
buckets, raw float32 segments, several layer plans) is mutated deterministically from
``(seed, case)``:

* ``bitflip`` - 1 to 8 random bits anywhere;
* ``truncate`` / ``extend`` - cut at a random length / append 1-64 random bytes;
* ``segment_header`` - one field of a segment header rewritten (version, coding, norm, dtype,
  bits, levels, bucket size, level-set id, layer count, numel) **with a valid CRC forged**;
* ``message_header`` - magic, version, segment count, plan tag or a segment length rewritten,
  with the message CRC forged.

Outcomes: ``detected`` (``CodecError``), ``silent`` (decoded to something other than the
original vector: the failure this bench exists to find), ``unclear`` (any other exception
type: not a clear error), ``harmless`` (accepted and decoded to exactly the original values:
a forged informational field such as the source dtype), ``unchanged`` (the mutation was a no-op).  Cases run in a child
process watched by the parent, so an interpreter crash (segfault in a kernel) or a hang is
counted, not fatal: the child is restarted after the failing case.
"""

from __future__ import annotations

import multiprocessing as mp
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qoda.codec import format as fmt
from qoda.codec import layerwise as lw
from qoda.codec.format import CodecError
from qoda.quant.config import Coding, Norm, QuantizerConfig
from qoda.quant.levels import LevelSet
from qoda.quant.policy import LayerEntry, LayerPlan

MUTATIONS = ("bitflip", "truncate", "extend", "segment_header", "message_header")
# (offset, struct format) of the rewritable segment header fields (see qoda.codec.format.HEADER)
_SEGMENT_FIELDS = ((4, "B"), (5, "B"), (6, "B"), (7, "B"), (8, "B"), (9, "B"), (10, "H"), (12, "I"), (16, "I"),
                   (20, "I"), (24, "Q"), (32, "Q"))  # fmt: skip


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
            out.append((codec, msg.data.copy(), codec.decode(msg.data)))
    return out


def _segment_offsets(payload: np.ndarray) -> list[int]:
    _, _, n_seg, _ = lw._HEAD.unpack_from(payload[: lw._HEAD.size].tobytes())
    lengths = struct.unpack_from(f"<{n_seg}Q", payload[lw._HEAD.size : lw._HEAD.size + 8 * n_seg].tobytes())
    pos, offs = lw._HEAD.size + 8 * n_seg + 4, []
    for n in lengths:
        offs.append(pos)
        pos += n
    return offs


def _forge_message_crc(buf: np.ndarray) -> None:
    _, _, n_seg, _ = lw._HEAD.unpack_from(buf[: lw._HEAD.size].tobytes())
    end = lw._HEAD.size + 8 * min(n_seg, 64) + 4
    if end <= buf.size:
        buf[end - 4 : end] = np.frombuffer(struct.pack("<I", zlib.crc32(buf[: end - 4])), dtype=np.uint8)


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
        offs = _segment_offsets(buf)
        start = offs[int(rng.integers(len(offs)))]
        off, f = _SEGMENT_FIELDS[int(rng.integers(len(_SEGMENT_FIELDS)))]
        size = struct.calcsize(f)
        old = struct.unpack_from("<" + f, buf[start + off : start + off + size].tobytes())[0]
        new = old
        while new == old:
            new = int(rng.integers(0, 1 << min(8 * size, 62))) if rng.random() < 0.5 else old + int(rng.integers(-3, 4))
            new %= 1 << (8 * size)
        buf[start + off : start + off + size] = np.frombuffer(struct.pack("<" + f, new), dtype=np.uint8)
        seg_end = start + fmt.HEADER_SIZE + struct.unpack_from("<Q", buf[start + 32 : start + 40].tobytes())[0]
        seg = buf[start : min(seg_end, buf.size)]
        if seg.size >= fmt.HEADER_SIZE:  # forge the segment CRC over what is there
            seg[fmt._CRC_OFFSET : fmt.HEADER_SIZE] = np.frombuffer(struct.pack("<I", fmt.payload_crc(seg)), np.uint8)
    else:  # message_header
        which = int(rng.integers(5))
        if which == 0:
            buf[int(rng.integers(4))] ^= np.uint8(int(rng.integers(1, 256)))
        elif which == 1:
            buf[4] = np.uint8((int(buf[4]) + int(rng.integers(1, 256))) % 256)
        elif which == 2:
            n = struct.unpack_from("<I", buf[8:12].tobytes())[0]
            delta = int(rng.choice([-2, -1, 1, 2]))
            buf[8:12] = np.frombuffer(struct.pack("<I", n + delta if n + delta >= 0 else n + 1), np.uint8)
        elif which == 3:
            buf[12:16] = np.frombuffer(struct.pack("<I", int(rng.integers(1 << 32))), np.uint8)
        else:
            n_seg = struct.unpack_from("<I", buf[8:12].tobytes())[0]
            k = lw._HEAD.size + 8 * int(rng.integers(n_seg))
            old = struct.unpack_from("<Q", buf[k : k + 8].tobytes())[0]
            v = old + int(rng.choice([-9, -5, -1, 1, 3, 8]))
            buf[k : k + 8] = np.frombuffer(struct.pack("<Q", v if v >= 0 else old + 1), np.uint8)
        _forge_message_crc(buf)
    return kind, buf


def classify(codec: lw.LayerwiseCodec, original: np.ndarray, mutated: np.ndarray, expected: list[torch.Tensor]) -> str:
    if mutated.size == original.size and np.array_equal(mutated, original):
        return "unchanged"
    try:
        got = codec.decode(mutated)
    except CodecError:
        return "detected"
    except Exception as e:  # any other exception type is not a clear error
        return f"unclear:{type(e).__name__}"
    same = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    return "harmless" if same else "silent"


def _child(conn: Any, seed: int, start: int, stop: int) -> None:
    torch.set_num_threads(1)
    items = corpus(seed)
    for i in range(start, stop):
        rng = np.random.default_rng([seed, i])
        codec, payload, expected = items[i % len(items)]
        kind, bad = mutate(payload, rng)
        conn.send((i, kind, classify(codec, payload, bad, expected)))
    conn.send(None)


@dataclass
class FuzzResult:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)  # first few non-detected damaged cases

    def as_dict(self) -> dict[str, Any]:
        return {
            "fuzz_cases": self.cases, "detected": self.outcomes["detected"], "unchanged": self.outcomes["unchanged"],
            "harmless": self.outcomes["harmless"],
            "silent_corruptions": self.outcomes["silent"], "crashes": self.crashes, "hangs": self.hangs,
            "unclear_errors": sum(v for k, v in self.outcomes.items() if k.startswith("unclear")),
            "by_mutation": {k: dict(v) for k, v in sorted(self.by_kind.items())}, "seconds": self.seconds,
            "examples": self.examples,
        }  # fmt: skip


def run_fuzz(cases: int = 10_000, seed: int = 0, case_timeout: float = 20.0) -> FuzzResult:
    """Run ``cases`` mutations in a watched child process (restarted after a crash or hang)."""
    ctx = mp.get_context("spawn")
    res = FuzzResult()
    t0 = time.perf_counter()
    nxt = 0
    while nxt < cases:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, seed, nxt, cases), daemon=True)
        proc.start()
        child.close()
        try:
            while True:
                if not parent.poll(case_timeout + (60.0 if nxt == 0 else 0.0)):  # start-up imports the kernels
                    res.hangs += 1
                    proc.kill()
                    nxt += 1
                    break
                try:
                    msg = parent.recv()
                except EOFError:  # the child died: an interpreter crash on case `nxt`
                    res.crashes += 1
                    nxt += 1
                    break
                if msg is None:
                    nxt = cases
                    break
                i, kind, outcome = msg
                res.cases += 1
                res.outcomes[outcome] += 1
                res.by_kind.setdefault(kind, Counter())[outcome] += 1
                if outcome not in ("detected", "unchanged", "harmless") and len(res.examples) < 10:
                    res.examples.append({"case": i, "mutation": kind, "outcome": outcome})
                nxt = i + 1
        finally:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            parent.close()
    res.cases += res.crashes + res.hangs
    res.seconds = time.perf_counter() - t0
    return res
