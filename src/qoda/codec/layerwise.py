"""Layer-wise messages: every type of a :class:`~qoda.quant.policy.LayerPlan` as its own segment.

A message is the unit a worker sends per round:

    offset size field
    0      4    magic b"QODM"
    4      1    version (2; version 1 had no status and no origin)
    5      1    status (:class:`MessageStatus`): 0 ok; 1 the origin rank could not encode (NaN/Inf
                input, norm overflow, ...); 2 the origin rank could not decode what it received
    6      2    zero
    8      4    number of segments S
    12     4    tag: CRC-32 of the plan fingerprint (the receiver checks it: same layers,
                types and settings), mixed with the chunk index in two-phase aggregation
    16     4    origin: the rank whose failure a failed message reports (0 when ok)
    20     8*S  byte length of each segment (0 in a failed message)
    ..     4    CRC-32 of everything above
    ..          ok: the segments, one per type in plan order (each with its own header and
                CRC), then one raw float32 segment for the uncompressed layers (if any);
                failed: u32 n, n bytes of UTF-8 error text, u32 CRC-32 of the text, zero padding
                (the text is printable: control characters travel escaped, :func:`printable`)

A failed message has the size the receivers expect (:func:`failure_message`), so a rank that
cannot encode still takes part in every collective and every receiver raises
:class:`SenderFailed` naming the origin: failures travel in the payload, with no extra
collective (the status field replaces version 1's failure all-reduce and zero-size messages).

Each type's coordinates form an independent stream with its own levels and, for entropy
coding, its own frequency table ("protocol 1" of docs/method.md, section 2.2).  Seeds of the
segments are derived from the message seed, so one integer reproduces the whole message.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import torch

from qoda.codec import fused
from qoda.codec.compressor import Compressor, EncodedMessage
from qoda.codec.format import DTYPE_CODES, FIELDS, HEADER_SIZE, CodecError, as_bytes_array
from qoda.codec.segment import Encoded, decode_into, encode_raw, encode_tensor, fixed_segment_header
from qoda.quant.config import Coding, QuantizerConfig
from qoda.quant.policy import LayerPlan

MAGIC = b"QODM"
VERSION = 2
_HEAD = struct.Struct("<4sBB2xIII")
_DTYPE_OFFSET = FIELDS["dtype"][0]  # of the segment header
_TEXT = struct.Struct("<I")


class MessageStatus(IntEnum):
    """The status field of a message (offset 5)."""

    OK = 0
    ENCODE_FAILED = 1  # the origin rank could not encode its tensors
    DECODE_FAILED = 2  # the origin rank could not decode a message it received


class SenderFailed(CodecError):
    """A well-formed message that reports a failure on rank ``origin`` (see :class:`MessageStatus`)."""

    def __init__(self, status: MessageStatus, origin: int, text: str) -> None:
        self.status, self.origin, self.text = status, origin, text
        what = "could not encode" if status is MessageStatus.ENCODE_FAILED else "could not decode what it received"
        super().__init__(f"rank {origin} {what}: {text}")


def printable(text: str) -> str:
    """``text`` with every non-printable character (ESC, newlines, other control and format
    characters) replaced by its Python escape (``\\x1b``, ``\\n``): a failure reason written by
    another rank stays one line in messages and logs and cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def fixed_message_bits(plan: LayerPlan) -> int:
    """Bits of one fixed-width message of ``plan`` (every byte on the wire: headers, layer sizes,
    norms, codes, uncompressed tensors).  Entropy-coded types count at their fixed width, an
    upper bound of their data-dependent size.  The measure bit allocation budgets against."""
    configs = {t: replace(c, coding=Coding.FIXED) for t, c in plan.configs.items()}
    size = LayerwiseCodec(LayerPlan(plan.entries, configs)).message_size()
    assert size is not None
    return 8 * size


def segment_seed(seed: int, index: int) -> int:
    """Seed of segment ``index`` of a message with seed ``seed``."""
    return (seed * 0x100000001B3 + index * 0x9E3779B1 + 1) & 0xFFFFFFFFFFFFFFFF


def message_head_size(n_segments: int) -> int:
    """Bytes of a message header with ``n_segments`` segments (CRC included)."""
    return _HEAD.size + 8 * n_segments + 4


def _message_head(
    lengths: Sequence[int], tag: int, status: MessageStatus = MessageStatus.OK, origin: int = 0
) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, int(status), len(lengths), tag & 0xFFFFFFFF, origin & 0xFFFFFFFF)
    head += struct.pack(f"<{len(lengths)}Q", *lengths)
    return head + struct.pack("<I", zlib.crc32(head))


def _frame_message(buf: np.ndarray, lengths: Sequence[int], tag: int) -> None:
    """Write the message header in front of segments already in place in ``buf``."""
    head = _message_head(lengths, tag)
    buf[: len(head)] = np.frombuffer(head, dtype=np.uint8)


def pack_message(segments: Sequence[Encoded], tag: int) -> np.ndarray:
    """Concatenate segments behind a message header (see the module docstring)."""
    head = _message_head([len(s) for s in segments], tag)
    return np.concatenate([np.frombuffer(head, dtype=np.uint8), *(s.data for s in segments)])


def failure_message(
    n_segments: int, tag: int, status: MessageStatus, origin: int, text: str, size: int | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """A message reporting that rank ``origin`` failed (``status``), ``size`` bytes long (the size
    the receivers expect; ``None``: as short as the text allows).  The text is made
    :func:`printable`, then cut to fit."""
    if status is MessageStatus.OK:
        raise ValueError("status: a failure message needs a failure status")
    head = _message_head([0] * n_segments, tag, status, origin)
    room = None if size is None else size - len(head) - 2 * _TEXT.size
    if room is not None and room < 0:
        raise ValueError(f"size: {size} bytes cannot hold a failure message of {n_segments} segments")
    raw = printable(text).encode("utf-8", "replace")
    if room is not None and len(raw) > room:
        raw = raw[:room].decode("utf-8", "ignore").encode()  # cut on a character boundary
    body = _TEXT.pack(len(raw)) + raw + _TEXT.pack(zlib.crc32(raw))
    total = len(head) + len(body) if size is None else size
    buf = np.zeros(total, dtype=np.uint8) if out is None else out[:total]
    if out is not None:
        buf[:] = 0
    buf[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    buf[len(head) : len(head) + len(body)] = np.frombuffer(body, dtype=np.uint8)
    return buf


def _failure_text(buf: np.ndarray, end: int) -> str:
    if buf.size < end + 2 * _TEXT.size:
        return "(no reason: the message is truncated)"
    (n,) = _TEXT.unpack_from(buf[end : end + 4].tobytes())
    if buf.size < end + 8 + n:
        return "(no reason: the message is truncated)"
    raw = buf[end + 4 : end + 4 + n].tobytes()
    (crc,) = _TEXT.unpack_from(buf[end + 4 + n : end + 8 + n].tobytes())
    if zlib.crc32(raw) != crc:
        return "(its reason was damaged in transit)"
    return printable(raw.decode("utf-8", "replace"))  # whatever the sender wrote


def message_status(payload: object) -> tuple[MessageStatus, int] | None:
    """``(status, origin)`` of a message whose header is intact, else ``None`` (no other checks)."""
    buf = as_bytes_array(payload)
    if buf.size < _HEAD.size + 4:
        return None
    magic, version, status, n_seg, _, origin = _HEAD.unpack_from(buf[: _HEAD.size].tobytes())
    end = message_head_size(n_seg)
    if magic != MAGIC or version != VERSION or buf.size < end or status not in MessageStatus._value2member_map_:
        return None
    (crc,) = struct.unpack_from("<I", buf[end - 4 : end].tobytes())
    return (MessageStatus(status), origin) if zlib.crc32(buf[: end - 4]) == crc else None


def unpack_message(payload: object, n_segments: int, tag: int) -> list[np.ndarray]:
    """Validate a message header against the receiver's expectations; return the segments.

    Raises :class:`SenderFailed` for a well-formed failure message (checked before the tag: a
    failure report wins over a settings mismatch), :class:`CodecError` for anything else."""
    buf = as_bytes_array(payload)
    if buf.size < _HEAD.size + 4:
        raise CodecError(f"message truncated: {buf.size} bytes")
    magic, version, status, n_seg, got_tag, origin = _HEAD.unpack_from(buf[: _HEAD.size].tobytes())
    if magic != MAGIC:
        raise CodecError(f"message: bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(
            f"message: wire format version {version}, this build reads version {VERSION} "
            "(every rank must run the same qoda release)"
        )
    end = message_head_size(n_seg)
    if n_seg != n_segments or buf.size < end:
        raise CodecError(f"message: {n_seg} segments, this receiver expects {n_segments} (or truncated)")
    (crc,) = struct.unpack_from("<I", buf[end - 4 : end].tobytes())
    if zlib.crc32(buf[: end - 4]) != crc:
        raise CodecError("message corrupted: header CRC mismatch")
    if status != MessageStatus.OK:
        if status not in MessageStatus._value2member_map_:
            raise CodecError(f"message: unknown status {status}")
        raise SenderFailed(MessageStatus(status), origin, _failure_text(buf, end))
    if got_tag != tag & 0xFFFFFFFF:
        raise CodecError(
            "message was encoded with a different layer plan (layers, shapes, types or quantizer "
            f"settings differ across ranks: tag {got_tag:08x}, this receiver {tag & 0xFFFFFFFF:08x})"
        )
    lengths = struct.unpack_from(f"<{n_seg}Q", buf[_HEAD.size : end - 4].tobytes())
    if end + sum(lengths) != buf.size:
        raise CodecError(f"message truncated or padded: segments need {end + sum(lengths)} bytes, got {buf.size}")
    out, pos = [], end
    for n in lengths:
        out.append(buf[pos : pos + n])
        pos += n
    return out


@dataclass(frozen=True)
class Group:
    """The layers of one type (``config``), or the uncompressed layers (``config=None``)."""

    name: str
    config: QuantizerConfig | None
    indices: tuple[int, ...]  # plan entries, in order
    numels: tuple[int, ...]  # their sizes

    @property
    def numel(self) -> int:
        return sum(self.numels)


class LayerwiseCodec(Compressor):
    """Encode/decode the gradients of a model following a :class:`LayerPlan` (a
    :class:`~qoda.codec.compressor.Compressor`: stateless, fixed message size unless entropy-coded).

    Works on one flat float32 buffer per group (:attr:`groups`); :meth:`encode` and
    :meth:`decode_into` also accept per-layer tensors in plan order.
    """

    def __init__(self, plan: LayerPlan) -> None:
        self.plan = plan
        numels = [e.numel for e in plan.entries]
        groups = []
        for t in plan.types:
            idx = tuple(plan.indices(t))
            groups.append(Group(t, plan.configs[t], idx, tuple(numels[i] for i in idx)))
        raw = tuple(plan.indices(None))
        if raw:
            groups.append(Group("", None, raw, tuple(numels[i] for i in raw)))
        self.groups: tuple[Group, ...] = tuple(groups)
        self.plan_id = zlib.crc32(plan.fingerprint().encode())
        self._layouts: dict[tuple[tuple[int, ...], ...] | None, fused.MessageLayout | None] = {}

    def __repr__(self) -> str:
        return f"LayerwiseCodec(plan {self.plan_id:08x})"

    @property
    def types(self) -> tuple[str, ...]:
        return self.plan.types

    # ------------------------------------------------------------------ flat buffers
    def gather(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One flat float32 buffer per group from per-layer tensors (plan order)."""
        self.check_tensors(tensors)
        return [torch.cat([tensors[i].detach().reshape(-1).float() for i in g.indices]) for g in self.groups]

    def scatter(self, flats: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], accumulate: bool) -> None:
        """Write (or add) group buffers back into per-layer tensors."""
        for g, flat in zip(self.groups, flats, strict=True):
            for i, part in zip(g.indices, flat.split(list(g.numels)), strict=True):
                target = outs[i]  # any strides: logical (row-major) order, as gather() reads it
                src = part.to(target.device, target.dtype).view(target.shape)
                if accumulate:
                    target.add_(src)
                else:
                    target.copy_(src)

    def message_size(self, pieces: Sequence[Sequence[int]] | None = None) -> int | None:
        """Exact byte size of a message (``None`` if a group is entropy-coded: data-dependent)."""
        total = message_head_size(len(self.groups))
        for k, g in enumerate(self.groups):
            numels = g.numels if pieces is None else pieces[k]
            if g.config is None:
                total += HEADER_SIZE + 8 * len(numels) + 4 * int(sum(numels))
            elif g.config.coding is Coding.FIXED:
                total += fixed_segment_header(g.config, torch.float32, numels).size
            else:
                return None
        return total

    def encode_flats(
        self,
        flats: Sequence[torch.Tensor],
        seed: int,
        pieces: Sequence[Sequence[int]] | None = None,
        tag: int = 0,
        out: np.ndarray | None = None,
    ) -> EncodedMessage:
        """A message of one segment per group buffer; ``pieces[k]`` overrides group k's layer sizes
        (for a chunk of the group).

        With fixed-width (or raw) groups every segment is encoded in place into one buffer:
        ``out`` if given (reused across steps by the aggregator; the message is then a view of
        it, valid until the next call), else a fresh one - by one kernel call for the whole
        message (:mod:`qoda.codec.fused`) when the groups are CPU float32 buffers of at most
        8-bit codes.  Entropy-coded groups are encoded separately and concatenated.
        """
        layout = self._layout(pieces)
        if layout is not None:
            buf = self._message_buffer(layout.size, out)
            if fused.encode_into(layout, flats, seed, buf):
                _frame_message(buf, layout.lengths, self.plan_id ^ tag)
                seg_bits = {g.name: b for g, b in zip(self.groups, layout.segment_bits, strict=True)}
                return EncodedMessage(buf, layout.bits, seg_bits, layout.framing_bits)
        return self.encode_flats_reference(flats, seed, pieces, tag, out)

    def _layout(self, pieces: Sequence[Sequence[int]] | None) -> fused.MessageLayout | None:
        """The fused layout of a message with ``pieces`` (built once per pieces, then cached)."""
        key = None if pieces is None else tuple(tuple(int(n) for n in p) for p in pieces)
        if key not in self._layouts:
            configs = [g.config for g in self.groups]
            sizes = [g.numels for g in self.groups] if key is None else key
            if len(sizes) != len(configs):
                return None
            self._layouts[key] = fused.build_layout(configs, sizes, message_head_size(len(self.groups)))
        return self._layouts[key]

    @staticmethod
    def _message_buffer(size: int, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.empty(size, dtype=np.uint8)
        if out.dtype != np.uint8 or out.ndim != 1 or out.size < size:
            raise ValueError(f"out: need a 1-D uint8 array of at least {size} bytes")
        return out[:size]

    def encode_flats_reference(
        self,
        flats: Sequence[torch.Tensor],
        seed: int,
        pieces: Sequence[Sequence[int]] | None = None,
        tag: int = 0,
        out: np.ndarray | None = None,
    ) -> EncodedMessage:
        """:meth:`encode_flats` segment by segment (``encode_tensor`` / ``encode_raw``): the
        reference the fused path must match byte for byte, and its fallback."""
        size = self.message_size(pieces)
        if size is None:
            buf = None
        elif out is None:
            buf = np.empty(size, dtype=np.uint8)
        else:
            if out.dtype != np.uint8 or out.ndim != 1 or out.size < size:
                raise ValueError(f"out: need a 1-D uint8 array of at least {size} bytes")
            buf = out[:size]
        pos = message_head_size(len(self.groups))
        segs: list[Encoded] = []
        for k, (g, flat) in enumerate(zip(self.groups, flats, strict=True)):
            numels = g.numels if pieces is None else pieces[k]
            dest = None if buf is None else buf[pos:]
            if g.config is None:
                seg = encode_raw(flat, layer_numels=numels)
                if dest is not None:
                    dest[: len(seg)] = seg.data
            else:
                seg = encode_tensor(flat, g.config, segment_seed(seed, k), layer_numels=numels, out=dest)
            segs.append(seg)
            pos += len(seg)
        if buf is None:
            data = pack_message(segs, self.plan_id ^ tag)
        else:
            data = buf
            _frame_message(data, [len(sg) for sg in segs], self.plan_id ^ tag)
        head = 8 * (data.size - sum(len(sg) for sg in segs))
        bits = head + sum(sg.bits for sg in segs)
        n_layers = sum(len(p) for p in (pieces if pieces is not None else [g.numels for g in self.groups]))
        framing = head + len(segs) * 8 * HEADER_SIZE + 64 * n_layers
        return EncodedMessage(data, bits, {g.name: sg.bits for g, sg in zip(self.groups, segs, strict=True)}, framing)

    def decode_flats_into(
        self,
        payload: object,
        flats: Sequence[torch.Tensor],
        accumulate: bool = True,
        pieces: Sequence[Sequence[int]] | None = None,
        tag: int = 0,
    ) -> None:
        """Decode straight into group buffers (fused).  A corrupt segment raises; segments
        before it may already be in ``flats``, so callers decode into scratch buffers."""
        segs = unpack_message(payload, len(self.groups), self.plan_id ^ tag)
        layout = self._layout(pieces)
        lengths = [seg.size for seg in segs]  # as the header declares them
        if layout is not None and fused.decode_into(layout, as_bytes_array(payload), flats, accumulate, lengths):
            return  # one kernel call; on any failed check it wrote nothing and the loop below raises
        for k, (g, seg, flat) in enumerate(zip(self.groups, segs, flats, strict=True)):
            numels = g.numels if pieces is None else pieces[k]
            # messages carry float32 group buffers only (gather() casts); any other source-dtype
            # field is damage (checked on the byte: the segment's CRC is verified by decode_into)
            if seg.size > _DTYPE_OFFSET and int(seg[_DTYPE_OFFSET]) != DTYPE_CODES[torch.float32]:
                raise CodecError(f"segment {k}: source dtype field {int(seg[_DTYPE_OFFSET])}, messages carry float32")
            decode_into(seg, g.config, flat, accumulate=accumulate, layer_numels=numels)

    # ------------------------------------------------------------------ per-layer API
    def check_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.plan.entries):
            raise ValueError(
                f"tensors: expected {len(self.plan.entries)} tensors (one per plan entry), got {len(tensors)}"
            )
        for i, (t, e) in enumerate(zip(tensors, self.plan.entries, strict=True)):
            if t.numel() != e.numel:
                raise ValueError(self._mismatch(i, t))

    def _mismatch(self, i: int, t: torch.Tensor) -> str:
        """Why tensor ``i`` does not fit the plan: what was passed (its shape, and the plan entries
        of that shape, the tensor it most likely is) against the entry the plan expects there."""
        e = self.plan.entries[i]
        like = [f.name for f in self.plan.entries if f.shape == t.shape]
        passed = f"tensor {i} has shape {tuple(t.shape)} ({t.numel()} elements)"
        if like:
            passed += f", the shape of {' or '.join(like[:3])}{' or others' if len(like) > 3 else ''}"
        order = ", ".join(f.name for f in self.plan.entries[:4]) + (", ..." if len(self.plan.entries) > 4 else "")
        return (f"tensors: {passed}, where the plan has {e.name} (shape {tuple(e.shape)}, {e.numel} elements): "
                f"pass the tensors in the plan's order ({order})")  # fmt: skip

    def encode(self, tensors: Sequence[torch.Tensor], seed: int, out: np.ndarray | None = None) -> EncodedMessage:
        """One message for ``tensors`` (one per plan entry, in plan order), into ``out`` if given."""
        return self.encode_flats(self.gather(tensors), seed, out=out)

    def decode_into(self, payload: object, outs: Sequence[torch.Tensor], accumulate: bool = True) -> None:
        """Add (or write) the decoded layers into ``outs``; on any error nothing is written."""
        self.check_tensors(outs)
        flats = [torch.empty(g.numel, dtype=torch.float32) for g in self.groups]
        self.decode_flats_into(payload, flats, accumulate=False)
        self.scatter(flats, outs, accumulate)

    def decode(self, payload: object) -> list[torch.Tensor]:
        """The decoded layers (float32, in plan shapes)."""
        outs = [torch.zeros(e.shape, dtype=torch.float32) for e in self.plan.entries]
        self.decode_into(payload, outs, accumulate=False)
        return outs
