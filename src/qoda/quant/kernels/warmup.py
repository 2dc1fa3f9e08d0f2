"""Compiling the CPU kernels before the timed part of a job.

numba compiles a kernel on its first call and keeps the machine code in its on-disk cache
(``__pycache__`` beside the sources, or ``$NUMBA_CACHE_DIR``).  On a cold cache the kernels
of one training job take ~20 s of one core (the fused message encoder ~5 s, its decoder
~15 s per accumulation mode); every process that starts before the cache holds them compiles
them again, at the same time, in its own memory.  :func:`warm_up` makes those first calls on
a tiny message in the calling process, so processes started afterwards load the cached code
(~1 s).  ``qoda train`` calls it in the launcher before its workers start, the test suite
before its multi-process tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from qoda.codec.layerwise import LayerwiseCodec
from qoda.quant.config import Coding, Norm, QuantizerConfig
from qoda.quant.policy import LayerEntry, LayerPlan

#: Seconds a preparation may take before :func:`announce_if_slow` says what is going on.
ANNOUNCE_AFTER = 2.0


def warm_up(codings: Sequence[str] = ("fixed",), accumulate: Sequence[bool] = (True,)) -> None:
    """Compile (or load from the cache) the kernels of the layer-wise codec for ``codings``
    (``fixed``: the fused message kernels; ``entropy``: the per-segment quantizer and rANS
    kernels) and for each decoding mode in ``accumulate`` (``True``: add into the output, as
    every all-gather does; ``False``: write it, two-phase's final gather).

    Runs the production path on a two-layer message (one quantized layer spanning the level
    families' dispatch, one uncompressed), so exactly the signatures a job calls are compiled."""
    for coding in codings:
        config = QuantizerConfig(norm=Norm.LINF, coding=Coding(coding))
        plan = LayerPlan((LayerEntry("w", torch.Size([2048]), "t"), LayerEntry("b", torch.Size([8]), None)),
                         {"t": config})  # fmt: skip
        codec = LayerwiseCodec(plan)
        flats = codec.gather([torch.linspace(-1.0, 1.0, 2048), torch.ones(8)])
        payload = torch.from_numpy(codec.encode_flats(flats, seed=1).data.copy()).numpy()
        for mode in accumulate:
            codec.decode_flats_into(payload, [torch.zeros_like(f) for f in flats], accumulate=mode)


@contextmanager
def announce_if_slow(message: str, write: Callable[[str], None], after: float = ANNOUNCE_AFTER) -> Iterator[None]:
    """Run the block; if it is still running ``after`` seconds later, ``write(message)`` then,
    and ``write`` its duration when it ends (a silent wait of minutes looks like a hang)."""
    start = time.monotonic()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        write(message)

    timer = threading.Timer(after, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if announced.is_set():
            write(f"{message.rstrip('. ')}: done in {time.monotonic() - start:.0f} s")
