"""The training loop: one function, read top to bottom.

Batches. Optimizer step s reads the global batch of B·G·W sequences at sample positions
[s·B·G·W, (s+1)·B·G·W) (B batch size, G gradient accumulation, W processes); micro-step g of process r
takes its B rows starting at (g·W + r)·B. The loss is the sum of token losses over the global batch divided
by its number of label tokens (every process knows it: each holds the whole data set), so W processes with
batch B compute the same gradient as one process with batch W·B, up to the order of the sums.

Sharding. Under torchrun with several processes the model is wrapped in DDP, or with --fsdp in FSDP2
(``fusedlora.fully_shard``: each 4-bit layer, each decoder layer, then the whole model): every parameter,
frozen base (dense or 4-bit, in whole quantization blocks) and LoRA alike, is split across the processes
and gathered unit by unit for the forward and backward. Both average the gradients over the processes, so
the loss scaling below serves both. Checkpoints hold whole tensors either way (gathered from the shards;
rank 0 writes them), so a run resumes on another number of processes (the global batch is kept: see
``_resume_world``).

Exact resumption. A step depends on the trainable parameters, AdamW's state, the scheduler, torch's random
state (LoRA dropout) and the sample position; a checkpoint stores all of them, and the data order is a pure
function of (seed, sample position). Eval runs in eval mode and draws no random numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

import fusedlora as fl

from ..ops.backend import backend
from . import checkpoint, outdir
from .config import TrainConfig
from .data import IGNORE, SampleOrder, Sequences, build_sequences, builtin_records, file_sha256, load_jsonl, split
from .model import check_model_dir, check_seq_len, is_bnb_4bit, load_model, load_tokenizer, tiny_llama
from .stop import Interrupted, StopRequest

LOG = "log.jsonl"
SUMMARY = "summary.json"
PLOT = "loss.png"
BASE_DIR = "base_model"
# Dropout draws come from a stream seeded apart from the LoRA initialization, one per process.
DROPOUT_SEED_OFFSET = 10_007


# ---------------------------------------------------------------------------------------------- helpers


def lr_lambda(config: TrainConfig):
    """Linear warmup over warmup_steps, then a cosine from lr down to lr·min_lr_ratio at the last step."""
    warmup, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated CUDA memory on a GPU, else the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def _ddp(model, device: torch.device):
    """DDP without syncing buffers at each forward: the buffers (4-bit weights, rotary tables) are frozen and
    equal on every process, and broadcasting them would move the whole quantized model each step."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def _fully_shard(model, cpu_offload: bool, device: torch.device) -> None:
    """FSDP2 over ``model`` (fl.fully_shard): each decoder layer (the classes transformers names in
    ``_no_split_modules``) is one unit, gathered just before it runs and freed after, each 4-bit layer one
    too; the root unit holds the rest (embeddings, final norm, output head). fully_shard replaces the
    parameters with sharded ones: take them (and build the optimizer) after this call.

    ``cpu_offload``: FSDP2's CPUOffloadPolicy; the shards, their gradients and so AdamW's state live in host
    memory (pinned on a GPU machine, for asynchronous copies), each unit is copied to the device for its
    all-gather. The computation is the same: only where the shards are kept changes."""
    from ..sharding import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        names = sorted(getattr(model, "_no_split_modules", None) or ())
        raise ValueError(f"--fsdp: found no decoder layers in {type(model).__name__} (its _no_split_modules "
                         f"{names} match no submodule)")
    fl.fully_shard(model, **_fsdp_kwargs(cpu_offload, device))


def _fsdp_kwargs(cpu_offload: bool, device: torch.device) -> dict:
    if not cpu_offload:
        return {}
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda")}


def _loads_sharded(config: TrainConfig, fsdp: bool) -> bool:
    """Whether the model loads layer by layer into its shards (fusedlora.shard_loading): under --fsdp, a
    safetensors checkpoint, bitsandbytes 4-bit or dense and quantized to 4 bits."""
    if not fsdp or config.model is None or (config.quantize == "none" and not is_bnb_4bit(config.model)):
        return False
    from ..shard_loading import has_safetensors

    check_model_dir(config.model)
    return has_safetensors(config.model)


@contextlib.contextmanager
def _whole_parameters(model, tensors: dict[str, torch.Tensor]):
    """Registers ``tensors`` (whole, by parameter name) in place of the sharded parameters for the time of the
    block, so code that reads the modules (fl.save_adapter) sees plain whole tensors."""
    swapped = []
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        swapped.append((module, attr, module._parameters[attr]))
        module._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    try:
        yield
    finally:
        for module, attr, p in swapped:
            module._parameters[attr] = p


def _rng_tensors(device: torch.device, world: int) -> dict[str, torch.Tensor]:
    """Every process's generator states (gathered to all; rank 0 writes them)."""
    local = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(device)
    out = {}
    for kind, state in local.items():
        if world == 1:
            out[f"{kind}/0"] = state
            continue
        comm = state.to(device)
        parts = [torch.empty_like(comm) for _ in range(world)]
        dist.all_gather(parts, comm)
        out.update({f"{kind}/{r}": p.cpu() for r, p in enumerate(parts)})
    return out


def _set_rng(tensors: dict[str, torch.Tensor], device: torch.device, rank: int) -> None:
    """This process's saved generator states; a process the saved run did not have keeps its fresh seed."""
    if f"cpu/{rank}" not in tensors:
        return
    torch.set_rng_state(tensors[f"cpu/{rank}"])
    if device.type == "cuda" and f"cuda/{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"cuda/{rank}"], device)


def _token_loss_sum(model, batch: dict, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over label tokens, number of label tokens)."""
    with autocast():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def evaluate(model, seqs, config: TrainConfig, device, autocast, rank: int, world: int) -> float:
    """Mean token loss over the first eval_batches global batches (B·W rows each) of the held-out split;
    process r takes every W-th batch of B rows, so the number of processes does not change the result.
    Every process runs the same number of forwards (a sharded model gathers its layers in each, with all the
    processes): one left without a batch of its own runs the first rows again (no more than the split holds)
    and counts nothing."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    b_size = config.batch_size
    n_batches = math.ceil(min(len(seqs), config.eval_batches * b_size * world) / b_size)
    with torch.no_grad():
        for b in range(rank, math.ceil(n_batches / world) * world, world):
            mine = b < n_batches
            rows = (torch.arange(b * b_size, min((b + 1) * b_size, len(seqs))) if mine
                    else torch.arange(min(b_size, len(seqs))))
            batch = {k: v.to(device) for k, v in seqs.rows(rows).items()}
            loss, n = _token_loss_sum(model, batch, autocast)
            if mine:
                total += torch.stack([loss.double(), n.double()])
    model.train(was_training)
    total = _all_sum(total, world)
    return float(total[0] / total[1].clamp(min=1))


def write_plot(path: str, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def save_pretrained_quietly(model, path: str) -> None:
    """The built-in base as transformers saves it (config.json + model.safetensors; its output head is not
    tied), so AutoModelForCausalLM and PEFT load it and the adapter; without transformers' progress bar."""
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ train


@dataclass
class Inputs:
    """What a run reads besides the model, checked whole before the model loads."""

    tokenizer: object
    seqs: Sequences
    eval_seqs: Sequences | None
    fingerprint: str


def prepare(config: TrainConfig) -> Inputs:
    """Every input but the model, parsed and checked: the tokenizer, every line of the data file, the sequence
    length against the model's config. With --epochs, sets config.steps. Nothing is written."""
    check_seq_len(config.model, config.seq_len)
    if config.data is not None and not os.path.isfile(config.data):
        what = "is a folder, not a file" if os.path.isdir(config.data) else "does not exist"
        raise FileNotFoundError(f"--data: {config.data} {what}")
    tok = load_tokenizer(config.model)
    if config.data is None:
        records, fingerprint = builtin_records(), "builtin"
    else:
        records, fingerprint = load_jsonl(config.data), file_sha256(config.data)
    # The split does not depend on eval_every: how often the held-out loss is measured never changes training.
    train_records, eval_records = split(records, config.eval_fraction)
    seqs = build_sequences(train_records, tok, config.seq_len, config.pack)
    eval_seqs = (build_sequences(eval_records, tok, config.seq_len, config.pack)
                 if eval_records and config.eval_every else None)
    if config.epochs is not None:
        per_step = config.batch_size * config.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
        config.steps = max(1, math.ceil(config.epochs * len(seqs) / per_step))
    return Inputs(tok, seqs, eval_seqs, fingerprint)


def train(config: TrainConfig, saved_state: dict | None = None, progress: bool = True) -> dict:
    """Run (or, with ``saved_state``, continue) the training ``config`` describes; returns the summary.
    Inputs are checked before the output folder is claimed (process 0 locks it) and the model loads.
    SIGINT/SIGTERM end the run after the current step with a checkpoint (``Interrupted``).

    The built-in model runs on one CPU thread unless OMP_NUM_THREADS says otherwise: its matmuls (at most
    1024×384×128) gain little from a second thread, and OpenMP threads waiting on each other for a busy core
    lose much more. Measured on a 2-core machine with other work running: the default run took 91 s with
    two threads and 34 s with one, with equal losses."""
    if saved_state is not None:
        _resume_world(config, saved_state, int(os.environ.get("WORLD_SIZE", "1")))
    inputs = prepare(config)
    lock = outdir.claim(config.out) if int(os.environ.get("RANK", "0")) == 0 else None
    threads = torch.get_num_threads()
    if config.model is None and "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        with StopRequest() as stop:
            return _train(config, saved_state, inputs, stop, progress)
    finally:
        torch.set_num_threads(threads)
        if lock:
            lock.release()


def _resume_world(config: TrainConfig, saved_state: dict, world: int) -> None:
    """Resuming on another number of processes keeps the global batch, B·G·W sequences per step: G becomes
    G·W_saved / W, which must be a whole number (else a clear error). The sum over the global batch is the
    same; which process takes which rows, and so the dropout draws, differ from the saved run's."""
    saved = saved_state.get("world_size")
    if saved == world:
        return
    b = config.batch_size
    per_step = b * config.grad_accum * saved if isinstance(saved, int) and saved > 0 else None
    if per_step is None or per_step % (b * world):
        raise ValueError(f"--resume: the checkpoint ran on {saved!r} processes with {per_step} sequences per step "
                         f"(--batch-size {b} × --grad-accum {config.grad_accum} × processes); {world} processes "
                         f"with --batch-size {b} cannot split that into whole micro-batches: resume on a number "
                         f"of processes dividing {per_step // b if per_step else '?'}")
    config.grad_accum = per_step // (b * world)


@dataclass
class Run:
    """A run's state between its steps."""

    config: TrainConfig
    inputs: Inputs
    rank: int
    world: int
    device: torch.device
    autocast: object
    model: torch.nn.Module
    net: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    fsdp: bool
    ddp: bool
    start: int
    saved_step: int | None
    history: list = field(default_factory=list)
    log_file: object = None
    tokens: int = 0
    seconds: float = 0.0

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def per_step(self) -> int:
        """Sequences per optimizer step, all processes."""
        return self.config.batch_size * self.config.grad_accum * self.world

    def log(self, row: dict) -> None:
        self.history.append(row)
        if self.log_file:
            self.log_file.write(json.dumps(row) + "\n")
            self.log_file.flush()


def _train(config: TrainConfig, saved_state: dict | None, inputs: Inputs, stop: StopRequest, progress: bool) -> dict:
    run = _setup(config, saved_state, inputs)
    try:
        _open_outputs(run, saved_state)
        _check_stop(run, stop)
        order = SampleOrder(len(inputs.seqs), config.seed)
        if run.start == 0 and inputs.eval_seqs is not None:
            _evaluate(run, 0)
        from tqdm.auto import tqdm

        with tqdm(total=config.steps, initial=run.start, disable=not (run.writer and progress), desc="train",
                  unit="step", dynamic_ncols=True) as bar:
            for step in range(run.start, config.steps):
                row = _step(run, order, step)
                done = step + 1
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{run.tokens / run.seconds:,.0f}",
                                mem=f"{peak_memory(run.device) / 2**20:,.0f}MiB", refresh=False)
                bar.update(1)
                if inputs.eval_seqs is not None and (done % config.eval_every == 0 or done == config.steps):
                    ev = _evaluate(run, done)
                    if run.writer and progress:
                        bar.write(f"step {done}: eval loss {ev:.4f}")
                if (config.save_every and done % config.save_every == 0) or done == config.steps:
                    _save(run, done)
                _check_stop(run, stop, bar)
    finally:
        if run.log_file:
            run.log_file.close()
    return _finish(run, saved_state)


def _setup(config: TrainConfig, saved_state: dict | None, inputs: Inputs) -> Run:
    """Processes, device, the model (base in the compute dtype, adapters in fp32 on the targeted linears), the
    optimizer and scheduler, and the checkpoint's state when resuming."""
    rank, world, local_rank = _distributed()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    base_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(config.dtype,
                                                                      torch.bfloat16 if on_gpu else torch.float32)
    bf16_gpu = on_gpu and base_dtype == torch.bfloat16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16_gpu else contextlib.nullcontext
    if on_gpu:
        torch.cuda.set_device(device)
    if saved_state is not None:
        if saved_state.get("data_sha256") != inputs.fingerprint:
            raise ValueError(f"--resume: the data differs from the checkpoint's (sha256 {inputs.fingerprint} vs "
                             f"{saved_state.get('data_sha256')})")
    quantize = {"none": None, "int4": {"scheme": "int4", "group_size": config.group_size}}.get(config.quantize,
                                                                                               config.quantize)
    adapter = dict(target_modules=config.target_modules, r=config.rank, alpha=config.alpha, dropout=config.dropout,
                   use_dora=config.dora)
    fsdp = config.fsdp and world > 1
    sharded = _loads_sharded(config, fsdp)
    if sharded:  # a process holds its shard plus one layer; the same model as below, already sharded
        from ..shard_loading import load_sharded

        if rank == 0:
            print(f"loading {config.model} layer by layer into {world} shards", file=sys.stderr, flush=True)
        torch.manual_seed(config.seed)
        model = load_sharded(config.model, quantize=quantize, dtype=base_dtype, device=device,
                             fsdp_kwargs=_fsdp_kwargs(config.cpu_offload, device), **adapter)
    else:
        model = load_model(config.model, base_dtype)
        torch.manual_seed(config.seed)
        model.to(device=device, dtype=base_dtype)
        fl.inject(model, quantize=quantize, **adapter)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if fsdp and not sharded:
        _fully_shard(model, config.cpu_offload, device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in params], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    torch.manual_seed(config.seed + DROPOUT_SEED_OFFSET * (rank + 1))
    run = Run(config, inputs, rank, world, device, autocast, model, model, params, optimizer, scheduler, fsdp,
              ddp=world > 1 and not fsdp, start=0, saved_step=None)
    if saved_state is not None:
        _set_rng(checkpoint.load(config.out, saved_state, params, optimizer), device, rank)
        scheduler.load_state_dict(saved_state["scheduler"])
        run.start = run.saved_step = saved_state["step"]
        run.history = list(saved_state["log_history"])
    if run.ddp:
        run.net = _ddp(model, device)
    return run


def _open_outputs(run: Run, saved_state: dict | None) -> None:
    """Process 0: the folder's top-level files shown at the checkpoint resumed from, stale folders of the
    trainer's own removed, the built-in base saved beside the adapter, the log rewritten up to the start."""
    if not run.writer:
        return
    out = run.config.out
    if saved_state is not None:
        checkpoint.promote(out, saved_state)
    checkpoint.remove_stale(out, keep=saved_state["checkpoint"] if saved_state else None)
    if run.config.model is None and not os.path.isdir(os.path.join(out, BASE_DIR)):
        outdir.own(out, BASE_DIR)
        tmp = os.path.join(out, f"{checkpoint.TMP_PREFIX}{BASE_DIR}")
        save_pretrained_quietly(tiny_llama()[0], tmp)
        outdir.user_modes(tmp)
        os.rename(tmp, os.path.join(out, BASE_DIR))
    with open(os.path.join(out, LOG), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(h) + "\n" for h in run.history)
    run.log_file = open(os.path.join(out, LOG), "a", encoding="utf-8")


def _step(run: Run, order: SampleOrder, step: int) -> dict:
    """One optimizer step over the global batch of ``step`` (see the module docstring); returns its log row."""
    config, seqs, world, rank = run.config, run.inputs.seqs, run.world, run.rank
    t0 = time.perf_counter()
    rows = order(step * run.per_step, run.per_step)
    n_label = max(int((seqs.labels[rows][:, 1:] != IGNORE).sum()), 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    for g in range(config.grad_accum):
        mine = rows[(g * world + rank) * config.batch_size:(g * world + rank + 1) * config.batch_size]
        batch = {k: v.to(run.device) for k, v in seqs.rows(mine).items()}
        last = g == config.grad_accum - 1
        sync = contextlib.nullcontext() if not run.ddp or last else run.net.no_sync()
        if run.fsdp:
            run.net.set_requires_gradient_sync(last)  # accumulate whole gradients; reduce-scatter at the last
        with sync:
            loss, _ = _token_loss_sum(run.net, batch, run.autocast)
            # DDP and FSDP2 average gradients over processes; the factor world turns that into the global sum.
            (loss * (world / n_label)).backward()
        loss_sum += loss.detach().double()
    loss_value = float(_all_sum(loss_sum, world)) / n_label
    grad_norm = float(checkpoint.full(torch.nn.utils.clip_grad_norm_([p for _, p in run.params],
                                                                    config.max_grad_norm)))
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    run.seconds += time.perf_counter() - t0
    run.tokens += int(seqs.attention_mask[rows].sum())
    row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
    run.log(row)
    return row


def _evaluate(run: Run, done: int) -> float:
    ev = evaluate(run.model, run.inputs.eval_seqs, run.config, run.device, run.autocast, run.rank, run.world)
    run.log({"step": done, "eval_loss": ev})
    return ev


def _save(run: Run, step: int) -> None:
    """Checkpoint ``step``: every process gathers its part, process 0 writes."""
    tensors = checkpoint.optimizer_tensors(run.params, run.optimizer)  # whole tensors, gathered by all processes
    rng = _rng_tensors(run.device, run.world)
    run.saved_step = step
    if not run.writer:
        return
    config = run.config
    state = {"config": config.to_dict(), "samples_seen": step * run.per_step, "world_size": run.world,
             "data_sha256": run.inputs.fingerprint, "scheduler": run.scheduler.state_dict(),
             "optimizer": {"param_groups": checkpoint.optimizer_groups(run.optimizer)}, "log_history": run.history}
    base_name = os.path.abspath(os.path.join(config.out, BASE_DIR)) if config.model is None else config.model
    whole = {n: tensors[f"param/{n}"] for n, _ in run.params} if run.fsdp else {}
    with _whole_parameters(run.model, whole):
        checkpoint.save(config.out, step, state, lambda d: fl.save_adapter(
            run.model, d, task_type="CAUSAL_LM", base_model_name_or_path=base_name), tensors, rng)


def _check_stop(run: Run, stop: StopRequest, bar=None) -> None:
    """After a step: when a process got SIGINT/SIGTERM, every process (they agree through one all-reduce)
    checkpoints the step just taken, if that is not saved yet, and ends the run."""
    signum = stop.signal or 0
    if run.world > 1:
        flag = torch.tensor([signum], dtype=torch.int64, device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
    if not signum:
        return
    done = run.history[-1]["step"] if run.history else run.start
    if done > run.start and run.saved_step != done:
        _save(run, done)
    if bar is not None:
        bar.close()
    raise Interrupted(signum, done, run.saved_step, run.config.out, run.world)


def _finish(run: Run, saved_state: dict | None) -> dict:
    """The summary (process 0 writes it and the loss plot)."""
    device, history = run.device, run.history
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    summary = {
        "loss_first": train_losses[0] if train_losses else None,
        "loss_last": train_losses[-1] if train_losses else None,
        "eval_loss_first": eval_losses[0] if eval_losses else None,
        "eval_loss_last": eval_losses[-1] if eval_losses else None,
        "tokens_per_s": run.tokens / run.seconds if run.seconds else None,
        "peak_memory_bytes": peak_memory(device),
        "backend": backend(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": run.world,
        "parallel": "fsdp" if run.fsdp else "ddp" if run.ddp else None,
        "steps": run.config.steps,
        "resumed_from_step": run.start if saved_state is not None else None,
        "train_seconds": run.seconds,
    }
    if run.writer:
        checkpoint.write_json(os.path.join(run.config.out, SUMMARY), summary)
        write_plot(os.path.join(run.config.out, PLOT), history)
    if run.world > 1:
        dist.barrier()
    return summary
