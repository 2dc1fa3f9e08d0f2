"""Wire format 2 of layer-wise messages: the status field, failure messages, and the rejection of
version-1 payloads (qoda.codec.layerwise)."""

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qoda.codec import layerwise as lw
from qoda.codec.format import CodecError
from qoda.quant.config import QuantizerConfig
from qoda.quant.policy import LayerPolicy


def _codec(coding="fixed"):
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    return lw.LayerwiseCodec(LayerPolicy.global_(QuantizerConfig.qsgd(4, 128, coding=coding)).plan(model))


def _tensors(codec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(e.shape, generator=g) for e in codec.plan.entries]


def _as_version_1(msg: np.ndarray, n_seg: int) -> np.ndarray:
    """The same message in the version-1 layout: no status, no origin (16-byte head), own CRC."""
    magic, _, _, n, tag, _ = struct.unpack_from("<4sBB2xIII", msg.tobytes())
    head = struct.pack("<4sB3xII", magic, 1, n, tag) + msg[20 : 20 + 8 * n_seg].tobytes()
    head += struct.pack("<I", zlib.crc32(head))
    return np.concatenate([np.frombuffer(head, dtype=np.uint8), msg[lw.message_head_size(n_seg) :]])


def test_a_version_1_message_is_rejected_naming_both_versions():
    codec = _codec()
    msg = codec.encode(_tensors(codec), seed=1).data
    old = _as_version_1(msg, len(codec.groups))
    with pytest.raises(CodecError, match=r"version 1, this build reads version 2.*same qoda release"):
        codec.decode(old)
    assert lw.message_status(old) is None  # not a readable header either


@pytest.mark.parametrize("coding", ["fixed", "entropy"])
def test_a_failure_message_names_its_origin_and_reason(coding):
    codec = _codec(coding)
    size = codec.message_size()
    text = "non-finite value (NaN or Inf) in bucket 3"
    fail = lw.failure_message(len(codec.groups), codec.plan_id, lw.MessageStatus.ENCODE_FAILED, 7, text, size)
    if size is not None:
        assert fail.size == size  # what the receivers expect: the collectives keep their sizes
    assert lw.message_status(fail) == (lw.MessageStatus.ENCODE_FAILED, 7)
    with pytest.raises(lw.SenderFailed, match="rank 7 could not encode: non-finite") as info:
        codec.decode(fail)
    assert (info.value.origin, info.value.status, info.value.text) == (7, lw.MessageStatus.ENCODE_FAILED, text)
    assert isinstance(info.value, CodecError)  # callers that catch CodecError still see it
    # a failure report wins over a settings mismatch (tag), and a good message reports OK
    with pytest.raises(lw.SenderFailed):
        lw.unpack_message(fail, len(codec.groups), codec.plan_id ^ 5)
    ok = codec.encode(_tensors(codec), seed=2).data
    assert lw.message_status(ok) == (lw.MessageStatus.OK, 0)


def test_a_damaged_failure_message_is_still_an_error():
    codec = _codec()
    fail = lw.failure_message(len(codec.groups), codec.plan_id, lw.MessageStatus.DECODE_FAILED, 2, "why", 400)
    head = lw.message_head_size(len(codec.groups))
    status_flip = fail.copy()
    status_flip[5] = 0  # the status is under the header CRC: a flipped status is not "ok"
    with pytest.raises(CodecError, match="header CRC"):
        codec.decode(status_flip)
    text_flip = fail.copy()
    text_flip[head + 4] ^= 0x20  # the reason has its own CRC
    with pytest.raises(lw.SenderFailed, match="damaged in transit"):
        codec.decode(text_flip)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300), size=st.integers(min_value=0, max_value=200), origin=st.integers(0, 2**32 - 1))
def test_failure_text_is_cut_to_fit_on_a_character_boundary(text, size, origin):
    n_seg = 3
    room = lw.message_head_size(n_seg) + 8
    total = room + size
    fail = lw.failure_message(n_seg, 0x1234, lw.MessageStatus.ENCODE_FAILED, origin, text, total)
    assert fail.size == total
    with pytest.raises(lw.SenderFailed) as info:
        lw.unpack_message(fail, n_seg, 0x1234)
    got, sent = info.value.text, lw.printable(text)
    assert sent.startswith(got) and len(got.encode()) <= size and info.value.origin == origin
    assert got.isprintable()
    if len(sent.encode()) <= size:
        assert got == sent


def test_a_failure_message_needs_room_and_a_failure_status():
    with pytest.raises(ValueError, match="size"):
        lw.failure_message(3, 0, lw.MessageStatus.ENCODE_FAILED, 0, "x", lw.message_head_size(3) + 7)
    with pytest.raises(ValueError, match="status"):
        lw.failure_message(3, 0, lw.MessageStatus.OK, 0, "x")


NASTY = "bucket 3\x1b[2J\x1b[31mred\nsecond line\r\x07\x00\u2028\u202e end\t"


def test_control_characters_of_a_reason_are_escaped_when_encoded():
    codec = _codec()
    fail = lw.failure_message(len(codec.groups), codec.plan_id, lw.MessageStatus.ENCODE_FAILED, 3, NASTY, 400)
    with pytest.raises(lw.SenderFailed) as info:
        codec.decode(fail)
    msg = str(info.value)
    assert msg.isprintable() and "\n" not in msg and "\x1b" not in msg, repr(msg)
    assert info.value.text == r"bucket 3\x1b[2J\x1b[31mred\nsecond line\r\x07\x00\u2028\u202e end\t"


def test_control_characters_a_sender_wrote_raw_are_escaped_when_decoded():
    """A reason written by another implementation (or a forged one): raw control characters in
    the payload, a valid CRC. The receiver's error and its text are still one printable line."""
    codec = _codec()
    n_seg = len(codec.groups)
    fail = lw.failure_message(n_seg, codec.plan_id, lw.MessageStatus.DECODE_FAILED, 1, "x", 400)
    raw = NASTY.encode()
    body = struct.pack("<I", len(raw)) + raw + struct.pack("<I", zlib.crc32(raw))
    head = lw.message_head_size(n_seg)
    fail[head:] = 0
    fail[head : head + len(body)] = np.frombuffer(body, dtype=np.uint8)
    with pytest.raises(lw.SenderFailed) as info:
        codec.decode(fail)
    assert str(info.value).isprintable() and info.value.text == lw.printable(NASTY)
    assert lw.printable("plain text, ünïcode and \\ stay") == "plain text, ünïcode and \\ stay"
