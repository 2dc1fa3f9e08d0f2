"""``qoda bench codec``: quantize+encode and decode+accumulate throughput, one thread.

All figures are GB/s of float32 input, measured side by side in one run with a memcpy
(copy into a preallocated tensor) and the eager-torch QSGD path, so that ratios survive a
noisy shared machine.  Each figure is the best of ``repeats`` timed calls after a warm-up.

``encode`` writes into a reused buffer, as the aggregator does (its send buffer lives across
steps); ``encode_fresh_buffer`` allocates the message on every call, which with glibc's
malloc means an ``mmap`` and a page fault per fresh 4 KiB page for large messages (the
allocator is recorded in every report: ``LD_PRELOAD`` of tcmalloc/jemalloc changes it).
Decoding accumulates into a preallocated float32 buffer.

The ``model`` rows time whole layer-wise messages of the default ``qoda train`` model (the
DCGAN pair on MNIST, its layer plan with the default per-tensor bit allocation and levels
fitted to synthetic gradients of the right shapes): one allgather message, and the ``K = 4``
two-phase chunk messages (their encode / decode times summed, so the GB/s cover the same
floats).  Their ratio to the 16M-float 4-bit row is the cost of many small segments.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
import torch

from qoda.codec.segment import decode_into, encode_tensor
from qoda.quant.config import QuantizerConfig
from qoda.quant.kernels import torch_ref
from qoda.quant.quantizer import bucket_starts, level_tables
from qoda.utils.system import allocator


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def default_model_codec(seed: int = 0):  # type: ignore[no-untyped-def]
    """``(LayerwiseCodec, group buffers)`` of the default ``qoda train`` configuration: its models,
    its layer plan after the first re-fit (per-tensor widths, fitted levels) on synthetic
    gradients (normal, a different scale per tensor)."""
    from torch import nn

    from qoda.codec.layerwise import LayerwiseCodec, fixed_message_bits
    from qoda.quant.adapt import LevelAdapter
    from qoda.train.compression import adapt_config, layer_plan, resolve_allocation
    from qoda.train.config import TrainConfig
    from qoda.train.trainer import build_models

    cfg = TrainConfig()
    torch.manual_seed(seed)
    generator, critic = build_models(cfg, 1)  # MNIST: one channel
    players = nn.ModuleDict({"generator": generator, "critic": critic})
    base = layer_plan(cfg, players)
    adapter = LevelAdapter(base, adapt_config(resolve_allocation(cfg, base)), message_bits=fixed_message_bits)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=g) * 10.0 ** -(1 + i % 3) for i, p in enumerate(players.parameters())]
    adapter.observe(0, grads)
    adapter.refit(0, force=True)
    codec = LayerwiseCodec(adapter.plan)
    return codec, codec.gather(grads)


def model_message_rows(repeats: int, seed: int = 0, k: int = 4) -> list[dict]:
    """Encode / decode+accumulate GB/s of the default model's allgather message and of its
    ``k`` two-phase chunk messages (see the module docstring)."""
    from qoda.comm.exchanges import TwoPhaseExchange

    codec, flats = default_model_codec(seed)
    numel = sum(f.numel() for f in flats)
    gb = 4 * numel / 1e9
    size = codec.message_size()
    assert size is not None
    buf = np.empty(size, dtype=np.uint8)
    msg = codec.encode_flats(flats, seed, out=buf).data.copy()
    acc = [torch.zeros_like(f) for f in flats]
    te = _best(lambda: codec.encode_flats(flats, seed, out=buf), repeats)
    td = _best(lambda: codec.decode_flats_into(msg, acc, accumulate=True), repeats)
    segments = len(codec.groups)
    rows = [{"message": "allgather", "numel": numel, "segments": segments, "encode_gbps": gb / te,
             "decode_gbps": gb / td, "bits_per_coord": 8 * size / numel}]  # fmt: skip
    layout = TwoPhaseExchange.layout(codec, k)  # the protocol's own chunks
    pieces = layout.pieces
    chunks = [layout.part(flats, c) for c in range(k)]
    sizes = [codec.message_size(p) for p in pieces]
    bufs = [np.empty(n or 0, dtype=np.uint8) for n in sizes]
    msgs = [codec.encode_flats(chunks[c], seed, pieces[c], tag=c + 1).data.copy() for c in range(k)]
    accs = [[torch.zeros_like(x) for x in chunk] for chunk in chunks]

    def encode_all() -> None:
        for c in range(k):
            codec.encode_flats(chunks[c], seed, pieces[c], tag=c + 1, out=bufs[c])

    def decode_all() -> None:
        for c in range(k):
            codec.decode_flats_into(msgs[c], accs[c], accumulate=True, pieces=pieces[c], tag=c + 1)

    te, td = _best(encode_all, repeats), _best(decode_all, repeats)
    rows.append({"message": f"two_phase K={k} chunks", "numel": numel, "segments": segments * k,
                 "encode_gbps": gb / te, "decode_gbps": gb / td,
                 "bits_per_coord": 8 * sum(m.size for m in msgs) / numel})  # fmt: skip
    return rows


def eager_qsgd(x: torch.Tensor, s: int, bucket: int) -> torch.Tensor:
    """Textbook QSGD in eager torch (torch.rand, L2 buckets): what a user would write by hand."""
    pad = (-x.numel()) % bucket
    v = torch.nn.functional.pad(x, (0, pad)).view(-1, bucket)
    norm = v.norm(dim=1, keepdim=True)
    scaled = v.abs() / norm.clamp_min(1e-30) * s
    low = scaled.floor()
    xi = low + (torch.rand_like(scaled) < scaled - low)
    return (norm * v.sign() * xi / s).view(-1)[: x.numel()]


def device_path_row(x: torch.Tensor, bits: int, bucket_size: int, seed: int, repeats: int) -> dict:
    """Encode (into a reused device buffer) and decode+accumulate GB/s of the device codec
    (:mod:`qoda.codec.device`) on ``x``'s device, one ``bits``-wide QSGD layer; the first call of
    each (compilation) is timed apart.  Checks its bytes against the numba kernels' on the way."""
    from qoda.codec.device import DeviceCodec, compiler
    from qoda.codec.layerwise import LayerwiseCodec
    from qoda.quant.policy import LayerEntry, LayerPlan

    n = x.numel()
    cfg = QuantizerConfig.qsgd(bits, bucket_size)
    codec = LayerwiseCodec(LayerPlan((LayerEntry("x", torch.Size([n]), "t"),), {"t": cfg}))
    dc = DeviceCodec(codec, x.device)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    buf = torch.empty(int(codec.message_size() or 0), dtype=torch.uint8, device=x.device)
    acc = [torch.zeros_like(x)]
    t = time.perf_counter()
    msg = dc.encode_flats([x], seed, out=buf).data.clone()
    dc.decode_flats_into(msg, acc)
    sync()
    first = time.perf_counter() - t
    if x.device.type == "cpu":  # the numba kernels' bytes (on a GPU: tests/test_device_codec.py runs on CPU)
        assert np.array_equal(msg.numpy(), codec.encode_flats([x], seed).data), "device path bytes differ from numba"

    def timed(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> None:
            fn()
            sync()

        return run

    gb = 4 * n / 1e9
    te = _best(timed(lambda: dc.encode_flats([x], seed, out=buf)), repeats)
    td = _best(timed(lambda: dc.decode_flats_into(msg, acc)), repeats)
    return {"path": f"device ({x.device.type}, {compiler()})", "coding": "fixed", "bits": bits,
            "encode_gbps": gb / te, "decode_gbps": gb / td, "first_call_seconds": first,
            "bits_per_coord": 8 * msg.numel() / n}  # fmt: skip


def run_device_codec_bench(numel: int = 1 << 24, repeats: int = 5, bucket_size: int = 1024, seed: int = 0) -> dict:
    """``qoda bench codec --device cuda``: the device path on the GPU against a device-to-device copy."""
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g).to(dev)
    out = torch.empty_like(x)
    gb = 4 * numel / 1e9

    def copy() -> None:
        out.copy_(x)
        torch.cuda.synchronize()

    d2d = gb / _best(copy, repeats)
    rows = [device_path_row(x, bits, bucket_size, seed, repeats) for bits in (2, 4, 8)]
    d2d = max(d2d, gb / _best(copy, repeats))
    for r in rows:
        r["encode_vs_copy"], r["decode_vs_copy"] = r["encode_gbps"] / d2d, r["decode_gbps"] / d2d
    return {"benchmark": "codec_device", "device": torch.cuda.get_device_name(dev), "numel": numel,
            "bucket_size": bucket_size, "torch": torch.__version__, "copy_gbps": d2d, "rows": rows}  # fmt: skip


def format_device_codec(res: dict) -> str:
    lines = [
        f"device codec on {res['device']}, {res['numel']:,} float32; device-to-device copy {res['copy_gbps']:.1f} GB/s",
        "",
        "| bits | encode GB/s | decode GB/s | encode/copy | decode/copy | first call s | bits/coord |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['bits']} | {r['encode_gbps']:.2f} | {r['decode_gbps']:.2f} | {r['encode_vs_copy']:.3f} | "
            f"{r['decode_vs_copy']:.3f} | {r['first_call_seconds']:.1f} | {r['bits_per_coord']:.3f} |"
        )
    return "\n".join(lines)


def run_codec_bench(numel: int = 1 << 24, repeats: int = 5, bucket_size: int = 1024, seed: int = 0) -> dict:
    if numel < 1 or repeats < 1:
        raise ValueError("numel and repeats must be positive")
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    out = torch.empty(numel)
    gb = 4 * numel / 1e9
    memcpy_before = gb / _best(lambda: out.copy_(x), repeats)

    cfg4 = QuantizerConfig.qsgd(4, bucket_size)
    tabs = level_tables(cfg4.levels)
    starts = torch.tensor(bucket_starts([numel], bucket_size))
    lv, iw = torch.tensor(tabs.levels), torch.tensor(tabs.inv_width)
    codes, norms = torch_ref.quantize_codes(x, starts, lv, iw, tabs.intervals, False, seed)
    torch_path = gb / _best(lambda: torch_ref.quantize_codes(x, starts, lv, iw, tabs.intervals, False, seed), 1)
    eager_enc = gb / _best(lambda: eager_qsgd(x, 7, bucket_size), max(1, repeats // 2))
    eager_dec = gb / _best(lambda: torch_ref.dequantize_codes(codes, starts, norms, lv), max(1, repeats // 2))

    rows = []
    for coding in ("fixed", "entropy"):
        for bits in (2, 4, 8):
            cfg = QuantizerConfig.qsgd(bits, bucket_size, coding=coding)
            enc = encode_tensor(x, cfg, seed)
            te_fresh = _best(lambda cfg=cfg: encode_tensor(x, cfg, seed), repeats)
            te = te_fresh
            if coding == "fixed":  # the product path: the aggregator reuses its send buffer
                buf = np.empty(len(enc), dtype=np.uint8)
                te = _best(lambda cfg=cfg, buf=buf: encode_tensor(x, cfg, seed, out=buf), repeats)
            td = _best(lambda cfg=cfg, enc=enc: decode_into(enc.data, cfg, out, accumulate=True), repeats)
            rows.append({
                "coding": coding, "bits": bits, "encode_gbps": gb / te, "decode_gbps": gb / td,
                "encode_fresh_buffer_gbps": gb / te_fresh, "bits_per_coord": enc.bits / numel,
            })  # fmt: skip
    device_row = device_path_row(x, 4, bucket_size, seed, repeats)  # the device path, compiled for the CPU
    # memcpy measured before and after the rows; the faster one makes the ratios conservative
    memcpy = max(memcpy_before, gb / _best(lambda: out.copy_(x), repeats))
    device_row["encode_vs_memcpy"] = device_row["encode_gbps"] / memcpy
    device_row["decode_vs_memcpy"] = device_row["decode_gbps"] / memcpy
    for r in rows:
        r["encode_vs_memcpy"] = r["encode_gbps"] / memcpy
        r["decode_vs_memcpy"] = r["decode_gbps"] / memcpy
    main = next(r for r in rows if r["coding"] == "fixed" and r["bits"] == 4)
    model_rows = model_message_rows(max(repeats, 10), seed)
    for r in model_rows:
        r["encode_vs_16m"] = r["encode_gbps"] / main["encode_gbps"]
        r["decode_vs_16m"] = r["decode_gbps"] / main["decode_gbps"]
        r["encode_vs_memcpy"] = r["encode_gbps"] / memcpy
        r["decode_vs_memcpy"] = r["decode_gbps"] / memcpy
    return {
        "benchmark": "codec",
        "numel": numel,
        "bucket_size": bucket_size,
        "threads": 1,
        "data": "standard normal float32",
        "allocator": allocator(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "memcpy_gbps": memcpy,
        "encode_gbps": main["encode_gbps"],
        "decode_gbps": main["decode_gbps"],
        "encode_vs_memcpy": main["encode_vs_memcpy"],
        "decode_vs_memcpy": main["decode_vs_memcpy"],
        "encode_fresh_buffer_vs_memcpy": main["encode_fresh_buffer_gbps"] / memcpy,
        "eager_torch_encode_gbps": eager_enc,
        "torch_path_encode_gbps": torch_path,
        "eager_torch_decode_gbps": eager_dec,
        "encode_speedup_vs_eager": main["encode_gbps"] / eager_enc,
        "decode_speedup_vs_eager": main["decode_gbps"] / eager_dec,
        "rows": rows,
        "device_rows": [device_row],
        "model_rows": model_rows,
    }


def format_codec(res: dict) -> str:
    lines = [
        f"codec throughput, {res['numel']:,} float32, 1 thread, allocator: {res['allocator']}",
        f"memcpy {res['memcpy_gbps']:.2f} GB/s; eager-torch textbook QSGD-4b quantize "
        f"{res['eager_torch_encode_gbps']:.3f} GB/s (no packing); qoda's torch (CUDA) path quantize "
        f"{res['torch_path_encode_gbps']:.3f} GB/s, dequantize {res['eager_torch_decode_gbps']:.3f} GB/s",
        "",
        "| coding | bits | encode GB/s | decode GB/s | encode/memcpy | decode/memcpy | bits/coord |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['coding']} | {r['bits']} | {r['encode_gbps']:.3f} | {r['decode_gbps']:.3f} | "
            f"{r['encode_vs_memcpy']:.3f} | {r['decode_vs_memcpy']:.3f} | {r['bits_per_coord']:.3f} |"
        )
    for r in res.get("device_rows", []):
        lines.append(
            f"| {r['path']} | {r['bits']} | {r['encode_gbps']:.3f} | {r['decode_gbps']:.3f} | "
            f"{r['encode_vs_memcpy']:.3f} | {r['decode_vs_memcpy']:.3f} | {r['bits_per_coord']:.3f} |"
        )
    lines += [
        "",
        "default training model (DCGAN/MNIST, bit-allocated plan, fitted levels): whole messages",
        "",
        "| message | floats | segments | encode GB/s | decode GB/s | encode/16M-4b | decode/16M-4b | bits/coord |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res.get("model_rows", []):
        lines.append(
            f"| {r['message']} | {r['numel']:,} | {r['segments']} | {r['encode_gbps']:.3f} | {r['decode_gbps']:.3f} | "
            f"{r['encode_vs_16m']:.3f} | {r['decode_vs_16m']:.3f} | {r['bits_per_coord']:.3f} |"
        )
    lines.append(
        f"\n4-bit fixed: encode {res['encode_vs_memcpy']:.3f}x memcpy into a reused buffer, "
        f"{res['encode_fresh_buffer_vs_memcpy']:.3f}x into a fresh one; "
        f"{res['encode_speedup_vs_eager']:.1f}x eager torch on encode, "
        f"decode {res['decode_speedup_vs_eager']:.1f}x eager torch"
    )
    return "\n".join(lines)


def write_json(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")
