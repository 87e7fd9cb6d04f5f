"""The whole-QLoRA-step bench: one optimizer step of a Llama-architecture model, ours against PEFT.

Model: built from a transformers ``LlamaConfig`` (nothing is downloaded; the weights are drawn from a seed).
On a GPU it is the ~1B model of DESIGN.md's "Whole training step" target: hidden 2048, 16 layers, 32
attention heads (8 key/value heads), intermediate 8192, vocab 32000, bf16, batch 1 × seq 2048. Intermediate
8192 rather than 5632 because hidden 2048 with 16 layers is Llama-3.2-1B's shape, whose MLP is 8192 wide:
its linear layers hold 973M parameters, 1.10B with the (untied) embedding and output head; 5632 is
TinyLlama's width, a 22-layer model. ``quick`` keeps every width and the sequence (so the same kernels and
shapes run) with 4 layers. On a CPU, ``tiny`` (width 128, 2 layers) lets the harness run anywhere.

Variants, built one at a time in one process from the same base weights, batch, LoRA values and seed; each
model is freed before the next is built:
- ours: ``fl.inject(model, "all-linear", r=16, alpha=32, dropout=0.1, quantize="nf4")`` (NF4, blocksize 64,
  double quantization, as QLoRA). Where bitsandbytes runs, the targeted layers are first converted to its
  4-bit layers and ours takes their 4-bit tensors as they are, so ours and ``peft_bnb`` read the same bytes.
- ``peft_bnb``: PEFT LoRA (all-linear, same r, alpha, dropout) over the model with every targeted
  ``nn.Linear`` replaced by a bitsandbytes ``Linear4bit`` (NF4, double quantization, blocksize 64, bf16
  compute) of the same weights and ``is_loaded_in_4bit`` set: the model ``BitsAndBytesConfig(load_in_4bit=
  True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` loads, without the checkpoint round
  trip. No ``prepare_model_for_kbit_training``: it upcasts norms and turns on gradient checkpointing, which
  no other variant does. GPU only (skipped when bitsandbytes does not import).
- ``peft_bf16``: PEFT LoRA over the dense model whose linear weights are ours dequantized (a dense base's
  speed does not depend on its values, and so all three variants compute one function).
Every adapter starts from the same random A and B (B not zero, its update a quarter of the spread of the
base weights), so the check below covers the LoRA path too.

One step = forward + loss (next-token cross entropy: transformers' ``labels=input_ids``) + backward +
AdamW step on the LoRA parameters (fp32 adapters in every variant, as PEFT keeps them), under bf16 autocast
on a GPU as ``fusedlora train`` runs; no gradient checkpointing. Timing: ``timing.measure`` (triton's
do_bench on a GPU: CUDA events, median of the repetitions) after one untimed step that compiles the kernels
and creates AdamW's moments. Peak memory: ``torch.cuda.max_memory_allocated`` over one steady-state step,
reset just before it, counting everything allocated (weights, adapters, AdamW moments, activations,
gradients); between variants every tensor of the previous model is freed.

Rows: ``bench="step"``, ``shape=[hidden, n_layers]`` (for the layer benches "shape" is [K, N]; for a whole
model it holds its width and depth), ``m`` = tokens per step (batch × seq), r, dropout, dtype,
``quant="nf4-dq"``. % of roofline: the step's matmul FLOPs against the matmul rate measured in the run, with
T tokens, batch B, sequence S, L layers, width H, vocab V:
    F = Σ_(targeted K→N) [4·T·K·N + 6·T·r·(K+N)] + 4·T·H·V + 6·L·B·S²·H
The frozen bases cost their forward and dX (no dW: 4·T·K·N, not 6); the LoRA products cost forward, dX and
dW; the frozen output head its forward and dX; causal attention QKᵀ and PV (forward 2·B·S²·H per layer,
half of the square, backward twice the forward). Norms, rotary, softmax and AdamW are not counted.

Same-function check, printed for every baseline before its row is written (no row when it fails): the
loss and a strided sample of the logits of the first batch, with dropout off (the timed steps draw their
dropout masks from different RNG streams), ours against the baseline. See ``check_tolerance``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time

import torch

from ..inject import find_targets, inject, lora_layers, set_submodule
from ..modules import LoRALinear
from . import baselines
from .layer import DTYPE_NAMES, layer_flops
from .results import baseline_label, make_row, save
from .timing import Budget, peak_memory_bytes
from .timing import measure as measure_time

STEP_BASELINES = ("peft_bnb", "peft_bf16")
# DESIGN.md's targets: ours' tokens/s at least this many times the baseline's (and peak memory ≤ peft_bnb's)
TARGET_SPEEDUP = {"peft_bnb": 1.4, "peft_bf16": 1.0}
# Llama-3.2-1B's layer shapes with a 32000 vocabulary; "quick" the same widths and 4 layers.
SIZES = {
    "full": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000),
    "quick": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
LOGIT_STRIDE = 16  # every 16th position's logits are compared (2048 × 32000 in full would be 262 MB in fp32)


def llama_config(size: str = "full", seq: int = 2048):
    from transformers import LlamaConfig

    if size not in SIZES:
        raise ValueError(f"size: expected one of {tuple(SIZES)}, got {size!r}")
    return LlamaConfig(**SIZES[size], max_position_embeddings=seq, tie_word_embeddings=False)


def check_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(relative loss difference, relative L2 logits difference) two implementations of one function may show.

    fp32: both sides are fp32 matmuls of the same values in different orders; a relative round-off of 6e-8
    per add over sums of a few hundred terms stays below 1e-5, and 1e-4 leaves a margin.
    bf16: linear outputs, residual sums and attention products are rounded to 8 significant bits (2⁻⁹ ≈
    0.2 % relative) at different places in the two implementations (ours adds the LoRA term to the fp32
    accumulator and rounds once; PEFT rounds the base and LoRA outputs apart). Measured on a CPU with a
    bf16 model of 16 layers of width 256, seq 256, the LoRA update a quarter of the base's spread (the
    reference op accumulating in fp32 and rounding once, as the fused kernels do), ours against PEFT over the
    same weights: 7.7e-5 relative in the loss, 1.4 % in the logits. The tolerances, 1e-3 and 5 %, leave room
    for the GPU's matmul orders, and a different function is far outside them in the logits: without the
    LoRA term the logits move by 77 % (the loss by 2.2e-3), with the dense weights instead of the NF4 ones by
    32 % (the loss by 4.0e-4, which is why the loss alone cannot tell them apart).
    """
    return (1e-4, 1e-4) if dtype in (torch.float32, torch.float64) else (1e-3, 5e-2)


class StepCase:
    """The base weights (on the host), the batch and the LoRA values that every variant starts from.

    ``quant``: "nf4-dq" (ours quantizes, or takes bitsandbytes' bytes where ``use_bnb``) or "none" (every
    variant keeps the dense base; no ``peft_bnb``).
    """

    def __init__(self, config, *, seq, batch=1, r=16, alpha=32, dropout=0.1, quant="nf4-dq", dtype=None,
                 device=None, seed=0, use_bnb=None):
        if quant not in ("nf4-dq", "none"):
            raise ValueError(f"quant: expected 'nf4-dq' or 'none', got {quant!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.config, self.seq, self.batch, self.seed = config, seq, batch, seed
        self.r, self.alpha, self.dropout, self.quant = r, alpha, dropout, quant
        # bitsandbytes by default on a GPU only: its CPU kernels are not what a QLoRA run uses
        want_bnb = quant != "none" and (use_bnb if use_bnb is not None else self.device.type == "cuda")
        self.bnb = baselines.bitsandbytes() if want_bnb else None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = self._new_model()
        modules = dict(model.named_modules())
        self.targets = {n: (modules[n].in_features, modules[n].out_features)
                        for n in find_targets(model, "all-linear")}
        self.state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        del model
        g = torch.Generator().manual_seed(seed + 1)
        self.ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g).to(self.device)
        # A like a kaiming init (std 1/√K); B sized so s·B·A has a quarter of the base weights' spread.
        scale = alpha / r
        self.lora = {}
        for name, (k, n) in self.targets.items():
            std_b = 0.25 * config.initializer_range * math.sqrt(k) / (scale * math.sqrt(r))
            self.lora[name] = (torch.randn(r, k, generator=g) / math.sqrt(k), torch.randn(n, r, generator=g) * std_b)
        self.dense_state = None  # the dequantized linear weights, for peft_bf16 (filled by build("ours"))

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def flops(self) -> float:
        """The step's matmul FLOPs (module docstring)."""
        c, t = self.config, self.tokens
        lin = sum(layer_flops(t, k, n, self.r) for k, n in self.targets.values())
        head = 4 * t * c.hidden_size * c.vocab_size
        attn = 6 * c.num_hidden_layers * self.batch * self.seq**2 * c.hidden_size
        return float(lin + head + attn)

    def autocast(self):
        if self.dtype in (torch.float32, torch.float64):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def available(self, name: str) -> bool:
        if name == "ours":
            return True
        if name == "peft_bnb":
            return self.bnb is not None and baselines.peft_available()
        if name == "peft_bf16":
            return baselines.peft_available()
        raise ValueError(f"variant: expected 'ours' or one of {STEP_BASELINES}, got {name!r}")

    # ------------------------------------------------------------------------------------------ models
    def _new_model(self):
        """A randomly initialized model made in the compute dtype on the device, as transformers loads one with
        ``dtype=``: the rotary frequencies stay fp32."""
        from transformers import LlamaForCausalLM

        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                return LlamaForCausalLM(self.config)
        finally:
            torch.set_default_dtype(default)

    def dense_model(self, state=None):
        model = self._new_model()
        model.load_state_dict(state or self.state)
        return model

    def to_bnb(self, model):
        """Every targeted nn.Linear replaced by a bitsandbytes NF4 (double-quantized) Linear4bit of its weight."""
        bnb = self.bnb
        for name in self.targets:
            old = model.get_submodule(name)
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=self.dtype, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, blocksize=64, module=new)
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.data, requires_grad=False)
            set_submodule(model, name, new.to(self.device))  # bitsandbytes quantizes on the move
        model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; PEFT picks its 4-bit layer
        return model

    def build(self, name: str):
        """The model of variant ``name``, adapters set to the case's LoRA values, in train mode."""
        if name == "ours":
            model = self.dense_model()
            if self.bnb is not None:
                model = self.to_bnb(model)
            inject(model, target_modules="all-linear", r=self.r, alpha=self.alpha, dropout=self.dropout,
                   quantize=None if self.quant == "none" else "nf4")
            layers = lora_layers(model)
            self._check_targets(set(layers), name)
            with torch.no_grad():
                for n, layer in layers.items():
                    a, b = self.lora[n]
                    layer.lora_A.copy_(a)
                    layer.lora_B.copy_(b)
            if self.quant != "none":
                self.dense_state = {f"{n}.weight": layer.dense_base_weight(self.dtype).cpu()
                                    for n, layer in layers.items()}
        else:
            from peft import LoraConfig, get_peft_model
            from peft.tuners.lora import LoraLayer

            if name == "peft_bnb":
                model = self.to_bnb(self.dense_model())
            elif self.quant != "none" and self.dense_state is None:
                raise RuntimeError("peft_bf16: build ours first (its base is ours dequantized)")
            else:
                model = self.dense_model({**self.state, **(self.dense_state or {})})
            model = get_peft_model(model, LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                                     target_modules="all-linear", bias="none",
                                                     task_type="CAUSAL_LM"))
            inner = model.base_model.model
            layers = {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
            self._check_targets(set(layers), name)
            with torch.no_grad():
                for n, layer in layers.items():
                    a, b = self.lora[n]
                    layer.lora_A["default"].weight.copy_(a)
                    layer.lora_B["default"].weight.copy_(b)
        model.train()
        return model

    def _check_targets(self, names: set, variant: str) -> None:
        if names != set(self.targets):
            diff = sorted(names.symmetric_difference(self.targets))
            raise RuntimeError(f"{variant}: its LoRA layers differ from the targeted linears: {diff[:4]}")

    # -------------------------------------------------------------------------------------- running
    def loss(self, model):
        return model(input_ids=self.ids, labels=self.ids, use_cache=False).loss

    @torch.no_grad()
    def check_outputs(self, model) -> tuple[float, torch.Tensor]:
        """(loss, logits at every LOGIT_STRIDE-th position in fp32 on the host) of the batch, dropout off.

        The model stays in train mode with its dropout probabilities set to 0 for the call: bitsandbytes'
        CPU forward in eval mode repacks its 4-bit weights in place for a bf16 kernel with no backward."""
        held = []
        for m in model.modules():
            if isinstance(m, (LoRALinear, torch.nn.Dropout)):
                attr = "dropout" if isinstance(m, LoRALinear) else "p"
                held.append((m, attr, getattr(m, attr)))
                setattr(m, attr, 0.0)
        try:
            with self.autocast():
                out = model(input_ids=self.ids, labels=self.ids, use_cache=False)
        finally:
            for m, attr, value in held:
                setattr(m, attr, value)
        return float(out.loss), out.logits[:, ::LOGIT_STRIDE].float().cpu()

    def step_fn(self, model, lr: float = 1e-4):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)

        def step():
            with self.autocast():
                loss = self.loss(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step


def compare(ours: tuple[float, torch.Tensor], theirs: tuple[float, torch.Tensor], dtype) -> tuple[bool, str]:
    """Whether two check_outputs agree within check_tolerance(dtype), and a line saying by how much."""
    (l0, z0), (l1, z1) = ours, theirs
    loss_rel = abs(l0 - l1) / abs(l1)
    logit_rel = float((z0 - z1).norm() / z1.norm())
    tol_loss, tol_logits = check_tolerance(dtype)
    ok = loss_rel <= tol_loss and logit_rel <= tol_logits
    msg = (f"loss ours {l0:.6f} vs {l1:.6f} (rel {loss_rel:.1e}, tol {tol_loss:.0e}); logits rel L2 "
           f"{logit_rel:.1e} (tol {tol_logits:.0e}): {'same function' if ok else 'MISMATCH: no row'}")
    return ok, msg


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(case: StepCase, name: str, *, rep_ms: int = 1000, cpu_reps: int = 9) -> dict:
    """Build variant ``name``, check its outputs, time its step and take its peak memory; the model is freed."""
    model = case.build(name)
    check = case.check_outputs(model)
    torch.manual_seed(case.seed + 2)  # the same dropout stream for every variant's steps
    step = case.step_fn(model)
    step()  # compiles the kernels, creates AdamW's moments
    peak = None
    if case.device.type == "cuda":
        peak = torch.cuda.memory_allocated() + peak_memory_bytes(step)
    t = measure_time(step, rep_ms=rep_ms, cpu_reps=cpu_reps)
    del step, model
    _free(case.device)
    left = torch.cuda.memory_allocated() if case.device.type == "cuda" else None
    return {"check": check, "ms": t.ms, "iqr": t.iqr, "peak": peak, "left": left}


def run_step(case: StepCase, *, baseline_names=STEP_BASELINES, ceilings=None, budget_s=None, out_path=None,
             env=None, rep_ms: int = 1000, cpu_reps: int = 9, log=print):
    """Rows of ``case``: ours, then each available baseline in order, one row per baseline whose outputs
    match ours (compare). Stops starting baselines once ``budget_s`` is spent; rewrites ``out_path`` after
    every row. Returns (rows, failed baseline names)."""
    budget, rows, failed = Budget(budget_s, log), [], []
    c = case.config
    shape = (c.hidden_size, c.num_hidden_layers)

    def line(name, res):
        text = (f"{name}: {res['ms']:.2f} ms/step (IQR {res['iqr']:.2f}), "
                f"{case.tokens / (res['ms'] * 1e-3):,.0f} tokens/s")
        if res["peak"] is not None:
            text += f", peak {res['peak'] / 2**20:,.0f} MiB"
        if res["left"]:  # what the freed model left allocated (0 when nothing leaks into the next variant)
            text += f", {res['left'] / 2**20:,.0f} MiB still allocated after freeing it"
        return text + f"  [{time.perf_counter() - budget.start:.0f} s]"

    ours = measure(case, "ours", rep_ms=rep_ms, cpu_reps=cpu_reps)
    pct = None
    if ceilings:
        pct = 100.0 * case.flops() / (ceilings["matmul_tflops"] * 1e12) / (ours["ms"] * 1e-3)
    log(f"step, width {shape[0]}, {shape[1]} layers, {case.batch}x{case.seq} tokens, {case.quant}, "
        f"{DTYPE_NAMES[case.dtype]}" + ("" if pct is None else f"; ours at {pct:.0f} % of the matmul roofline"))
    log(line("ours", ours))
    for name in baseline_names:
        if not case.available(name):
            log(f"{name}: skipped (needs {'bitsandbytes and a GPU' if name == 'peft_bnb' else 'peft'})")
            continue
        if budget.spent(name):
            break
        res = measure(case, name, rep_ms=rep_ms, cpu_reps=cpu_reps)
        log(line(name, res))
        ok, msg = compare(ours["check"], res["check"], case.dtype)
        log(f"check ours vs {name}: {msg}")
        if not ok:
            failed.append(name)
            continue
        if case.device.type == "cuda":  # DESIGN.md's targets are GPU targets
            speedup, target = res["ms"] / ours["ms"], TARGET_SPEEDUP[name]
            verdict = f"ours {speedup:.2f}x the tokens/s of {name} (target >= {target}x: "
            verdict += ("met" if speedup >= target else "missed") + ")"
            if name == "peft_bnb":
                mem = ours["peak"] / res["peak"]
                verdict += f"; peak memory {mem:.2f}x (target <= 1: {'met' if mem <= 1 else 'missed'})"
            log(verdict)
        rows.append(make_row(
            bench="step", shape=shape, m=case.tokens, r=case.r, dropout=case.dropout,
            dtype=DTYPE_NAMES[case.dtype], quant=case.quant, ours_ms=ours["ms"],
            baseline=baseline_label(name, DTYPE_NAMES[case.dtype], case.device.type == "cuda"),
            baseline_ms=res["ms"], pct_roofline=pct, ours_peak_mem=ours["peak"], baseline_peak_mem=res["peak"],
            ours_iqr_ms=ours["iqr"], baseline_iqr_ms=res["iqr"]))
        if out_path is not None:
            save(rows, out_path, env)
    return rows, failed
