"""The step-time model: an alpha-beta model of an exchange and of a training step.

Per iteration a worker computes its oracle calls (``C``) and runs ``x`` exchanges (1 for
Adam/QODA, 2 for the extra-gradient methods).  With ``K`` workers, per-message latency ``alpha``
and link goodput ``beta`` bytes/s, one exchange of protocol ``p`` costs what ``p`` says it costs
(:meth:`qoda.comm.protocol.Protocol.cost`, the same arithmetic as the averagers' own byte
counts): ``latency_terms * alpha + payload_bytes / beta``, plus its codec work
(:meth:`~qoda.comm.protocol.Protocol.codec_work`: ``e`` encodes and ``d`` decodes of the whole
vector per rank) at ``E(n) = 4n / enc`` and ``D(n) = 4n / dec`` for ``n`` parameters (divided
by the CPU share ``s = min(1, cores / K)`` when K processes share fewer cores), and, for
PowerSGD, its compression overhead ``P``::

    fp32, fp16        cost of the ring all-reduce (e = d = 0)
    PowerSGD          cost.powersgd (f floats) + P / s
    allgather         cost(K, [m]) + E(n) + K D(n)                 (every worker decodes all K)
    two_phase         cost(K, K chunks of m / K) + (1 + 1/K) E(n) + 2 D(n)
                      (decode + re-encode the own chunk; chunk headers neglected)
    entropy coding    the same with sized=True (sizes exchanged first: data-dependent),
                      m and the codec speed of the entropy-coded messages

    step = C + x * exchange + x finite-check all-reduces (latency terms of a one-float ring all-reduce)

with ``m`` a quantized message of one worker (bytes) and ``f`` PowerSGD's floats.  ``beta`` is
a link rate times the TCP goodput of a 1500-byte MTU frame, :data:`MTU_GOODPUT`.  The
measurements that feed the model and its validation are ``qoda bench scaling``
(:mod:`qoda.bench.scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qoda.comm import cost
from qoda.comm.protocol import PROTOCOLS

MTU_GOODPUT = 1448 / 1538  # TCP payload per Ethernet frame on a 1500-byte MTU (IP, TCP timestamps, framing)


@dataclass(frozen=True)
class Network:
    alpha: float  # seconds per message
    beta: float  # bytes per second (goodput)

    @classmethod
    def of(cls, rate_mbit: float, alpha: float) -> Network:
        """A link of ``rate_mbit`` Mbit/s (its TCP goodput) and latency ``alpha``."""
        return cls(alpha, rate_mbit * 1e6 / 8 * MTU_GOODPUT)


@dataclass(frozen=True)
class Workload:
    """What one exchange moves and costs.

    ``message_bytes`` keys ending in ``_entropy`` are entropy-coded messages (sizes exchanged
    first, :mod:`qoda.comm.cost`'s ``sized``); ``codec_gbps`` overrides the codec speed
    ``(encode, decode)`` of a key (default ``encode_gbps`` / ``decode_gbps``)."""

    parameters: int  # n
    message_bytes: dict[str, float]  # quantized message per worker, per aggregation config
    powersgd_floats: float  # floats per worker in PowerSGD's all-reduces
    encode_gbps: float  # codec on this model's messages, one uncontended core (GB/s of float32 input)
    decode_gbps: float
    cpu_share: float = 1.0  # cores per worker process when fewer cores than workers (codec runs slower)
    codec_gbps: dict[str, tuple[float, float]] = field(default_factory=dict)
    powersgd_overhead_seconds: float = 0.0  # P: the hook's time beyond its all-reduces, one core per worker


def is_entropy(cfg: str) -> bool:
    return cfg.endswith("_entropy")


def exchange_cost(kind: str, k: int, w: Workload) -> cost.ExchangeCost:
    """Bytes and latency terms of one exchange of ``kind`` (``powersgd``, a registered protocol
    sending plain floats such as ``fp32``, or ``<protocol>:<cfg>`` for a quantized one with
    message ``cfg`` of ``w``) among ``k`` workers, from the measured sizes."""
    if kind == "powersgd":
        return cost.powersgd(k, w.powersgd_floats)
    mode, _, cfg = kind.partition(":")
    proto = PROTOCOLS.get(mode)
    if proto is None or (cfg not in w.message_bytes if proto.quantizes() else bool(cfg)):
        raise ValueError(f"kind: unknown exchange {kind!r}")
    if proto.element_bytes is not None:
        # real-valued: a ring's bytes are a mean over ranks, not rounded down
        return proto.cost(k, [proto.element_bytes * float(w.parameters)])
    return proto.cost(k, proto.model_sizes(k, w.message_bytes[cfg]), sized=is_entropy(cfg))


def exchange_seconds(kind: str, k: int, net: Network, w: Workload) -> float:
    """One exchange of ``kind`` (see :func:`exchange_cost`) among ``k`` workers: network time, the
    protocol's codec work for the quantized ones, PowerSGD's overhead for PowerSGD."""
    if k == 1:
        return 0.0
    network = exchange_cost(kind, k, w).seconds(net.alpha, net.beta)
    if kind == "powersgd":
        return network + w.powersgd_overhead_seconds / w.cpu_share
    mode, _, cfg = kind.partition(":")
    encodes, decodes = PROTOCOLS[mode].codec_work(k)
    if encodes == decodes == 0:
        return network
    enc_gbps, dec_gbps = w.codec_gbps.get(cfg, (w.encode_gbps, w.decode_gbps))
    enc = 4 * w.parameters / (enc_gbps * 1e9 * w.cpu_share)
    dec = 4 * w.parameters / (dec_gbps * 1e9 * w.cpu_share)
    return network + encodes * enc + decodes * dec


def check_latency_terms(k: int) -> int:
    """Latency terms of the finite-gradient check (one small all-reduce per oracle call), and of
    the one-float all-reduce ``alpha`` is fitted from."""
    return cost.ring_allreduce(k, 4).latency_terms


def iteration_seconds(kind: str, exchanges: int, k: int, net: Network, w: Workload, compute: float) -> float:
    """One training iteration: ``compute`` plus ``exchanges`` exchanges of ``kind`` and as many
    finite-gradient checks."""
    checks = exchanges * check_latency_terms(k) * net.alpha
    return compute + exchanges * exchange_seconds(kind, k, net, w) + checks


__all__ = [
    "MTU_GOODPUT", "Network", "Workload", "check_latency_terms", "exchange_cost", "exchange_seconds", "is_entropy",
    "iteration_seconds",
]  # fmt: skip
