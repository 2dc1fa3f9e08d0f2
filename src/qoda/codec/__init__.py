"""The wire format: segment header and CRC (``format``), fixed-width and rANS segments
(``segment``, ``rans``), exact code lengths (``length``), layer-wise messages (``layerwise``), and
the contract every compressor implements (``compressor``; the layer-wise codec, ``topk``).

The CRC detects accidents, it does not authenticate: a receiver is protected from out-of-bounds
reads and from unbounded memory or time per payload, not from a peer that forges a valid CRC.
"""

from qoda.codec.compressor import Compressor, EncodedMessage
from qoda.codec.format import CodecError
from qoda.codec.layerwise import LayerwiseCodec
from qoda.codec.segment import Encoded, decode, decode_into, decode_raw, encode, encode_raw, encode_tensor

__all__ = [
    "CodecError", "Compressor", "Encoded", "EncodedMessage", "LayerwiseCodec", "decode", "decode_into", "decode_raw",
    "encode", "encode_raw", "encode_tensor",
]  # fmt: skip
