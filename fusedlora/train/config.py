"""The trainer's configuration: one dataclass, its command line, and the rules for ``--resume``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..modules import MAX_RANK

QUANTIZE_CHOICES = ("nf4", "int4", "none")
DTYPE_CHOICES = ("auto", "bf16", "fp32")
GROUP_SIZES = (64, 128)
# Fields that name where a run writes or how it was started, not what it computes.
NOT_COMPARED = ("out", "resume")
# Fields a resumed run may raise: it then trains on (the schedule is recomputed over the new total).
EXTENDABLE = ("steps", "epochs")
_REGEX_CHARS = set(".*+?[](){}|^$\\")


def flag(name: str) -> str:
    """The command-line flag of config field ``name``."""
    return "--" + name.replace("_", "-")


def default_out(model: str | None) -> str:
    """runs/<the model folder's name>, or runs/tiny for the built-in model."""
    return os.path.join("runs", os.path.basename(os.path.normpath(model)) if model else "tiny")


def arg(default, help: str, **flag_kw):
    """A config field and its flag: ``help`` and argparse keywords ride in the field's metadata."""
    return field(default=default, metadata={"help": help, **flag_kw})


@dataclass
class TrainConfig:
    """Everything that decides what a run computes. Defaults: the built-in tiny model and data on CPU.
    Every field but ``resume``'s bookkeeping is a flag of the same name (``flag``)."""

    model: str | None = arg(None, "a local Hugging Face causal-LM checkpoint (default: the built-in tiny Llama)",
                            metavar="HF_DIR")
    data: str | None = arg(None, 'JSONL records: "text"; "prompt" + "completion"; "instruction" (+ "input") + '
                           '"output"; or "messages" (chat, rendered with the tokenizer\'s chat template) '
                           "(default: built-in data)", metavar="FILE.jsonl")
    steps: int = arg(300, "optimizer steps")
    epochs: float | None = arg(None, "passes over the training split (sets --steps; give one of the two)",
                               type=float)
    save_every: int = arg(100, "checkpoint every K steps and at the end; 0: only at the end", metavar="K")
    eval_every: int = arg(50, "held-out loss every K steps; 0: never", metavar="K")
    seed: int = arg(0, "seed of the LoRA initialization, dropout and data order")
    rank: int = arg(16, f"LoRA rank, 1 to {MAX_RANK}", metavar="R")
    alpha: float = arg(32.0, "LoRA alpha, scale = alpha/rank", metavar="A")
    dropout: float = arg(0.05, "LoRA dropout", metavar="P")
    dora: bool = arg(False, "DoRA adapters: a trained magnitude per output row of each targeted linear (PEFT's "
                     "use_dora), saved in the adapter")
    target_modules: str | list[str] = arg("all-linear", 'name suffixes, one regex, or "all-linear"', nargs="+",
                                          metavar="NAME", type=str)
    quantize: str = arg("nf4", "the frozen base's format", choices=QUANTIZE_CHOICES)
    group_size: int = arg(128, "INT4's group size along K", choices=GROUP_SIZES)
    dtype: str = arg("auto", "the base's compute dtype (auto: bf16 on a GPU, fp32 on a CPU)", choices=DTYPE_CHOICES)
    lr: float = arg(3e-3, "peak learning rate")
    batch_size: int = arg(8, "sequences per micro-batch per process", metavar="B")
    grad_accum: int = arg(1, "micro-batches per optimizer step", metavar="G")
    seq_len: int = arg(128, "tokens per sequence", metavar="L")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward to save memory")
    pack: bool = arg(True, "pack whole records into sequences (default; none attends to another) or pad one "
                     "record per sequence", action=argparse.BooleanOptionalAction)
    warmup_steps: int = arg(20, "linear warmup steps", metavar="N")
    min_lr_ratio: float = arg(0.1, "the cosine ends at lr times this", metavar="F")
    weight_decay: float = arg(0.0, "AdamW weight decay", metavar="W")
    max_grad_norm: float = arg(1.0, "clip the gradient norm to this", metavar="N")
    fsdp: bool = arg(False, "under torchrun with several processes: shard the frozen base and the LoRA weights "
                     "with FSDP2 (each decoder layer, then the whole model; a 4-bit base in whole quantization "
                     "blocks) instead of replicating them with DDP; one process runs as without it")
    cpu_offload: bool = arg(False, "with --fsdp: keep each process's shard of the parameters, their gradients "
                            "and the optimizer state in host memory (FSDP2's CPUOffloadPolicy); a unit is copied "
                            "to the GPU for its forward and backward, and AdamW steps on the CPU")
    eval_fraction: float = arg(0.05, "share of the records held out", metavar="F")
    eval_batches: int = arg(8, "at most this many batches of the held-out split per evaluation", metavar="N")
    out: str | None = arg(None, "output directory (default: runs/<the --model folder's name>, or runs/tiny)",
                          metavar="DIR")
    resume: bool = arg(False, "continue the run whose last checkpoint is in DIR; a larger --steps or --epochs "
                       "extends a finished run")

    def __post_init__(self):
        self.validate()
        if self.out is None:
            self.out = default_out(self.model)

    def validate(self) -> None:
        for name in ("steps", "rank", "batch_size", "grad_accum", "seq_len", "eval_batches"):
            _check_int(name, getattr(self, name), 1)
        for name in ("save_every", "eval_every", "warmup_steps", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("dora", "gradient_checkpointing", "pack", "fsdp", "cpu_offload", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{flag(name)}: expected true or false, got {getattr(self, name)!r}")
        if self.cpu_offload and not self.fsdp:
            raise ValueError("--cpu-offload: offloads FSDP2's shards; it needs --fsdp")
        if self.rank > MAX_RANK:
            raise ValueError(f"--rank: {self.rank} is beyond the largest supported rank, {MAX_RANK}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"--quantize: expected one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"--dtype: expected one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"--group-size: expected one of {GROUP_SIZES}, got {self.group_size!r}")
        _check_float("alpha", self.alpha, 0.0, None, "a positive finite number", low_open=True)
        _check_float("lr", self.lr, 0.0, None, "a positive finite number", low_open=True)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, None, "a positive finite number", low_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0, None, "a finite number >= 0")
        _check_float("dropout", self.dropout, 0.0, 1.0, "a float in [0, 1)", high_open=True)
        _check_float("eval_fraction", self.eval_fraction, 0.0, 1.0, "a float in [0, 1)", high_open=True)
        _check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, "a float in [0, 1]")
        if self.epochs is not None:
            _check_float("epochs", self.epochs, 0.0, None, "a positive finite number", low_open=True)
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"--target-modules: expected one or more module names, got {self.target_modules!r}")
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"--target-modules: expected module names, got {self.target_modules!r}")
        for name in ("model", "data", "out"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{flag(name)}: expected a path, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**d)

    def computed(self) -> dict:
        """The fields a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_COMPARED}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{flag(name)}: expected {what}, got {value!r}")


def _check_float(name: str, value, low: float, high: float | None, what: str, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{flag(name)}: expected {what}, got {value!r}")


def parse_target_modules(values: list[str]) -> str | list[str]:
    """PEFT's meaning: one value that is "all-linear" or looks like a regex stays a string, else a list of
    name suffixes."""
    if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS & set(values[0])):
        return values[0]
    return list(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every config field as a flag (see TrainConfig), and --config. Defaults are suppressed so that a run can
    tell what was given (with --resume, flags not given come from the checkpoint; flags given must agree)."""
    parser.add_argument("--config", metavar="RUN.toml", default=argparse.SUPPRESS,
                        help="read fields from a TOML file (keys as the flags without --, e.g. batch-size = 8; "
                        "paths relative to the file); flags given as well override it")
    for f in dataclasses.fields(TrainConfig):
        kw = dict(f.metadata)
        help = kw.pop("help")
        if isinstance(f.default, bool):
            kw.setdefault("action", "store_true")
        else:
            kw.setdefault("type", type(f.default) if f.default is not None else str)
            help += f" (default {f.default})" if f.default is not None else ""
        parser.add_argument(flag(f.name), default=argparse.SUPPRESS, help=help, **kw)


def read_toml(path: str) -> dict:
    """Config fields from a TOML file; relative model/data/out paths are taken from the file's folder."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: {path} does not exist")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config: {path} is not valid TOML ({exc})") from None
    fields = {}
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name not in TrainConfig.__dataclass_fields__ or name == "resume":
            raise ValueError(f"--config: {path}: unknown key {key!r}")
        if name in ("model", "data", "out") and isinstance(value, str):
            value = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(value))
        fields[name] = value
    return fields


def given_fields(args: argparse.Namespace) -> dict:
    """The config fields given (a --config file, then the command line over it), normalized as the config
    stores them."""
    flags = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if "target_modules" in flags:
        flags["target_modules"] = parse_target_modules(flags["target_modules"])
    from_file = read_toml(args.config) if getattr(args, "config", None) else {}
    if "steps" in flags and "epochs" in flags:
        raise ValueError("--steps and --epochs: give one of the two")
    if "steps" in flags or "epochs" in flags:  # the command line's choice replaces the file's
        from_file.pop("steps", None)
        from_file.pop("epochs", None)
    given = {**from_file, **flags}
    if "steps" in given and "epochs" in given:
        raise ValueError(f"--config: {args.config} gives both steps and epochs; give one of the two")
    for name in ("model", "data"):
        if isinstance(given.get(name), str):
            given[name] = os.path.abspath(given[name])
    return given


def resolve(given: dict, saved: dict | None) -> TrainConfig:
    """The run's config: ``given`` alone, or (resuming) ``saved`` with every given field checked against it.
    A larger --steps or --epochs than the checkpoint's extends the run."""
    if saved is None:
        return TrainConfig(**given)
    config = TrainConfig.from_dict({**saved, "out": given.get("out", saved["out"]), "resume": True})
    stored = config.computed()
    changes = {k: v for k, v in given.items() if k not in NOT_COMPARED}
    if "steps" in changes:
        changes.setdefault("epochs", None)
    # Compare after the dataclass normalizes the given values (e.g. ints given for float fields).
    normalized = TrainConfig(**{**stored, **changes}).computed()
    diffs = []
    for k in stored:
        if normalized[k] == stored[k] or (k in EXTENDABLE and k in given and _extends(stored, normalized)):
            continue
        hint = " (a run can be extended, not shortened)" if k in EXTENDABLE else ""
        diffs.append(f"{flag(k)}: checkpoint has {stored[k]!r}, command line gives {normalized[k]!r}{hint}")
    if diffs:
        raise ValueError("--resume: the command line differs from the checkpoint's config (nothing was changed):\n  "
                         + "\n  ".join(diffs))
    return TrainConfig.from_dict({**config.to_dict(), **{k: normalized[k] for k in EXTENDABLE}})


def _extends(stored: dict, new: dict) -> bool:
    if new["epochs"] is not None:
        return stored["epochs"] is None or new["epochs"] > stored["epochs"]
    return new["steps"] > stored["steps"]
