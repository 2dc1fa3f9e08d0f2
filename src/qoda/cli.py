"""The ``qoda`` command: ``qoda report`` (the default job) and ``qoda bench codec``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive_int(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name}: expected an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"--{name}: must be >= 1, got {v}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qoda", description="Layer-wise quantization for communication-efficient training")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("report", help="quantization report on real gradients (digits CNN)")
    r.add_argument("--steps", type=_positive_int("steps"), default=300, help="training steps (default 300)")
    r.add_argument("--batch-size", type=_positive_int("batch-size"), default=64)
    r.add_argument("--bucket-size", type=_positive_int("bucket-size"), default=1024)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, default=Path("out/report"), help="output directory (default out/report)")

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    c = bsub.add_parser("codec", help="quantize+encode / decode throughput vs memcpy, 1 thread")
    c.add_argument("--numel", type=_positive_int("numel"), default=1 << 24, help="floats (default 16M)")
    c.add_argument("--repeats", type=_positive_int("repeats"), default=5)
    c.add_argument("--bucket-size", type=_positive_int("bucket-size"), default=1024)
    c.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        from qoda.report.quant_report import ReportConfig, run_report

        cfg = ReportConfig(steps=args.steps, batch_size=args.batch_size, bucket_size=args.bucket_size, seed=args.seed)
        run_report(cfg, args.out)
        print(f"\nwrote {args.out / 'report.json'} and {args.out / 'report.md'}")
        return 0
    if args.command == "bench" and args.bench == "codec":
        from qoda.bench.codec import format_codec, run_codec_bench, write_json

        res = run_codec_bench(args.numel, args.repeats, args.bucket_size)
        print(format_codec(res))
        if args.json:
            write_json(res, args.json)
            print(f"\nwrote {args.json}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
