"""The ``qoda`` command: ``qoda train`` (the main job), ``qoda sample`` (grids from a run), ``qoda report``,
``qoda vi`` and ``qoda bench ...``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


# The convention of every option parser (``type=``): its ArgumentTypeError message never names the
# option, because argparse prefixes it ("argument --numel: must be >= 1, got 0").
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _bucket_size(text: str) -> int:
    """A quantization bucket size: an integer in ``[1, MAX_BUCKET_SIZE]`` (the quantizer's bound)."""
    from qoda.quant.config import MAX_BUCKET_SIZE

    value = _positive_int(text)
    if value > MAX_BUCKET_SIZE:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_BUCKET_SIZE}, got {value}")
    return value


def _entropy_bits(text: str) -> int:
    """A width of entropy-coded levels: 2 (one interior level) to ``MAX_ENTROPY_CODE_BITS``."""
    from qoda.quant.config import MAX_ENTROPY_CODE_BITS

    value = _positive_int(text)
    if not 2 <= value <= MAX_ENTROPY_CODE_BITS:
        raise argparse.ArgumentTypeError(f"must be in 2..{MAX_ENTROPY_CODE_BITS}, got {value}")
    return value


def train_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each ``qoda train`` option that takes a name (field metadata ``choices``
    of :class:`~qoda.train.config.TrainConfig`, which validates them)."""
    from dataclasses import fields

    from qoda.train.config import TrainConfig

    return {f.name: tuple(f.metadata["choices"]) for f in fields(TrainConfig) if "choices" in f.metadata}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter without line breaks inside option names (``--data-`` / ``root``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _int_or_float(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return int(value) if value.is_integer() else value


def _default_text(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ---------------------------------------------------------------------------- errors
class CommandError(Exception):
    """A command failed: :func:`main` prints the message (one line) and exits with ``exit_code``
    (1: a run failed; see :func:`main` for the others)."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CommandError, ValueError):
    """A bad option value found after parsing: one line on stderr, exit code 2 (like argparse's)."""

    exit_code = 2


class Unavailable(CommandError):
    """A benchmark cannot run here (a network benchmark needs root and iproute2, a GPU one CUDA): exit code 3."""

    exit_code = 3


# ---------------------------------------------------------------------------- qoda report
def _report_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    r = sub.add_parser(name, help="quantization report on real gradients (digits CNN)")
    r.add_argument("--steps", type=_positive_int, default=300, help="training steps (default 300)")
    r.add_argument("--batch-size", type=_positive_int, default=64)
    r.add_argument("--bucket-size", type=_bucket_size, default=1024)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, default=Path("out/report"), help="output directory (default out/report)")
    return r


def _report(args: argparse.Namespace) -> int:
    from qoda.report.quant_report import ReportConfig, run_report

    cfg = ReportConfig(steps=args.steps, batch_size=args.batch_size, bucket_size=args.bucket_size, seed=args.seed)
    run_report(cfg, args.out)
    print(f"\nwrote {args.out / 'report.json'} and {args.out / 'report.md'}")
    return 0


# ---------------------------------------------------------------------------- qoda vi
_VI_BITS = (2, 12)  # the widths qoda vi simulates (32 stands for unquantized)


def _vi_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    v = sub.add_parser(name, help="monotone-VI suite: methods x problems x noise x bits (simulated workers)")
    v.add_argument("--methods", nargs="+", default=None, help="default: all")
    v.add_argument("--problems", nargs="+", default=None, help="default: all")
    v.add_argument("--noise", nargs="+", default=["relative", "absolute"], choices=["relative", "absolute", "none"])
    v.add_argument("--bits", nargs="+", type=int, default=[32, 4],
                   help=f"widths in {_VI_BITS[0]}..{_VI_BITS[1]}, or 32 = unquantized (default: 32 4)")  # fmt: skip
    v.add_argument("--iterations", type=_positive_int, default=3000)
    v.add_argument("--workers", type=_positive_int, default=4)
    v.add_argument("--d", type=_positive_int, default=40, help="dimension (even)")
    v.add_argument("--sigma", type=float, default=0.1, help="noise level")
    v.add_argument("--jobs", type=_positive_int, default=2)
    v.add_argument("--json", type=Path, default=Path("benchmarks/vi.json"))
    return v


def _vi(args: argparse.Namespace) -> int:
    from qoda.optim import OPTIMIZERS
    from qoda.vi.problems import PROBLEMS
    from qoda.vi.suite import METHODS, PROBLEM_NAMES, plan_runs, run_suite, write

    methods = tuple(args.methods or METHODS)
    problems = tuple(args.problems or PROBLEM_NAMES)
    for m in methods:
        if m not in OPTIMIZERS:
            raise UsageError(f"qoda vi: --methods: unknown method {m!r} (choose from {sorted(OPTIMIZERS)})")
    for p in problems:
        if p not in PROBLEMS:
            raise UsageError(f"qoda vi: --problems: unknown problem {p!r} (choose from {sorted(PROBLEMS)})")
    for b in args.bits:
        if b != 32 and not _VI_BITS[0] <= b <= _VI_BITS[1]:
            raise UsageError(f"qoda vi: --bits: each must be 32 (unquantized) or in {_VI_BITS[0]}..{_VI_BITS[1]}, "
                             f"got {b}")  # fmt: skip
    if args.d % 2 or not args.sigma >= 0:
        raise UsageError("qoda vi: --d must be even and --sigma >= 0")
    bits = tuple(None if b == 32 else b for b in args.bits)
    runs = plan_runs(methods, problems, tuple(args.noise), bits, (), args.iterations, args.workers, args.d, args.sigma)
    res = run_suite(runs, args.jobs)
    plots = write(res, args.json)
    print(json.dumps(res["claims"], indent=1))
    print(f"\nwrote {args.json} and {', '.join(map(str, plots))}")
    return 0


# ---------------------------------------------------------------------------- qoda train
def _train_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    from collections.abc import Mapping
    from dataclasses import fields

    from qoda.train.config import ALIASES, TrainConfig

    t = sub.add_parser(
        name, help="distributed WGAN-GP (or --task lm: transformer LM) training with layer-wise quantization (the "
        "main job)",
        description="Train a WGAN-GP (--task gan, default) or a byte-level transformer language model (--task lm) on "
        "--workers processes with compressed gradient exchange; every "
        "option can also be set in a JSON or TOML file (--config), which command-line options override. "
        "Reference: docs/training.md.",
        argument_default=argparse.SUPPRESS, formatter_class=_HelpFormatter,
    )  # fmt: skip
    t.add_argument("--config", type=Path, metavar="FILE",
                   help="JSON or TOML file of options (command-line options override it)")  # fmt: skip
    aliases = {new: old for old, new in ALIASES.items()}
    group: argparse._ActionsContainer = t
    for f in fields(TrainConfig):  # help, choices, default and section: the field's metadata (train.config.option)
        meta = f.metadata
        if "section" in meta:
            group = t.add_argument_group(meta["section"])
        flags = ["--" + n.replace("_", "-") for n in (f.name, aliases.get(f.name)) if n]
        default, choices = f.default, meta.get("choices")
        help_ = meta["help"]
        if isinstance(choices, Mapping):  # a registry: each choice documents itself
            help_ += ": " + "; ".join(f"{n} = {spec.help}" for n, spec in choices.items())
        if not isinstance(default, bool) and default is not None:
            help_ += f" (default: {_default_text(default)})"
        help_ = help_.replace("%", "%%")
        if isinstance(default, bool):
            if default:
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=help_)
            else:
                group.add_argument(*flags, dest=f.name, action="store_true", help=help_)
        elif choices is not None:  # validated by TrainConfig (one line naming the option), shown here
            group.add_argument(*flags, dest=f.name, type=str, metavar="{" + ",".join(choices) + "}", help=help_)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else int
            group.add_argument(*flags, dest=f.name, type=kind, nargs="+", metavar=meta.get("metavar", "N"), help=help_)
        elif f.name == "bits":  # an integer width, or a fractional budget with --bit-allocation dp
            group.add_argument(*flags, dest=f.name, type=_int_or_float, metavar=meta["metavar"], help=help_)
        elif isinstance(default, int | float):
            group.add_argument(*flags, dest=f.name, type=type(default), metavar=type(default).__name__.upper(),
                               help=help_)  # fmt: skip
        else:
            group.add_argument(*flags, dest=f.name, type=str, metavar="PATH", help=help_)
    return t


def _train(args: argparse.Namespace) -> int:
    from qoda.train.config import ConfigError, TrainConfig
    from qoda.train.launch import train

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "handler", "extra")}
    for k in ("betas", "refit_steps"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    try:
        cfg = TrainConfig.from_file(args.config, overrides) if getattr(args, "config", None) else (
            TrainConfig.from_dict(overrides))  # fmt: skip
    except ConfigError as e:
        raise UsageError(f"qoda train: error: {e}") from None
    from qoda.data.images import DatasetError
    from qoda.train.checkpoint import CheckpointError
    from qoda.train.launch import Interrupted, WorkerError

    try:
        report = train(cfg)
    except (ConfigError, CheckpointError, DatasetError) as e:  # e.g. resume against another config's checkpoint
        raise UsageError(f"qoda train: error: {e}") from None
    except WorkerError as e:
        raise CommandError(f"qoda train: error: {e}") from None
    except Interrupted as e:  # SIGINT / SIGTERM: the workers are stopped, the last checkpoint kept
        raise CommandError(f"qoda train: {e}", e.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C before the launcher installed its handlers (or under torchrun)
        raise CommandError("qoda train: interrupted", 130) from None
    if report is not None and cfg.task == "lm":
        out = Path(cfg.out)
        print(
            f"\nvalidation loss {report['val_loss']:.4f} nats/byte (perplexity {report['val_perplexity']:.3f}, "
            f"{report['val_bits_per_byte']:.3f} bits/byte) after {report['steps']} steps in {report['seconds']:.0f} s; "
            f"{report['bits_per_step'] / 8e6:.3f} MB/step sent per worker, compression "
            f"{report['compression_ratio']:.1f}x"
        )
        print(f"report:   {out / 'report.json'}")
        print(f"plots:    {out / 'curves.png'} (against seconds, left, and iterations, right)")
        print(f"logs:     tensorboard --logdir {out / 'tensorboard'}")
    elif report is not None:
        out = Path(cfg.out)
        raw = f", raw generator {report['fid_raw']:.3f}" if report.get("fid_raw") is not None else ""
        print(
            f"\nFID {report['fid']:.3f} EMA{raw} ({report['fid_extractor']}, {report['fid_samples']} samples) after "
            f"{report['steps']} steps in {report['seconds']:.0f} s; {report['bits_per_step'] / 8e6:.3f} MB/step sent "
            f"per worker, compression {report['compression_ratio']:.1f}x"
        )
        print(f"samples:  {out / 'samples' / 'final.png'} (EMA), {out / 'samples' / 'final_raw.png'} (raw)")
        print(f"report:   {out / 'report.json'}")
        print(f"plots:    {out / 'curves.png'} (against seconds, top row, and iterations, bottom row)")
        print(f"logs:     tensorboard --logdir {out / 'tensorboard'}")
        print(f"more:     qoda sample --run {out} --n 64 --out grid.png")
    return 0


# ---------------------------------------------------------------------------- qoda sample
def _sample_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    s = sub.add_parser(
        name, help="a grid of samples from a qoda train run's generator (its last committed checkpoint)",
        description="Write a grid of samples of a run's generator, read from its last committed checkpoint "
        "(the EMA generator unless --raw), as an image in the format --out's suffix names. "
        "With the default seed and --n 64 the grid is the run's samples/final.png (final_raw.png with --raw). "
        "In Python: qoda.train.sample.load_generator(run_dir).",
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    s.add_argument("--run", type=Path, default=Path("runs/qoda"), metavar="DIR",
                   help="the run folder (qoda train's --out; default: runs/qoda)")  # fmt: skip
    s.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    s.add_argument("--out", type=Path, default=Path("samples.png"), metavar="FILE",
                   help="image file to write, in an existing folder; its suffix names the format: PNG, JPEG, BMP "
                   "or TIFF (default: samples.png)")  # fmt: skip
    s.add_argument("--raw", action="store_true", help="the raw generator instead of its EMA")
    s.add_argument("--seed", type=int, default=None, help="seed of the latents (default: the run's own, so "
                   "--n 64 redraws samples/final.png)")  # fmt: skip
    return s


def _sample(args: argparse.Namespace) -> int:
    from qoda.train.checkpoint import CheckpointError
    from qoda.train.sample import RunError, write_sample_grid

    if args.n < 1:
        raise UsageError(f"qoda sample: error: --n: must be >= 1, got {args.n}")
    try:
        info = write_sample_grid(args.run, args.out, args.n, args.raw, args.seed)
    except RunError as e:
        raise UsageError(f"qoda sample: error: --run {e}") from None
    except (CheckpointError, ValueError) as e:
        raise UsageError(f"qoda sample: error: {e}") from None
    except OSError as e:
        raise UsageError(f"qoda sample: error: --out {args.out}: {e.strerror or e}") from None
    print(f"wrote {info['out']}: {info['n']} samples of the {info['generator']} generator of {args.run} at step "
          f"{info['step']} (seed {info['seed']})")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------- qoda bench ...
def _write_bench(res: dict, path: Path, fmt, plot) -> None:
    """``path`` (JSON), its ``.md`` table and ``.png`` plot; the table is also printed."""
    from qoda.bench.codec import write_json

    write_json(res, path)
    path.with_suffix(".md").write_text(fmt(res) + "\n")
    plot(res, path.with_suffix(".png"))
    print(fmt(res))
    print(f"\nwrote {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")


def _print_bench(table: str, res: dict, path: Path | None) -> None:
    """The table printed; the results written to ``path`` (JSON) when given."""
    print(table)
    if path:
        from qoda.bench.codec import write_json

        write_json(res, path)
        print(f"\nwrote {path}")


def _codec_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    c = sub.add_parser(name, help="quantize+encode / decode throughput vs memcpy, 1 thread")
    c.add_argument("--numel", type=_positive_int, default=1 << 24, help="floats (default 16M)")
    c.add_argument("--repeats", type=_positive_int, default=5)
    c.add_argument("--bucket-size", type=_bucket_size, default=1024)
    c.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    c.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the device codec on the GPU against a device-to-device copy (exit 3 without CUDA)")
    return c


def _bench_codec(args: argparse.Namespace) -> int:
    from qoda.bench.codec import format_codec, format_device_codec, run_codec_bench, run_device_codec_bench

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            what = "qoda bench codec --device cuda"
            raise Unavailable(f"{what}: no CUDA device on this machine (torch {torch.__version__}); nothing measured")
        res = run_device_codec_bench(args.numel, args.repeats, args.bucket_size)
        _print_bench(format_device_codec(res), res, args.json)
        return 0
    res = run_codec_bench(args.numel, args.repeats, args.bucket_size)
    _print_bench(format_codec(res), res, args.json)
    return 0


def _entropy_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    c = sub.add_parser(name, help="rANS coders side by side (qoda's, the previous one, constriction if installed)")
    c.add_argument("--numel", type=_positive_int, default=1 << 24, help="floats (default 16M)")
    c.add_argument("--bits", type=_entropy_bits, default=4, help="QSGD width of the coded levels")
    c.add_argument("--repeats", type=_positive_int, default=5)
    c.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    return c


def _bench_entropy(args: argparse.Namespace) -> int:
    from qoda.bench.entropy import format_entropy, run_entropy_bench

    res = run_entropy_bench(args.numel, args.bits, args.repeats)
    _print_bench(format_entropy(res), res, args.json)
    return 0


def _variance_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    va = sub.add_parser(name, help="normalised variance vs measured bits on WGAN and transformer gradients")
    va.add_argument("--budgets", type=_positive_int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    va.add_argument("--wgan-steps", type=_positive_int, default=30)
    va.add_argument("--lm-steps", type=_positive_int, default=60)
    va.add_argument("--json", type=Path, default=Path("benchmarks/variance.json"))
    return va


def _bench_variance(args: argparse.Namespace) -> int:
    from qoda.bench.variance import run_variance_study, write

    for b in args.budgets:
        if not 2 <= b <= 8:
            raise UsageError(f"qoda bench variance: --budgets: each must be in [2, 8], got {b}")
    res = run_variance_study(tuple(args.budgets), args.wgan_steps, args.lm_steps)
    png = write(res, args.json)
    print(json.dumps(res["summary"], indent=1))
    print(f"\nwrote {args.json} and {png}")
    return 0


def _quality_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    q = sub.add_parser(name, help="FID over seeds at equal steps: uncompressed, global ALQ 4-bit, layer-wise DP "
                       "(4/3/2.5 bits) x QODA/ExtraAdam (2 workers)")  # fmt: skip
    q.add_argument("--steps", type=_positive_int, default=1000)
    q.add_argument("--seeds", type=_positive_int, default=3, help="seeds per row (default 3)")
    q.add_argument("--workers", type=_positive_int, default=2)
    q.add_argument("--out", type=Path, default=Path("runs/quality"), help="run directories (default runs/quality)")
    q.add_argument("--json", type=Path, default=Path("benchmarks/quality.json"))
    return q


def _bench_quality(args: argparse.Namespace) -> int:
    from qoda.bench.quality import format_quality, run_quality, write

    res = run_quality(args.steps, args.workers, args.out, seeds=args.seeds, json_path=args.json)
    md = write(res, args.json)
    print(format_quality(res))
    print(json.dumps(res["claims"], indent=1))
    print(f"\nwrote {args.json} and {md}")
    return 0


def _faults_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    fa = sub.add_parser(name, help="fault scenarios across real processes: fuzzing, NaN, mismatch, kills, resume")
    fa.add_argument("--fuzz-cases", type=_positive_int, default=10_000)
    fa.add_argument("--generated-cases", type=_positive_int, default=100_000,
                    help="property-checked generated cases of the 'generated' scenario (default 100000)")  # fmt: skip
    fa.add_argument("--kills", type=_positive_int, default=5, help="SIGKILLs of the checkpoint scenario")
    fa.add_argument("--pg-timeout", type=float, default=10.0, help="process-group timeout of the dead-worker runs")
    fa.add_argument("--seed", type=int, default=0)
    fa.add_argument("--scenarios", nargs="+", default=None, help="default: all (see qoda.bench.faults.SCENARIOS)")
    fa.add_argument("--json", type=Path, default=Path("benchmarks/faults.json"))
    return fa


def _bench_faults(args: argparse.Namespace) -> int:
    from qoda.bench.faults import SCENARIOS, format_faults, run_faults

    if not args.pg_timeout > 0:
        raise UsageError(f"qoda bench faults: --pg-timeout must be > 0, got {args.pg_timeout}")
    bad = [n for n in args.scenarios or () if n not in SCENARIOS]
    if bad:
        raise UsageError(f"qoda bench faults: --scenarios: unknown {bad}; choose from {', '.join(SCENARIOS)}")
    res = run_faults(args.fuzz_cases, args.kills, args.pg_timeout, args.seed,
                     scenarios=tuple(args.scenarios) if args.scenarios else None,
                     generated_cases=args.generated_cases)  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    args.json.with_suffix(".md").write_text(format_faults(res) + "\n")
    print(format_faults(res))
    print(f"\nwrote {args.json} and {args.json.with_suffix('.md')}")
    return 0 if res["all_ok"] else 1


def _comm_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    m = sub.add_parser(name, help="gradient averaging over bandwidth-limited links (needs root + iproute2)")
    m.add_argument("--workers", type=_positive_int, nargs="+", default=[2, 4])
    m.add_argument("--bandwidth-mbit", type=_positive_int, nargs="+", default=[1000, 100])
    m.add_argument("--numel", type=_positive_int, nargs="+", default=[1 << 20, 1 << 22, 1 << 24])
    m.add_argument("--steps", type=_positive_int, default=4, help="timed steps per configuration")
    m.add_argument("--max-seconds", type=_positive_int, default=3600, help="run-time bound")
    m.add_argument("--json", type=Path, default=None)
    return m


def _bench_comm(args: argparse.Namespace) -> int:
    from qoda.bench.comm import format_comm, run_comm_bench
    from qoda.bench.netns import NetnsUnavailable

    for n in args.numel:
        if n % 1024:
            raise UsageError(f"qoda bench comm: --numel must be a multiple of 1024, got {n}")
    try:
        res = run_comm_bench(
            tuple(args.workers), tuple(args.bandwidth_mbit), tuple(args.numel), args.steps, args.max_seconds
        )
    except NetnsUnavailable as e:
        raise Unavailable(f"qoda bench comm cannot run here: {e}") from None
    _print_bench(format_comm(res), res, args.json)
    return 0


def _e2e_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    e = sub.add_parser(name, help="WGAN-GP training steps over bandwidth-limited links (needs root + iproute2)")
    e.add_argument("--workers", type=_positive_int, nargs="+", default=[2, 4])
    e.add_argument("--bandwidth-mbit", type=_positive_int, nargs="+", default=[1000, 300, 100])
    e.add_argument("--configs", nargs="+", default=None, help="default: all (see qoda.bench.e2e.CONFIGS)")
    e.add_argument("--steps", type=_positive_int, default=30,
                   help="timed steps per configuration, over all rounds (at least this many)")  # fmt: skip
    e.add_argument("--rounds", type=_positive_int, default=6,
                   help="interleaved rounds: each times ceil(steps / rounds) steps of every configuration")  # fmt: skip
    e.add_argument("--warmup", type=_positive_int, default=3)
    e.add_argument("--batch", type=_positive_int, default=64, help="per worker (trainer default 64)")
    e.add_argument("--max-seconds", type=_positive_int, default=5400, help="run-time bound")
    e.add_argument("--quality", type=Path, default=Path("benchmarks/quality.json"),
                   help="FID histories for the time-to-target-FID estimate")  # fmt: skip
    e.add_argument("--json", type=Path, default=Path("benchmarks/e2e.json"))
    return e


def _bench_e2e(args: argparse.Namespace) -> int:
    from qoda.bench.e2e import CONFIG_NAMES, format_e2e, plot_e2e, run_e2e_bench
    from qoda.bench.netns import NetnsUnavailable

    configs = tuple(args.configs or CONFIG_NAMES)
    bad = [c for c in configs if c not in CONFIG_NAMES]
    if bad:
        raise UsageError(f"qoda bench e2e: --configs: unknown {bad}; choose from {', '.join(CONFIG_NAMES)}")
    try:
        res = run_e2e_bench(
            tuple(args.workers), tuple(float(b) for b in args.bandwidth_mbit), configs, args.steps, args.warmup,
            args.batch, args.max_seconds, args.quality, rounds=args.rounds,
        )  # fmt: skip
    except NetnsUnavailable as e:
        raise Unavailable(f"qoda bench e2e cannot run here: {e}") from None
    _write_bench(res, args.json, format_e2e, plot_e2e)
    return 0 if not res["skipped"] else 1


def _ttq_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    from qoda.bench.time_to_quality import DEFAULT_RATES_MBIT, DEFAULT_SEEDS, DEFAULT_WORKERS, WORKLOADS

    q = sub.add_parser(name, help="seconds to a quality target and quality at a time budget, per compression, "
                       "over seeds, on rate-limited links (GAN and transformer LM; needs root + iproute2 but "
                       "--quick)")  # fmt: skip
    q.add_argument("--workloads", nargs="+", default=list(WORKLOADS), help="lm and/or gan (default: both)")
    q.add_argument("--workers", type=_positive_int, nargs="+", default=list(DEFAULT_WORKERS))
    q.add_argument("--bandwidth-mbit", type=_positive_int, nargs="+", default=list(DEFAULT_RATES_MBIT))
    q.add_argument("--seeds", type=_positive_int, default=DEFAULT_SEEDS, help="seeds per row (default 3)")
    q.add_argument("--lm-target", type=float, default=None, help="validation-loss target (default: from the "
                   "uncompressed row)")  # fmt: skip
    q.add_argument("--gan-target", type=float, default=None, help="FID target (default: from the uncompressed row)")
    q.add_argument("--lm-steps", type=_positive_int, default=None, help="steps per LM run (default 400; 12 "
                   "evaluations per run)")  # fmt: skip
    q.add_argument("--gan-steps", type=_positive_int, default=None, help="steps per GAN run (default 400; 12 "
                   "evaluations per run)")  # fmt: skip
    q.add_argument("--budget-seconds", type=float, default=None,
                   help="training-clock budget of the quality-at-budget column (default: the shortest "
                   "run)")  # fmt: skip
    q.add_argument("--quick", action="store_true", help="CI-sized smoke run: tiny models, 3 steps, 2 workers, "
                   "2 seeds; on the loopback interface when namespaces are unavailable")  # fmt: skip
    q.add_argument("--max-seconds", type=_positive_int, default=3 * 3600, help="run-time bound")
    q.add_argument("--json", type=Path, default=Path("benchmarks/time_to_quality.json"))
    q.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="run nothing: summarise the runs of these result files together (e.g. one per "
                   "workload) and write --json, its table and plot")  # fmt: skip
    return q


def _bench_ttq(args: argparse.Namespace) -> int:
    from qoda.bench.netns import NetnsUnavailable
    from qoda.bench.time_to_quality import (
        WORKLOADS,
        format_time_to_quality,
        merge_results,
        plot_time_to_quality,
        run_time_to_quality,
    )

    if args.merge:
        docs = []
        for path in args.merge:
            try:
                docs.append(json.loads(path.read_text()))
            except (OSError, ValueError) as e:
                raise UsageError(f"qoda bench time-to-quality: --merge: cannot read {path}: {e}") from None
        try:
            res = merge_results(docs)
        except (KeyError, ValueError) as e:
            raise UsageError(f"qoda bench time-to-quality: --merge: {e}") from None
        _write_bench(res, args.json, format_time_to_quality, plot_time_to_quality)
        return 0
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        raise UsageError(f"qoda bench time-to-quality: --workloads: unknown {bad}; choose from {', '.join(WORKLOADS)}")
    for name in ("lm_target", "gan_target", "budget_seconds"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise UsageError(f"qoda bench time-to-quality: --{name.replace('_', '-')}: must be > 0, got {v}")
    if args.quick and (args.lm_steps or args.gan_steps):
        raise UsageError("qoda bench time-to-quality: --lm-steps / --gan-steps: not with --quick (3 steps)")
    workers, seeds = (tuple(args.workers), args.seeds) if not args.quick else ((2,), min(args.seeds, 2))
    try:
        res = run_time_to_quality(
            tuple(args.workloads), workers, tuple(float(b) for b in args.bandwidth_mbit), seeds, args.quick,
            {"lm": args.lm_target, "gan": args.gan_target}, args.budget_seconds, args.max_seconds,
            steps={"lm": args.lm_steps, "gan": args.gan_steps},
        )  # fmt: skip
    except NetnsUnavailable as e:
        raise Unavailable(f"qoda bench time-to-quality cannot run here: {e} (--quick runs without)") from None
    _write_bench(res, args.json, format_time_to_quality, plot_time_to_quality)
    return 0 if not res["skipped"] else 1


def _scaling_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    sc = sub.add_parser(name, help="alpha-beta model of step time for 4-64 workers, checked against e2e runs")
    sc.add_argument("--e2e", type=Path, default=Path("benchmarks/e2e.json"), help="measured runs (qoda bench e2e)")
    sc.add_argument("--codec", type=Path, default=Path("benchmarks/codec.json"), help="codec throughput")
    sc.add_argument("--json", type=Path, default=Path("benchmarks/scaling.json"))
    return sc


def _bench_scaling(args: argparse.Namespace) -> int:
    from qoda.bench.scaling import ScalingInputError, format_scaling, plot_scaling, run_scaling

    try:
        res = run_scaling(args.e2e, args.codec)
    except ScalingInputError as e:
        raise UsageError(f"qoda bench scaling: {e}") from None
    _write_bench(res, args.json, format_scaling, plot_scaling)
    return 0


# ---------------------------------------------------------------------------- the command table
Handler = Callable[[argparse.Namespace], int]
AddParser = Callable[[argparse._SubParsersAction, str], argparse.ArgumentParser]

#: ``qoda <command>``: how its parser is built, the handler that runs it and the extra of
#: ``pip install 'qoda[...]'`` it needs (:mod:`qoda.utils.extras`), in ``--help`` order
COMMANDS: dict[str, tuple[AddParser, Handler, str]] = {
    "report": (_report_parser, _report, "train"),
    "vi": (_vi_parser, _vi, "train"),
    "train": (_train_parser, _train, "train"),
    "sample": (_sample_parser, _sample, "train"),
}
#: ``qoda bench <benchmark>``: the same
BENCHMARKS: dict[str, tuple[AddParser, Handler, str]] = {
    "codec": (_codec_parser, _bench_codec, "bench"),
    "entropy": (_entropy_parser, _bench_entropy, "bench"),
    "variance": (_variance_parser, _bench_variance, "bench"),
    "quality": (_quality_parser, _bench_quality, "bench"),
    "faults": (_faults_parser, _bench_faults, "bench"),
    "comm": (_comm_parser, _bench_comm, "bench"),
    "e2e": (_e2e_parser, _bench_e2e, "bench"),
    "scaling": (_scaling_parser, _bench_scaling, "bench"),
    "time-to-quality": (_ttq_parser, _bench_ttq, "bench"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``qoda`` parser; every (sub)command sets ``handler``, the function that runs it."""
    p = argparse.ArgumentParser(prog="qoda", description="Layer-wise quantization for communication-efficient training")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (add, handler, extra) in COMMANDS.items():
        add(sub, name).set_defaults(handler=handler, extra=extra)
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, (add, handler, extra) in BENCHMARKS.items():
        add(bsub, name).set_defaults(handler=handler, extra=extra)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``qoda`` command.  Exit codes: 0 done; 1 a run failed (one line); 2 bad options or input
    (one line), or the command's extra is not installed (one line naming it); 3 a network benchmark
    needs root and iproute2, or a GPU benchmark CUDA; 130 / 143 interrupted (SIGINT/SIGTERM).

    Argparse reports what it finds itself (exit 2, via ``SystemExit``); a handler reports a
    failure by raising :class:`CommandError` (:class:`UsageError` for bad options or input)."""
    from qoda.utils.extras import MissingExtra, require

    args = build_parser().parse_args(argv)
    try:
        require(args.extra, "qoda " + (f"bench {args.bench}" if args.command == "bench" else args.command))
    except MissingExtra as e:
        print(f"qoda: error: {e}", file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except CommandError as e:
        print(e, file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
