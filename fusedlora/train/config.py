"""The trainer's configuration: one dataclass, its command line, and the rules for ``--resume``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

QUANTIZE_CHOICES = ("nf4", "int4", "none")
# Fields that name where a run writes or how it was started, not what it computes.
NOT_COMPARED = ("out", "resume")
_REGEX_CHARS = set(".*+?[](){}|^$\\")


@dataclass
class TrainConfig:
    """Everything that decides what a run computes. Defaults: the built-in tiny model and data on CPU."""

    model: str | None = None  # a local Hugging Face causal-LM directory; None: the built-in tiny Llama
    data: str | None = None  # a JSONL file; None: the built-in data set
    steps: int = 300
    save_every: int = 100  # 0: save only at the end
    eval_every: int = 50  # 0: no eval loss
    seed: int = 0
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    quantize: str = "nf4"
    lr: float = 3e-3
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    gradient_checkpointing: bool = False
    pack: bool = True  # pack records into full sequences; False: one record per sequence, padded
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    fsdp: bool = False  # under torchrun: FSDP2 (parameters sharded across processes) instead of DDP
    eval_fraction: float = 0.05  # share of the records held out for the eval loss
    eval_batches: int = 8  # at most this many batches of the held-out split per eval
    out: str = os.path.join("runs", "tiny")
    resume: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        positive = ("steps", "rank", "batch_size", "grad_accum", "seq_len", "eval_batches")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("save_every", "eval_every", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize: expected one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        if self.fsdp and self.quantize != "none":
            raise ValueError(f"--fsdp with --quantize {self.quantize}: FSDP2 shards parameters only, and a 4-bit "
                             "base keeps its packed weights in buffers, which it does not shard; use --fsdp with "
                             "--quantize none, or train a 4-bit base with DDP (without --fsdp)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {self.dropout!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected a float in [0, 1), got {self.eval_fraction!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a float in [0, 1], got {self.min_lr_ratio!r}")
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise ValueError("target_modules: expected at least one module name")
            self.target_modules = list(self.target_modules)

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


def parse_target_modules(values: list[str]) -> str | list[str]:
    """PEFT's meaning: one value that is "all-linear" or looks like a regex stays a string, else a list of
    name suffixes."""
    if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS & set(values[0])):
        return values[0]
    return list(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """DESIGN.md's flags. Defaults are suppressed so that a run can tell what was given on the command line
    (with --resume, flags not given come from the checkpoint; flags given must agree with it)."""
    d = TrainConfig.__dataclass_fields__
    S = argparse.SUPPRESS

    def default(name):
        return d[name].default

    parser.add_argument("--model", metavar="HF_DIR", default=S,
                        help="a local Hugging Face causal-LM checkpoint (default: the built-in tiny Llama)")
    parser.add_argument("--data", metavar="FILE.jsonl", default=S,
                        help='records with "text", or "prompt" and "completion" (default: built-in data)')
    parser.add_argument("--steps", type=int, default=S, help=f"optimizer steps (default {default('steps')})")
    parser.add_argument("--save-every", type=int, default=S, metavar="K",
                        help=f"checkpoint every K steps and at the end; 0: only at the end "
                        f"(default {default('save_every')})")
    parser.add_argument("--eval-every", type=int, default=S, metavar="K",
                        help=f"held-out loss every K steps; 0: never (default {default('eval_every')})")
    parser.add_argument("--seed", type=int, default=S, help=f"(default {default('seed')})")
    parser.add_argument("--rank", type=int, default=S, metavar="R", help=f"LoRA rank (default {default('rank')})")
    parser.add_argument("--alpha", type=float, default=S, metavar="A",
                        help=f"LoRA alpha, scale = alpha/rank (default {default('alpha')})")
    parser.add_argument("--dropout", type=float, default=S, metavar="P",
                        help=f"LoRA dropout (default {default('dropout')})")
    parser.add_argument("--target-modules", nargs="+", default=S, metavar="NAME",
                        help='name suffixes, one regex, or "all-linear" (default)')
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=S,
                        help=f"the frozen base's format (default {default('quantize')})")
    parser.add_argument("--lr", type=float, default=S, help=f"peak learning rate (default {default('lr')})")
    parser.add_argument("--batch-size", type=int, default=S, metavar="B",
                        help=f"sequences per micro-batch per process (default {default('batch_size')})")
    parser.add_argument("--grad-accum", type=int, default=S, metavar="G",
                        help=f"micro-batches per optimizer step (default {default('grad_accum')})")
    parser.add_argument("--seq-len", type=int, default=S, metavar="L",
                        help=f"tokens per sequence (default {default('seq_len')})")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=S,
                        help="recompute activations in the backward to save memory")
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=S,
                        help="pack records into full sequences (default) or pad one record per sequence")
    parser.add_argument("--fsdp", action="store_true", default=S,
                        help="under torchrun with several processes: shard the frozen base and the LoRA weights "
                        "with FSDP2 (each decoder layer, then the whole model) instead of replicating them with "
                        "DDP; needs a dense base (--quantize none); one process runs as without it")
    parser.add_argument("--out", metavar="DIR", default=S, help=f"output directory (default {default('out')})")
    parser.add_argument("--resume", action="store_true", default=S,
                        help="continue the run whose last checkpoint is in DIR")


def given_fields(args: argparse.Namespace) -> dict:
    """The config fields given on the command line, normalized as the config stores them."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if "target_modules" in given:
        given["target_modules"] = parse_target_modules(given["target_modules"])
    for name in ("model", "data"):
        if given.get(name) is not None:
            given[name] = os.path.abspath(given[name])
    return given


def resolve(given: dict, saved: dict | None) -> TrainConfig:
    """The run's config: ``given`` alone, or (resuming) ``saved`` with every given field checked against it."""
    if saved is None:
        return TrainConfig(**given)
    config = TrainConfig.from_dict({**saved, "out": given.get("out", saved["out"]), "resume": True})
    stored = config.computed()
    # Compare after the dataclass normalizes the given values (e.g. ints given for float fields).
    normalized = TrainConfig(**{**stored, **{k: v for k, v in given.items() if k not in NOT_COMPARED}}).computed()
    diffs = [f"--{k.replace('_', '-')}: checkpoint has {stored[k]!r}, command line gives {normalized[k]!r}"
             for k in stored if normalized[k] != stored[k]]
    if diffs:
        raise ValueError("--resume: the command line differs from the checkpoint's config (nothing was changed):\n  "
                         + "\n  ".join(diffs))
    return config
