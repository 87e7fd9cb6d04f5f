"""The memory planner behind ``fusedlora plan``: per-GPU bytes of a LoRA / QLoRA run under FSDP2
(``fusedlora.fully_shard``), by part, for a dense, NF4 and INT4 base.

The model is a Llama-architecture decoder (hidden h, intermediate I, L layers, n_h heads, n_kv key/value
heads of width d = h / n_h, vocabulary V), LoRA of rank r on all seven linears of every layer, run in a
16-bit compute dtype (s = 2 bytes), with T = batch × sequence tokens per process and N processes. Parts:

- **base shard**: the frozen base's bytes / N (on the host instead with ``--cpu-offload``: FSDP2's
  CPUOffloadPolicy keeps the sharded parameters, gradients and AdamW state there). A linear [n, k] costs
  n·k·s dense; NF4 n·k/2 codes plus one absmax per block (a byte
  with double quantization, plus an fp32 per 256 blocks and a 256-entry fp32 table; fp32 without);
  INT4 n·k/2 codes plus an fp32 scale and a uint8 zero per group of a row. Embeddings, norms and the
  output head stay dense.
- **all-gather buffers**: what FSDP2 holds whole while a unit runs: the root unit (embeddings, final norm,
  output head: it stays gathered through the step) and two of the largest units (the running one and the
  prefetched one: a 4-bit linear with its LoRA factors, or a dense decoder layer). None with N = 1.
- **adapters + grads + AdamW**: the LoRA factors in fp32, their gradients and AdamW's two moments, 16
  bytes per trainable parameter, / N (on the host with ``--cpu-offload``).
- **activations**: per token per layer, the tensors the backward keeps: the two RMSNorms (their fp32 input
  and the 16-bit output, (4 + s)·h each), the inputs of the four LoRA groups (h, h, h, I) and their x·Aᵀ
  (7 of r), attention's q, k, v and output (flash-style, plus 4 bytes of log-sum-exp per head) and the
  MLP's gate, silu(gate), up (3·I):
  s·(4h + 2·n_kv·d + 4I + 7r) + (8 + 2s)·h + 4·n_h bytes. With gradient checkpointing each layer keeps
  its input only (h·s per token) and one layer at a time is recomputed in full.
- **logits / loss**: T·V·(s + 4 + 4 + 4): the logits, their fp32 copy, the saved log-softmax and the
  gradient of the fp32 logits.
- **allocator slack**: 10 % of the above (the caching allocator's fragmentation) plus 0.75 GiB for the CUDA
  context and the communication buffers.

The base bytes are exact (``tests/test_plan.py`` checks them against a model's own tensors); the
activation terms are an estimate of the usual eager Llama with SDPA attention.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from .formats.packed import NESTED_BLOCKSIZE, n_blocks

GIB = 2**30
FORMATS = ("none", "nf4", "int4")
# Published architectures (their config.json's numbers), for planning without a download.
PRESETS = {
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256),
}
SLACK_FRACTION = 0.10
CONTEXT_BYTES = int(0.75 * GIB)


@dataclass(frozen=True)
class Architecture:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, doc: dict) -> Architecture:
        doc = doc.get("text_config", doc) if "hidden_size" not in doc else doc
        try:
            heads = int(doc["num_attention_heads"])
            return cls(int(doc["hidden_size"]), int(doc["intermediate_size"]), int(doc["num_hidden_layers"]), heads,
                       int(doc.get("num_key_value_heads") or heads), int(doc["vocab_size"]),
                       bool(doc.get("tie_word_embeddings", False)))
        except KeyError as exc:
            raise ValueError(f"--model: the config has no {exc.args[0]!r} (expected a Llama-architecture config)") \
                from None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of one decoder layer's linears: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]

    def root_params(self) -> int:
        """Embeddings, final norm and (untied) output head: the parameters outside the decoder layers."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def layer_norm_params(self) -> int:
        return 2 * self.hidden


def linear_bytes(n: int, k: int, fmt: str, *, dtype_bytes: int = 2, block: int = 64, double_quant: bool = True,
                 group_size: int = 128) -> int:
    """Bytes of a frozen linear base W [n, k] in ``fmt`` (the tensors ``LoRALinear`` holds for it, without its
    two small metadata buffers)."""
    if fmt == "none":
        return n * k * dtype_bytes
    codes = (n * k + 1) // 2
    if fmt == "nf4":
        nb = n_blocks(n * k, block)
        if double_quant:
            return codes + nb + 4 * n_blocks(nb, NESTED_BLOCKSIZE) + 4 * 256
        return codes + 4 * nb
    if fmt == "int4":
        return codes + n * (k // group_size) * 5
    raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")


def activation_bytes_per_token(arch: Architecture, rank: int, dtype_bytes: int = 2) -> int:
    """What one decoder layer keeps for the backward, per token (see the module docstring)."""
    s, h = dtype_bytes, arch.hidden
    return (s * (4 * h + 2 * arch.kv_heads * arch.head_dim + 4 * arch.intermediate + 7 * rank)
            + (8 + 2 * s) * h + 4 * arch.heads)


@dataclass(frozen=True)
class Run:
    gpus: int
    seq_len: int
    batch_size: int
    rank: int = 16
    gradient_checkpointing: bool = False
    cpu_offload: bool = False
    dtype_bytes: int = 2
    block: int = 64
    double_quant: bool = True
    group_size: int = 128


def lora_params(arch: Architecture, rank: int) -> int:
    return arch.layers * sum(rank * (n + k) for n, k in arch.linears())


def base_bytes(arch: Architecture, fmt: str, run: Run) -> int:
    """The whole frozen base: the decoder layers' linears in ``fmt``, the rest dense."""
    kw = dict(dtype_bytes=run.dtype_bytes, block=run.block, double_quant=run.double_quant, group_size=run.group_size)
    linears = arch.layers * sum(linear_bytes(n, k, fmt, **kw) for n, k in arch.linears())
    return linears + (arch.root_params() + arch.layers * arch.layer_norm_params()) * run.dtype_bytes


def plan(arch: Architecture, fmt: str, run: Run) -> dict[str, int]:
    """Per-GPU bytes by part (see the module docstring)."""
    n, s = run.gpus, run.dtype_bytes
    kw = dict(dtype_bytes=s, block=run.block, double_quant=run.double_quant, group_size=run.group_size)
    base = base_bytes(arch, fmt, run)
    if n == 1:
        gathers = 0
    else:
        lora_fp32 = [4 * run.rank * (o + i) for o, i in arch.linears()]
        units = [linear_bytes(o, i, fmt, **kw) + a for (o, i), a in zip(arch.linears(), lora_fp32, strict=True)]
        if fmt == "none":  # one dense unit per decoder layer
            units = [sum(units) + arch.layer_norm_params() * s]
        gathers = arch.root_params() * s + 2 * max(units)
    tokens = run.batch_size * run.seq_len
    per_layer = activation_bytes_per_token(arch, run.rank, s) * tokens
    if run.gradient_checkpointing:
        activations = arch.layers * arch.hidden * s * tokens + per_layer
    else:
        activations = arch.layers * per_layer
    parts = {
        "base shard": 0 if run.cpu_offload else math.ceil(base / n),
        "all-gather buffers": gathers,
        "adapters + grads + AdamW": 0 if run.cpu_offload else math.ceil(16 * lora_params(arch, run.rank) / n),
        "activations": activations,
        "logits / loss": tokens * arch.vocab * (s + 12),
    }
    parts["allocator slack"] = int(SLACK_FRACTION * sum(parts.values())) + CONTEXT_BYTES
    parts["total"] = sum(parts.values())
    return parts


def parse_bytes(text: str) -> int:
    """'24GB' (10^9), '24GiB' (2^30), '80G', '512MiB', or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory: expected a size such as 24GB or 80GiB, got {text!r}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def load_architecture(spec: str) -> Architecture:
    """A preset name, a config.json, or a folder holding one."""
    if spec.lower() in PRESETS:
        return Architecture.from_config(PRESETS[spec.lower()])
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model: {spec} is neither a preset ({', '.join(PRESETS)}), a config.json nor a "
                                "folder holding one")
    return Architecture.from_config(read_config(path))


def read_config(path: str) -> dict:
    """A model's config.json as a dict; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model: {path} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--model: {path} is not a JSON object")
    return doc


def table(arch: Architecture, run: Run, gpu_memory: int) -> str:
    """The plan of the three formats side by side, in GiB, and whether each fits."""
    plans = {fmt: plan(arch, fmt, run) for fmt in FORMATS}
    head = ["part (GiB per GPU)", "bf16 base", "NF4 base", "INT4 base"]
    rows = [[part] + [f"{plans[f][part] / GIB:.2f}" for f in FORMATS] for part in plans["none"]]
    rows.append(["fits in " + f"{gpu_memory / GIB:.1f} GiB"] + ["yes" if plans[f]["total"] <= gpu_memory else "no"
                                                                 for f in FORMATS])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    host = "" if not run.cpu_offload else (
        "; base on the host: " + ", ".join(f"{f} {base_bytes(arch, f, run) / run.gpus / GIB:.1f} GiB per process"
                                           for f in FORMATS))
    title = (f"{run.gpus} GPU(s), batch {run.batch_size} × seq {run.seq_len}, LoRA r={run.rank} on all linears, "
             f"{lora_params(arch, run.rank):,} trainable parameters"
             f"{', gradient checkpointing' if run.gradient_checkpointing else ''}{host}")
    return "\n".join([title, *lines])


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="per-GPU memory of a LoRA/QLoRA run under FSDP2, by part",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, metavar="CONFIG_OR_DIR",
                   help=f"a config.json, a folder holding one, or a preset: {', '.join(PRESETS)}")
    p.add_argument("--gpus", type=int, default=1, metavar="N")
    p.add_argument("--gpu-memory", default="80GB", metavar="SIZE", help="per GPU: 24GB (10^9 bytes), 24GiB, ...")
    p.add_argument("--seq-len", type=int, default=2048, metavar="L")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="sequences per micro-batch per GPU")
    p.add_argument("--rank", type=int, default=16, metavar="R")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cpu-offload", action="store_true",
                   help="the sharded base, gradients and AdamW state on the host (FSDP2's CPUOffloadPolicy)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    for name in ("gpus", "seq_len", "batch_size", "rank"):
        if getattr(args, name) < 1:
            raise SystemExit(f"fusedlora plan: error: --{name.replace('_', '-')}: expected a positive integer")
    try:
        arch = load_architecture(args.model)
        memory = parse_bytes(args.gpu_memory)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"fusedlora plan: error: {exc}") from None
    run = Run(args.gpus, args.seq_len, args.batch_size, args.rank, args.gradient_checkpointing, args.cpu_offload)
    print(table(arch, run, memory))
    return 0
