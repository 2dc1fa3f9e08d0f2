"""The wire format: segment header and CRC (``format``), fixed-width and rANS segments
(``segment``, ``rans``), exact code lengths (``length``) and layer-wise messages (``layerwise``).

The CRC detects accidents, it does not authenticate: a receiver is protected from out-of-bounds
reads and from unbounded memory or time per payload, not from a peer that forges a valid CRC.
"""

from qoda.codec.format import CodecError
from qoda.codec.layerwise import EncodedMessage, LayerwiseCodec
from qoda.codec.segment import Encoded, decode, decode_into, decode_raw, encode, encode_raw, encode_tensor

__all__ = [
    "CodecError", "Encoded", "EncodedMessage", "LayerwiseCodec", "decode", "decode_into", "decode_raw", "encode",
    "encode_raw", "encode_tensor",
]  # fmt: skip
