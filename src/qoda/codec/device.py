"""The layer-wise codec on the gradients' own device (CUDA, or the CPU for tests and the proxy benchmark).

:class:`DeviceCodec` wraps a :class:`~qoda.codec.layerwise.LayerwiseCodec` and writes the same
bytes as the numba kernels (:mod:`qoda.codec.fused`) with vectorised torch ops compiled by
``torch.compile`` (Inductor: C++/OpenMP on the CPU, Triton on CUDA; eager torch where no compiler
is available, see :func:`compiler`).  Per quantized segment, every operation of the CPU kernels
is evaluated in the same float32 / 32-bit integer arithmetic:

    u = min((|x| * pre) * (1 / (norm * pre)), 1)       pre = 2^64 for a norm below 2^-126, else 1
    j = max{j : l_j <= u},  p = (u - l_j) / (l_{j+1} - l_j)   (uniform levels: QSGD's t = u (s+1))
    code = ((j + [r_i < p]) << 1) | sign,   r_i = the hash of :mod:`qoda.quant.rng` in int32 lanes

and codes are packed LSB-first, eight codes (``width`` bytes) per group.  The encoder works on
groups of eight consecutive coordinates, so each output byte is one vectorised expression of the
eight strided inputs it covers (no full-size temporary: it reads ``x`` once for the norms and once
for the codes, and writes only norms and packed bytes); the decoder on rows of 16 codes (two
groups: one AVX-512 vector of lanes), accumulating into the output in the same kernel.

What crosses to the host (a CUDA device), per message: the packed message once for its
CRC-32s (zlib-ng on the host; the message is ``width / 32`` of the float32 gradient plus norms
and headers), one status scalar (NaN/Inf input or a corrupt payload), and the CRCs back
(4 bytes per segment).  Nothing proportional to the float32 gradient.  Entropy-coded groups
(and codes wider than 8 bits) take the host path (numba rANS) on a host copy: docs say so.
A failed check (NaN/Inf input, damaged payload) reruns the host path on host copies, which
raises the same precise error as the CPU codec: both paths accept exactly the same messages.

Bucket layouts: a segment whose layers (all but the last) are whole buckets and whose bucket
size is a multiple of 16 is *regular* (rows of buckets, no index arrays); any other segment keeps
per-coordinate bucket ids and a gather index for its norms on the device (8 bytes a coordinate).

The L2 norm sums squares in float64, as the numba kernel, whose summation order LLVM chooses
("reassoc"); the float32 norm is the same unless the float64 sum lands within its last bits of a
float32 rounding boundary (about ``B * 2^-29`` per bucket).  L-inf norms are exact.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import struct
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qoda.codec import fused
from qoda.codec.format import HEADER_SIZE, crc32
from qoda.codec.layerwise import (
    EncodedMessage,
    LayerwiseCodec,
    _message_head,
    segment_seed,
)
from qoda.quant.kernels import message as mk
from qoda.quant.kernels.torch_ref import TINY_NORM, TINY_SCALE
from qoda.quant.rng import MIX_M1, MIX_M2, seed_keys

_CRC_FIELD = HEADER_SIZE - 4  # offset of the CRC in a segment header
#: Below this many levels the interval is found by comparing with every level (vectorised);
#: more levels use ``torch.bucketize``.
COMPARE_MAX_LEVELS = 16


def _i32(v: int) -> int:
    """``v mod 2^32`` as a signed int32 value (the hash's constants and keys)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


_M1, _M2 = _i32(MIX_M1), _i32(MIX_M2)


# ---------------------------------------------------------------------------- the compiled bodies
def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 lanes."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` of :mod:`qoda.quant.rng` in int32 lanes (products wrap mod 2^32)."""
    x = x ^ _srl(x, 16)
    x = x * _M1
    x = x ^ _srl(x, 15)
    x = x * _M2
    return x ^ _srl(x, 16)


def _code(
    x: torch.Tensor, i: torch.Tensor, pre: torch.Tensor, inv: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
    lv: torch.Tensor, iw: torch.Tensor, intervals: int, nlev: int,
) -> torch.Tensor:  # fmt: skip
    """int32 code of every coordinate ``x`` (segment index ``i``), as :func:`qoda.quant.kernels.cpu._codes_into`."""
    u = ((x.abs() * pre) * inv).clamp_max(1.0)
    if intervals > 0:
        t = u * float(intervals)
        j = t.to(torch.int32).clamp_max(intervals - 1)
        p = t - j.to(torch.float32)
    else:
        if nlev <= COMPARE_MAX_LEVELS:
            j = (lv[1] <= u).to(torch.int32)
            for k in range(2, nlev):
                j = j + (lv[k] <= u).to(torch.int32)
        else:
            j = torch.bucketize(u, lv[1:nlev], out_int32=True, right=True)
        p = (u - lv[j]) * iw[j]
    h = _mix32(_mix32(i + k1) ^ k2)
    r = _srl(h, 8).to(torch.float32) * (1.0 / (1 << 24))
    j = j + (r < p).to(torch.int32)
    return (j << 1) | ((x < 0) & (j > 0)).to(torch.int32)


def _pack_bytes(codes: list[torch.Tensor], width: int) -> torch.Tensor:
    """Eight code tensors (group positions 0..7) packed LSB-first into ``width`` bytes a group."""
    out = []
    for b in range(width):
        acc = None
        for k in range(8):
            lo, hi = width * k, width * (k + 1)  # bits of code k
            if hi <= 8 * b or lo >= 8 * b + 8:
                continue
            sh = lo - 8 * b
            term = codes[k] << sh if sh >= 0 else codes[k] >> -sh
            acc = term if acc is None else acc | term
        assert acc is not None
        out.append((acc & 255).to(torch.uint8))
    return torch.stack(out, dim=-1)


def _pick(t: torch.Tensor, k: int) -> torch.Tensor:
    """Position ``k`` of a per-group tensor (last dim 8), or the tensor itself if broadcast (last dim 1)."""
    return t[..., k] if t.shape[-1] == 8 else t[..., 0]


def _norms_body(
    x: torch.Tensor, src: torch.Tensor | None, *, bucket: int, linf: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(norms, pre, inv, bad)`` of the buckets of ``x``: its rows (``(nb, bucket)``, zero padded),
    or the rows ``x[src]`` (``x`` flat with one appended zero, ``src`` ``(nb, bucket)``).  Float32 ``||v||_2``
    (float64 sum of squares) or ``||v||_inf``; the tiny-norm scale; ``1 / (norm * pre)`` (0 for
    a zero norm); whether any norm is non-finite (NaN/Inf input or overflow)."""
    xb = x if src is None else x[src]
    norms = xb.abs().amax(dim=1) if linf else xb.double().square().sum(dim=1).sqrt().float()
    pre = torch.where(norms < TINY_NORM, TINY_SCALE, 1.0).to(torch.float32)
    inv = torch.where(norms > 0, 1.0 / (norms * pre), 0.0).to(torch.float32)
    return norms, pre, inv, ~torch.isfinite(norms).all()


def _quantize_pack_body(
    x: torch.Tensor, base: torch.Tensor, pre: torch.Tensor, inv: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
    lv: torch.Tensor, iw: torch.Tensor, *, intervals: int, nlev: int, width: int,
) -> torch.Tensor:  # fmt: skip
    """Packed bytes ``(..., width)`` of the groups of eight coordinates ``x`` (``(..., 8)``, zero
    padded); ``base`` the segment index of each group's first coordinate; ``pre`` / ``inv`` per
    group or per coordinate."""
    xg = x
    codes = [
        _code(xg[..., k], base + k, _pick(pre, k), _pick(inv, k), k1, k2, lv, iw, intervals, nlev) for k in range(8)
    ]
    return _pack_bytes(codes, width)


def _unpack(by: torch.Tensor, width: int) -> list[torch.Tensor]:
    """The eight int32 codes of every group of ``width`` bytes (``by``: ``(..., width)`` uint8)."""
    b = [by[..., q].to(torch.int32) for q in range(width)]
    mask = (1 << width) - 1
    codes = []
    for k in range(8):
        lo = width * k
        q, sh = lo // 8, lo % 8
        c = b[q] >> sh
        if sh + width > 8:
            c = c | (b[q + 1] << (8 - sh))
        codes.append(c & mask)
    return codes


def _check_body(by: torch.Tensor, *, width: int, tail: int, nlev: int) -> torch.Tensor:
    """Whether any code of the packed groups ``by`` is invalid (``1``, a negative zero, or a level
    index ``>= nlev``: :func:`qoda.quant.kernels.cpu.signed_level_table`), or the last ``tail``
    code slots (padding) hold a set bit."""
    codes = _unpack(by, width)
    flag = torch.zeros((), dtype=torch.bool, device=by.device)
    for c in codes:
        flag = flag | ((c == 1) | (c >= 2 * nlev)).any()
    if tail:
        last = torch.stack([c[..., -1:] for c in codes], dim=-1).reshape(-1)  # the last group's codes
        flag = flag | (last[8 - tail :] != 0).any()
    return flag


def _dequantize_body(
    out: torch.Tensor, by: torch.Tensor, scale: torch.Tensor, slv: torch.Tensor, *, width: int, accumulate: bool
) -> None:
    """``out += float32(norm * slv[code])`` (or ``=``) for every code of ``by``: ``(..., 2 width)``
    bytes, two groups of eight codes, so 16 lanes (one AVX-512 vector; eight lanes ran 5x slower)
    per row; ``out``: ``(..., 16)``, or flat and at most as long; ``scale``: the norm per row or
    per coordinate."""
    b = by.to(torch.int64)
    lo, hi = b[..., 0], b[..., width]
    for q in range(1, width):
        lo = lo | (b[..., q] << (8 * q))
        hi = hi | (b[..., width + q] << (8 * q))
    lane = torch.arange(16, device=by.device)
    codes = (torch.where(lane >= 8, hi[..., None], lo[..., None]) >> ((lane % 8) * width)) & ((1 << width) - 1)
    vals = scale * slv[codes]
    if out.dim() == 1:
        vals = vals.reshape(-1)[: out.numel()]
    _accumulate_body(out, vals, accumulate=accumulate)


def _accumulate_body(out: torch.Tensor, vals: torch.Tensor, *, accumulate: bool) -> None:
    """``out += vals`` or ``out = vals``."""
    if accumulate:
        out.add_(vals)
    else:
        out.copy_(vals)


# ---------------------------------------------------------------------------- compilation
def compiler() -> str:
    """``"inductor"`` if ``torch.compile`` can build kernels here (a C++ compiler for the CPU;
    CUDA brings Triton), else ``"eager"`` (the same ops, uncompiled: correct, slow).
    ``QODA_DEVICE_CODEC_EAGER=1`` forces eager."""
    if os.environ.get("QODA_DEVICE_CODEC_EAGER") == "1":
        return "eager"
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None:
        return "eager"
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is None:
        return "eager"
    return "inductor"


def compiled(name: str, **static: object) -> Callable:
    """The body ``name`` with its integer/boolean parameters ``static`` fixed, compiled once per
    process and combination (then cached by Inductor on disk); eager where :func:`compiler` says
    so.  Dim 0 of the tensors is dynamic (:func:`_dynamic`): one compilation serves every size."""
    return _compiled(compiler(), name, tuple(sorted(static.items())))


@functools.cache
def _compiled(mode: str, name: str, static: tuple[tuple[str, object], ...]) -> Callable:
    body = _BODIES[name]
    code = body.__code__
    names = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    consts = {k: v for k, v in static if k in names}  # other keys only separate the caches
    if mode == "eager":
        return functools.partial(body, **consts)
    # a function of its own (own code object, so its own Dynamo cache and recompile budget) with
    # the static parameters as keyword defaults (constants to Dynamo)
    fn = types.FunctionType(code.replace(), body.__globals__, body.__name__, None, body.__closure__)
    fn.__kwdefaults__ = consts
    return torch.compile(fn)


_BODIES: dict[str, Callable] = {
    "norms": _norms_body, "quantize_pack": _quantize_pack_body, "check": _check_body,
    "dequantize": _dequantize_body, "accumulate": _accumulate_body,
}  # fmt: skip


def _dynamic(*ts: torch.Tensor) -> Any:
    """Mark dim 0 of every tensor dynamic (one compilation for every segment size; the inner
    dims stay static, which Inductor vectorises 5-10x better than fully dynamic shapes)."""
    if compiler() != "eager":
        for t in ts:
            if t.dim() and t.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)
    return ts[0] if len(ts) == 1 else ts


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` zero padded to ``n`` elements (``x`` itself, no copy, when it has them)."""
    return x if x.numel() == n else F.pad(x, (0, n - x.numel()))


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Segment:
    """One quantized segment's constants on the device."""

    numel: int
    width: int
    linf: bool
    intervals: int
    nlev: int
    bucket: int
    n_buckets: int
    index: int  # segment index in the message (its seed)
    norms_at: int  # byte offsets in the message
    codes_at: int
    n_bytes: int
    regular: bool
    lv: torch.Tensor  # float32 padded levels
    iw: torch.Tensor  # float32 inverse widths (0 for the top level and the pad)
    slv: torch.Tensor  # float32 signed level per code
    base: torch.Tensor  # int32 segment index of each group's first coordinate: (nb, B/8) regular, (G,) general
    bid: torch.Tensor | None  # general layout: int32 bucket of every (padded) coordinate, (ceil(G/2), 16)
    src: torch.Tensor | None  # general layout: int32 gather index of the padded bucket rows (nb, B)

    @property
    def groups(self) -> int:
        return -(-self.numel // 8)


@dataclass(frozen=True)
class DeviceLayout:
    """:class:`~qoda.codec.fused.MessageLayout` plus its segments' constants on ``device``."""

    host: fused.MessageLayout
    segments: tuple[_Segment, ...]
    templates: tuple[tuple[int, int, torch.Tensor], ...]  # (start, end, bytes) of every header template
    check_at: torch.Tensor  # int64 positions of every template byte a receiver compares (CRC fields excluded)
    check_bytes: torch.Tensor  # uint8 their expected values


def _regular(starts: np.ndarray, bucket: int) -> bool:
    """Whether every bucket but the last is ``bucket`` long, a multiple of 16 (rows of buckets)."""
    n = int(starts[-1])
    if bucket == 0 or bucket % 16 or len(starts) < 2:
        return False
    return len(starts) == -(-n // bucket) + 1 and bool((starts[:-1] == np.arange(0, n, bucket)).all())


def _build_segment(row: np.ndarray, host: fused.MessageLayout, dev: torch.device) -> _Segment:
    n, width = int(row[mk.M_NUMEL]), int(row[mk.M_WIDTH])
    starts = host.starts[row[mk.M_ST_LO] : row[mk.M_ST_HI]]
    nb = len(starts) - 1
    bucket = int(max(np.diff(starts).max(initial=1), 1))
    lv = host.lvs[row[mk.M_LV_LO] : row[mk.M_LV_HI]]
    iw = host.iws[row[mk.M_LV_LO] : row[mk.M_LV_HI]]
    slv = host.slvs[row[mk.M_SLV_LO] : row[mk.M_SLV_HI]]
    g = -(-n // 8)
    full_bucket = int(np.diff(starts).max(initial=0))
    regular = _regular(starts, full_bucket)
    bid = src = None
    if regular:
        bucket = full_bucket
        base = torch.arange(nb, dtype=torch.int32)[:, None] * bucket + torch.arange(0, bucket, 8, dtype=torch.int32)
    else:
        base = torch.arange(g, dtype=torch.int32) * 8
        ids = np.full(16 * -(-g // 2), nb, dtype=np.int32)  # padding: the dummy bucket nb (norm 0)
        ids[:n] = np.repeat(np.arange(nb, dtype=np.int32), np.diff(starts))
        bid = torch.from_numpy(ids).view(-1, 16)
        longest = max(full_bucket, 1)
        pos = starts[:-1, None] + np.arange(longest)[None, :]
        src = torch.from_numpy(np.where(pos < starts[1:, None], pos, n).astype(np.int32))
        bucket = longest
    return _Segment(
        numel=n, width=width, linf=bool(row[mk.M_NORM_KIND]), intervals=int(row[mk.M_INTERVALS]),
        nlev=len(lv) - 1, bucket=bucket, n_buckets=nb, index=int(row[mk.M_INDEX]),
        norms_at=int(row[mk.M_NORMS]), codes_at=int(row[mk.M_CODES]), n_bytes=(n * width + 7) // 8,
        regular=regular, lv=torch.from_numpy(lv.copy()).to(dev), iw=torch.from_numpy(iw.copy()).to(dev),
        slv=torch.from_numpy(slv.copy()).to(dev), base=base.to(dev),
        bid=None if bid is None else bid.to(dev), src=None if src is None else src.to(dev),
    )  # fmt: skip


def build_device_layout(host: fused.MessageLayout, dev: torch.device) -> DeviceLayout:
    """The device constants of a message layout (built once per plan and pieces, then cached)."""
    segs, templates, at, expect = [], [], [], []
    for s in range(host.meta.shape[0]):
        row = host.meta[s]
        h, lo, hi = int(row[mk.M_HDR]), int(row[mk.M_TMPL_LO]), int(row[mk.M_TMPL_HI])
        tm = host.tmpl[lo:hi]
        templates.append((h, h + tm.size, torch.from_numpy(tm.copy()).to(dev)))
        keep = np.r_[0:_CRC_FIELD, HEADER_SIZE : tm.size]
        at.append(h + keep)
        expect.append(tm[keep])
        if row[mk.M_NUMEL] >= 0:
            segs.append(_build_segment(row, host, dev))
    return DeviceLayout(
        host, tuple(segs), tuple(templates),
        torch.from_numpy(np.concatenate(at).astype(np.int64)).to(dev),
        torch.from_numpy(np.concatenate(expect).astype(np.uint8)).to(dev),
    )  # fmt: skip


# ---------------------------------------------------------------------------- host crossings
def to_host(t: torch.Tensor) -> np.ndarray:
    """The one place the device path moves bytes to the host: a uint8 message (for its CRCs) or a
    message header.  A view (no copy) for a CPU tensor."""
    return t.detach().cpu().numpy() if t.device.type != "cpu" else t.detach().numpy()


def _flag(t: torch.Tensor) -> bool:
    """A status scalar to the host (one sync)."""
    return bool(t.item())


# ---------------------------------------------------------------------------- the codec
class DeviceCodec:
    """Encode / decode layer-wise messages of ``codec`` on the tensors' device (see the module docstring).

    Same API as the flat-buffer methods of :class:`~qoda.codec.layerwise.LayerwiseCodec`, with
    device tensors: :meth:`encode_flats` returns an :class:`EncodedMessage` whose ``data`` is a
    uint8 tensor on the device; :meth:`decode_flats_into` takes one.
    """

    def __init__(self, codec: LayerwiseCodec, device: torch.device | str) -> None:
        self.codec = codec
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors report their index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._layouts: dict[tuple | None, DeviceLayout | None] = {}
        self._heads: dict[tuple[int, int], tuple[bytes, torch.Tensor]] = {}

    def layout(self, pieces: Sequence[Sequence[int]] | None) -> DeviceLayout | None:
        """The device layout of a message with ``pieces`` (``None``: entropy-coded or wider than 8 bits)."""
        key = None if pieces is None else tuple(tuple(int(n) for n in p) for p in pieces)
        if key not in self._layouts:
            host = self.codec._layout(pieces)
            self._layouts[key] = None if host is None else build_device_layout(host, self.device)
        return self._layouts[key]

    def _head(self, layout: DeviceLayout, tag: int) -> tuple[bytes, torch.Tensor]:
        """The message header of ``layout`` with ``tag`` (fixed per layout): host bytes and device copy."""
        key = (id(layout), tag)
        if key not in self._heads:
            head = _message_head(layout.host.lengths, self.codec.plan_id ^ tag)
            self._heads[key] = (head, torch.frombuffer(bytearray(head), dtype=torch.uint8).to(self.device))
        return self._heads[key]

    # ------------------------------------------------------------------ encode
    def encode_flats(
        self,
        flats: Sequence[torch.Tensor],
        seed: int,
        pieces: Sequence[Sequence[int]] | None = None,
        tag: int = 0,
        out: torch.Tensor | None = None,
    ) -> EncodedMessage:
        """The message of ``flats`` (flat float32 group buffers on the device), bytes equal to
        ``codec.encode_flats``.  ``out``: a reused uint8 device buffer (the message is a view of it)."""
        layout = self.layout(pieces)
        if layout is None or not self._suits(layout, flats):
            return self._host_encode(flats, seed, pieces, tag, out)
        host = layout.host
        buf = torch.empty(host.size, dtype=torch.uint8, device=self.device) if out is None else out[: host.size]
        head = self._head(layout, tag)[1]
        buf[: head.numel()] = head
        for lo, hi, tm in layout.templates:
            buf[lo:hi] = tm
        failed = torch.zeros((), dtype=torch.bool, device=self.device)
        quantized = [k for k in range(len(flats)) if self.codec.groups[k].config is not None]
        for seg, k in zip(layout.segments, quantized, strict=True):
            failed = failed | self._encode_segment(seg, flats[k], seed, buf)
        if host.raw is not None:
            k, at = host.raw
            buf[at : at + 4 * host.numels[k]] = flats[k].view(torch.uint8)
        if _flag(failed):  # NaN/Inf or a norm overflow: the host path raises the precise error
            return self._host_encode(flats, seed, pieces, tag, out)
        self._seal(host, buf)
        seg_bits = {g.name: b for g, b in zip(self.codec.groups, host.segment_bits, strict=True)}
        return EncodedMessage(buf, host.bits, seg_bits, host.framing_bits)  # type: ignore[arg-type]

    def _suits(self, layout: DeviceLayout, flats: Sequence[torch.Tensor]) -> bool:
        return len(flats) == len(layout.host.numels) and all(
            f.dtype == torch.float32 and f.device == self.device and f.dim() == 1 and f.numel() == n
            and f.is_contiguous()
            for f, n in zip(flats, layout.host.numels, strict=True)
        )  # fmt: skip

    def _encode_segment(self, seg: _Segment, x: torch.Tensor, seed: int, buf: torch.Tensor) -> torch.Tensor:
        k1, k2 = seed_keys(segment_seed(seed, seg.index))
        k1t = torch.tensor(_i32(k1), dtype=torch.int32, device=self.device)
        k2t = torch.tensor(_i32(k2), dtype=torch.int32, device=self.device)
        if seg.n_buckets == 0:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        nb, g = seg.n_buckets, seg.groups
        if seg.regular:
            rows = _dynamic(_padded(x, nb * seg.bucket).view(nb, seg.bucket))
            norms, pre, inv, failed = compiled("norms", bucket=seg.bucket, linf=seg.linf)(rows, None)
            xg = _dynamic(rows.view(nb, seg.bucket // 8, 8))
            pre_g, inv_g = _dynamic(pre[:, None, None], inv[:, None, None])
        else:
            assert seg.bid is not None and seg.src is not None
            norms, pre, inv, failed = compiled("norms", bucket=seg.bucket, linf=seg.linf)(
                *_dynamic(F.pad(x, (0, 1)), seg.src)
            )
            xg = _dynamic(_padded(x, 8 * g).view(g, 8))
            ids = seg.bid.view(-1, 8)[:g]
            pre_g, inv_g = _dynamic(F.pad(pre, (0, 1), value=1.0)[ids], F.pad(inv, (0, 1))[ids])
        packed = compiled("quantize_pack", intervals=seg.intervals, nlev=seg.nlev, width=seg.width, rows=seg.regular)(
            xg, _dynamic(seg.base), pre_g, inv_g, k1t, k2t, seg.lv, seg.iw
        )
        buf[seg.norms_at : seg.norms_at + 4 * seg.n_buckets] = norms.view(torch.uint8)
        buf[seg.codes_at : seg.codes_at + seg.n_bytes] = packed.reshape(-1)[: seg.n_bytes]
        return failed

    def _seal(self, host: fused.MessageLayout, buf: torch.Tensor) -> None:
        """Write every segment's CRC-32 (computed on the host from one copy of the message)."""
        data = to_host(buf)
        crcs = [crc32(data[lo:hi], static) for _, lo, hi, static in host.crcs]
        if buf.device.type == "cpu":
            for (at, *_), c in zip(host.crcs, crcs, strict=True):
                struct.pack_into("<I", data, at, c)
            return
        at = torch.tensor([a + q for a, *_ in host.crcs for q in range(4)], device=buf.device)
        vals = np.frombuffer(struct.pack(f"<{len(crcs)}I", *crcs), dtype=np.uint8).copy()
        buf[at] = torch.from_numpy(vals).to(buf.device)

    def _host_encode(
        self, flats: Sequence[torch.Tensor], seed: int, pieces: Sequence[Sequence[int]] | None, tag: int,
        out: torch.Tensor | None,
    ) -> EncodedMessage:  # fmt: skip
        """The CPU codec on host copies (entropy coding, wide codes, the error path)."""
        msg = self.codec.encode_flats([f.detach().cpu() for f in flats], seed, pieces, tag)
        data = torch.from_numpy(msg.data.copy()).to(self.device)
        if out is not None:
            out[: data.numel()] = data
            data = out[: data.numel()]
        return EncodedMessage(data, msg.bits, msg.segment_bits, msg.framing_bits)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ decode
    def decode_flats_into(
        self,
        payload: torch.Tensor,
        flats: Sequence[torch.Tensor],
        accumulate: bool = True,
        pieces: Sequence[Sequence[int]] | None = None,
        tag: int = 0,
    ) -> None:
        """Decode the message ``payload`` (uint8 on the device) into ``flats`` (``+=`` or ``=``),
        as ``codec.decode_flats_into``; on any error nothing is written and the error is the CPU codec's."""
        layout = self.layout(pieces)
        if layout is None or not self._suits(layout, flats) or not self._valid(layout, payload, tag):
            return self._host_decode(payload, flats, accumulate, pieces, tag)
        host = layout.host
        quantized = [k for k in range(len(flats)) if self.codec.groups[k].config is not None]
        for seg, k in zip(layout.segments, quantized, strict=True):
            self._dequantize(seg, payload, flats[k], accumulate)
        if host.raw is not None:
            k, at = host.raw
            vals = payload[at : at + 4 * host.numels[k]].clone().view(torch.float32)
            compiled("accumulate", accumulate=accumulate)(flats[k], vals)

    def _valid(self, layout: DeviceLayout, payload: torch.Tensor, tag: int) -> bool:
        """Every check of the CPU codec: message header, CRCs, segment headers, norms, codes, padding."""
        host = layout.host
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != host.size:
            return False
        if payload.device != self.device:
            return False
        data = to_host(payload)  # the CRCs' bytes
        if data[: host.head_size].tobytes() != self._head(layout, tag)[0]:
            return False
        for at, lo, hi, static in host.crcs:
            if crc32(data[lo:hi], static) != struct.unpack_from("<I", data, at)[0]:
                return False
        bad = (payload[layout.check_at] != layout.check_bytes).any()
        for seg in layout.segments:
            nb = seg.n_buckets
            bits = payload[seg.norms_at : seg.norms_at + 4 * nb].clone().view(torch.int32)
            # negative (sign set), Inf or NaN; -0.0 passes (as the CPU decoder)
            bad = bad | ((bits < 0) & (bits != -(1 << 31))).any() | (bits >= 0x7F800000).any()
            if seg.numel:
                by = _padded(payload[seg.codes_at : seg.codes_at + seg.n_bytes], seg.groups * seg.width)
                check = compiled("check", width=seg.width, tail=8 * seg.groups - seg.numel, nlev=seg.nlev)
                bad = bad | check(_dynamic(by.view(seg.groups, seg.width)))
        return not _flag(bad)

    def _dequantize(self, seg: _Segment, payload: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        if seg.numel == 0:
            return
        nb, w = seg.n_buckets, seg.width
        pairs = -(-seg.groups // 2)  # rows of 16 codes
        norms = payload[seg.norms_at : seg.norms_at + 4 * nb].clone().view(torch.float32)
        by = _padded(payload[seg.codes_at : seg.codes_at + seg.n_bytes], 2 * pairs * w)
        if seg.regular:  # whole buckets as rows; the last (short) bucket as one more call
            per = seg.bucket // 16  # rows of 16 codes per bucket
            full = seg.numel // seg.bucket
            fn = compiled("dequantize", width=w, accumulate=accumulate, rows=True)
            if full:
                m = full * seg.bucket
                by_rows = by[: full * per * 2 * w].view(full, per, 2 * w)
                fn(*_dynamic(out[:m].view(full, per, 16), by_rows, norms[:full, None, None]), seg.slv)
            if full < nb:
                tail = _padded(by[full * per * 2 * w :], per * 2 * w).view(1, per, 2 * w)
                fn(out[full * seg.bucket :], tail, norms[full:, None, None], seg.slv)
        else:
            assert seg.bid is not None
            scale = F.pad(norms, (0, 1))[seg.bid]  # (pairs, 16)
            compiled("dequantize", width=w, accumulate=accumulate, rows=False)(
                *_dynamic(out, by.view(pairs, 2 * w), scale), seg.slv
            )

    def _host_decode(
        self, payload: torch.Tensor, flats: Sequence[torch.Tensor], accumulate: bool,
        pieces: Sequence[Sequence[int]] | None, tag: int,
    ) -> None:  # fmt: skip
        """The CPU codec on a host copy (entropy coding, wide codes, and any failed check: it
        raises the precise error)."""
        tmp = [torch.zeros(f.numel(), dtype=torch.float32) for f in flats]
        self.codec.decode_flats_into(payload.detach().cpu().numpy(), tmp, accumulate=False, pieces=pieces, tag=tag)
        for f, t in zip(flats, tmp, strict=True):
            if accumulate:
                f.add_(t.to(f.device))
            else:
                f.copy_(t.to(f.device))
