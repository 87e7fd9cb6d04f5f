"""One process of tests/test_sharding.py's gloo run (torchrun): ``fl.fully_shard`` over a small model of
4-bit ``LoRALinear`` layers, against the same model unsharded in this process. Exits non-zero on a failed
check. Argument: the scheme (nf4 = NF4 with double quantization, block 64; int4 = group 64). With
FSDP_WORKER_DEVICE=cuda the processes run on their GPUs over NCCL (the device check's smoke run); with
FSDP_WORKER_DORA=1 the layers are DoRA (their magnitudes sharded like the adapters); FSDP_WORKER_RESHARD=n
passes reshard_after_forward=n (after its forward a unit keeps its tensors sharded over n processes, which
the backward gathers from)."""

import copy
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from worker_exit import leave_group

import fusedlora as fl
from fusedlora.formats.packed import check_packed
from fusedlora.sharding import quantized_layers

SPECS = {"nf4": {"scheme": "nf4", "blocksize": 64, "double_quant": True}, "int4": {"scheme": "int4", "group_size": 64}}


DORA = os.environ.get("FSDP_WORKER_DORA") == "1"


class Block(nn.Module):
    def __init__(self, spec):
        super().__init__()
        kw = dict(r=4, alpha=8, quantize=spec, init_lora_weights=False, use_dora=DORA)
        self.up = fl.LoRALinear.from_linear(nn.Linear(64, 128), **kw)
        self.down = fl.LoRALinear.from_linear(nn.Linear(128, 64), **kw)
        if DORA:  # magnitudes away from their initial norms: DoRA's scaling matters
            with torch.no_grad():
                for layer in (self.up, self.down):
                    layer.lora_magnitude_vector.weight.mul_(torch.rand(layer.out_features) + 0.5)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def storage_bytes(layer) -> tuple[int, int]:
    """(bytes of the 4-bit storage this process holds, bytes of the whole weight)."""
    local = whole = 0
    for name, p in layer.named_parameters(recurse=False):
        if name.startswith("quant_"):
            local += p.to_local().numel() * p.element_size()
            whole += p.numel() * p.element_size()
    return local, whole


def main() -> None:
    on_gpu = os.environ.get("FSDP_WORKER_DEVICE") == "cuda"
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    forced = os.environ.get("FUSEDLORA_BACKEND")
    assert forced is None or fl.backend(device) == forced
    torch.manual_seed(0)
    model = nn.Sequential(Block(SPECS[sys.argv[1]]), Block(SPECS[sys.argv[1]])).to(device)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = torch.randn(8, 64, device=device)

    seen = []

    def gathered(layer, args):  # runs after FSDP2's own pre-forward hook: the layer holds whole tensors
        w = layer.base_weight.packed
        check_packed(w)
        seen.append(not isinstance(layer.quant_data, DTensor) and w.data.numel() == math.ceil(w.numel / 2))

    reshard = os.environ.get("FSDP_WORKER_RESHARD")
    fl.fully_shard(model, units=[Block], **({"reshard_after_forward": int(reshard)} if reshard else {}))
    for layer in quantized_layers(model):
        layer.register_forward_pre_hook(gathered)
    assert sorted(model.state_dict()) == sorted(keys), "state-dict keys changed"

    # 1/N of each layer's 4-bit bytes, in whole blocks (codes and block scales over the same block range)
    for layer in quantized_layers(model):
        assert isinstance(layer.quant_data, DTensor)
        local, whole = storage_bytes(layer)
        total = torch.tensor([local], device=device)
        dist.all_reduce(total)
        assert int(total) == whole, (int(total), whole)
        rows = layer.quant_data.shape[0]
        assert layer.quant_data.to_local().shape[0] <= math.ceil(rows / world)
        if layer.quant_scheme == "nf4":
            assert layer.quant_data.shape[1] == layer.quant_block // 2
            assert layer.quant_data.to_local().shape[0] == layer.quant_absmax.to_local().shape[0]
        else:
            assert layer.quant_data.to_local().shape[0] == layer.quant_scales.to_local().shape[0]

    # this process's half of the rows; FSDP2 averages the gradients over processes, hence the factor world
    rows = x.chunk(world)[rank]
    y = model(rows)
    (y.square().sum() * world).backward()
    y_ref = ref(x)
    y_ref.square().sum().backward()
    assert seen and all(seen), seen
    torch.testing.assert_close(y, y_ref.chunk(world)[rank], rtol=1e-5, atol=1e-5)
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            g = grads[name].grad.full_tensor()
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    leave_group()


if __name__ == "__main__":
    main()
