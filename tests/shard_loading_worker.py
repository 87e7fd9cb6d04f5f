"""One process of tests/test_shard_loading.py's gloo run (torchrun). Arguments: a dense safetensors checkpoint,
then optionally ``--memory-only`` (step 1 alone: for checkpoints too large to build a second time).

1. ``load_sharded`` (NF4 with double quantization, LoRA on all linears), with the growth of this process's
   peak resident set while it loads (VmHWM, reset through /proc/self/clear_refs) checked against the whole
   checkpoint's bytes;
2. the same model built the ordinary way (from_pretrained, inject with quantize, fully_shard) under the same
   seed: every local shard equal, and the same logits.
Exits non-zero on a failed check."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from worker_exit import leave_group

import fusedlora as fl
from fusedlora.shard_loading import load_sharded

SPEC = {"scheme": "nf4", "blocksize": 64, "double_quant": True}
ADAPTER = {"target_modules": "all-linear", "r": 4, "alpha": 8}


def vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main(path: str, memory_only: bool = False) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    whole = os.path.getsize(os.path.join(path, "model.safetensors"))
    # Imports and first-use caches before the measurement: they are not loading.
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    fl.quantize(torch.randn(64, 64), **SPEC).dequantize(torch.float32)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = vm("VmRSS")
    torch.manual_seed(0)
    model = load_sharded(path, quantize=SPEC, **ADAPTER)
    growth = vm("VmHWM") - before
    print(f"rank {rank}: loading grew the peak resident set by {growth / 2**20:.1f} MiB; "
          f"the checkpoint is {whole / 2**20:.1f} MiB", flush=True)
    assert growth < whole / 2, (growth, whole)
    if memory_only:
        leave_group()

    ref = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    torch.manual_seed(0)
    fl.inject(ref, quantize=SPEC, **ADAPTER)
    fl.fully_shard(ref)
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for name, p in want.items():
        q = got[name]
        assert isinstance(q, DTensor) and q.requires_grad == p.requires_grad, name
        assert torch.equal(q.to_local(), p.to_local()), name
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    leave_group()


if __name__ == "__main__":
    main(sys.argv[1], memory_only="--memory-only" in sys.argv[2:])
