"""Untrusted files and odd inputs: every corruption is refused with an error naming what is wrong, on every
path that reads it; nothing reads out of bounds, hangs, or returns NaN or wrong numbers in silence.

One table per kind of input, so that a new finding is one more row:
- CORRUPTIONS x PATHS: a 4-bit weight's metadata (codes, absmax, nested absmax and code, offset, block size,
  scales, zeros) shrunk, grown, retyped or made non-finite, read by every backend, the CUDA binding (its
  checks run on CPU tensors through the op's CPU registration), state-dict loading and bitsandbytes loading;
- NON_FINITE: weights holding inf or NaN given to quantize;
- NO_TOKENS: M = 0 on every backend and weight kind;
- FP16_OUTLIERS: fp16 activations whose LoRA term overflows fp16 before the product with B;
- ADAPTER_CONFIGS: adapter_config.json fields, refused before any layer is injected;
- CHECKPOINTS: a bitsandbytes checkpoint folder whose index or config points elsewhere.
"""

import dataclasses
import functools
import importlib
import json
import math
import re
import types

import pytest
import torch

import fusedlora as fl
from fusedlora.formats import Packed4bit, dequantize_reference
from fusedlora.formats import bnb as bnb_format
from fusedlora.modules import LoRALinear
from fusedlora.ops import decode as decode_module

# the modules (the package re-exports functions of the same names)
inject_module = importlib.import_module("fusedlora.inject")
backend_module = importlib.import_module("fusedlora.ops.backend")

N, K, R = 64, 512, 4  # NF4 blocksize 64: 512 blocks, so 2 nested_absmax entries


@functools.cache
def _weight(kind: str) -> Packed4bit:
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    if kind == "int4":
        return fl.quantize(w, "int4", group_size=128).packed
    return fl.quantize(w, "nf4", blocksize=64, double_quant=kind == "nf4-dq").packed


def _replace(**fields):
    def mutate(p: Packed4bit) -> Packed4bit:
        return dataclasses.replace(p, **{k: v(p) if callable(v) else v for k, v in fields.items()})

    return mutate


def _grow(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t[:1]])


# (id, weight kind, mutation, the field the error must name)
CORRUPTIONS = [
    ("valid-nf4-dq", "nf4-dq", _replace(), None),
    ("valid-nf4", "nf4", _replace(), None),
    ("valid-int4", "int4", _replace(), None),
    ("data-short", "nf4-dq", _replace(data=lambda p: p.data[:-1]), "data"),
    ("data-long", "nf4-dq", _replace(data=lambda p: _grow(p.data)), "data"),
    ("data-int8", "nf4-dq", _replace(data=lambda p: p.data.view(torch.int8)), "data"),
    ("absmax-short", "nf4-dq", _replace(absmax=lambda p: p.absmax[:-1]), "absmax"),
    ("absmax-long", "nf4-dq", _replace(absmax=lambda p: _grow(p.absmax)), "absmax"),
    ("absmax-fp32-with-double-quant", "nf4-dq", _replace(absmax=lambda p: p.absmax.float()), "absmax"),
    ("absmax-codes-without-double-quant", "nf4", _replace(absmax=lambda p: p.absmax.to(torch.uint8)), "absmax"),
    ("absmax-short-plain", "nf4", _replace(absmax=lambda p: p.absmax[:-1]), "absmax"),
    # the decode kernel reads nested_absmax[block / 256]: a truncated one was read past its end
    ("nested_absmax-short", "nf4-dq", _replace(nested_absmax=lambda p: p.nested_absmax[:1]), "nested_absmax"),
    ("nested_absmax-long", "nf4-dq", _replace(nested_absmax=lambda p: _grow(p.nested_absmax)), "nested_absmax"),
    ("nested_absmax-fp16", "nf4-dq", _replace(nested_absmax=lambda p: p.nested_absmax.half()), "nested_absmax"),
    ("nested_code-short", "nf4-dq", _replace(nested_code=lambda p: p.nested_code[:255]), "nested_code"),
    ("nested_code-fp64", "nf4-dq", _replace(nested_code=lambda p: p.nested_code.double()), "nested_code"),
    ("nested_code-missing", "nf4-dq", _replace(nested_code=None), "nested_code"),
    ("nested_offset-nan", "nf4-dq", _replace(nested_offset=math.nan), "nested_offset"),
    ("nested_offset-inf", "nf4-dq", _replace(nested_offset=-math.inf), "nested_offset"),
    # 64 -> 128: the sizes no longer fit (it used to give silently wrong output); 32: unsupported (an
    # IndexError on CPU, a device-side assert on a GPU)
    ("blocksize-128", "nf4-dq", _replace(block=128), "absmax"),
    ("blocksize-32", "nf4-dq", _replace(block=32), "block"),
    ("blocksize-32-plain", "nf4", _replace(block=32), "block"),
    ("int4-data-short", "int4", _replace(data=lambda p: p.data[:, :-1]), "data"),
    ("int4-scales-short", "int4", _replace(scales=lambda p: p.scales[:, :-1]), "scales"),
    ("int4-scales-fp16", "int4", _replace(scales=lambda p: p.scales.half()), "scales"),
    ("int4-zeros-short", "int4", _replace(zeros=lambda p: p.zeros[:-1]), "zeros"),
    ("int4-zeros-int32", "int4", _replace(zeros=lambda p: p.zeros.int()), "zeros"),
    ("int4-group-64", "int4", _replace(block=64), "scales"),
    ("int4-group-96", "int4", _replace(block=96), "block"),
    ("int4-with-absmax", "int4", _replace(absmax=lambda p: p.scales), "absmax"),
]


def _x(dtype=torch.float32, m=3):
    return torch.randn(m, K, dtype=dtype)


def _adapter(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(R, K, generator=g).to(dtype) / 16, torch.randn(N, R, generator=g).to(dtype)


def _lora(p, _):
    a, b = _adapter()
    return fl.lora_linear(_x(), fl.QuantizedWeight(p, torch.float32), a, b, 2.0)


def _state_dict_of(p: Packed4bit, prefix: str = "") -> dict:
    """What LoRALinear.state_dict() would hold for ``p`` (the corrupted fields and metadata as they are)."""
    sd = {f"{prefix}quant_{f}": getattr(p, f) for f in ("data", "absmax", "nested_absmax", "nested_code",
                                                        "scales", "zeros") if getattr(p, f) is not None}
    scheme = ("nf4", "int4").index(p.scheme)
    sd[f"{prefix}quant_meta"] = torch.tensor([N, K, p.block, scheme, 0], dtype=torch.int64)
    sd[f"{prefix}quant_offset"] = torch.tensor(p.nested_offset, dtype=torch.float32)
    return sd


def _load_state_dict(p, good):
    layer = LoRALinear(fl.QuantizedWeight(good, torch.float32), r=R)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    sd = {**layer.state_dict(), **_state_dict_of(p)}
    try:
        layer.load_state_dict(sd)
    except (ValueError, TypeError):
        # refused before anything was copied: the layer still holds the good weight
        after = layer.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        raise


def _from_bnb(p, _):
    state2 = None
    if p.nested_absmax is not None or p.nested_code is not None:
        state2 = types.SimpleNamespace(absmax=p.nested_absmax, code=p.nested_code, blocksize=256)
    qs = types.SimpleNamespace(quant_type="nf4", shape=torch.Size([N, K]), blocksize=p.block, absmax=p.absmax,
                               dtype=torch.float32, offset=torch.tensor(p.nested_offset), state2=state2)
    return fl.QuantizedWeight.from_bnb(p.data, qs)


def _decode_binding(p, _):
    a, b = _adapter(torch.bfloat16)
    return decode_module.decode_lora_linear(_x(torch.bfloat16), p, a, b, 2.0, None)


def _dequant_binding(p, _):
    return torch.ops.fusedlora.dequantize_nf4_cuda(p.data, p.absmax, p.nested_absmax, p.nested_code,
                                                   p.nested_offset, p.block, N, K, torch.float32)


_BNB_KEYS = {"data": "p.weight", "absmax": "p.weight.absmax", "nested_absmax": "p.weight.nested_absmax",
             "nested_code": "p.weight.nested_quant_map", "nested_offset": "nested_offset", "block": "blocksize"}
_LORA_NAMES = {f: f"weight.{f}" for f in ("data", "absmax", "nested_absmax", "nested_code", "nested_offset",
                                         "block", "scales", "zeros")}
_needs_ext = pytest.mark.skipif(not fl.extension_loaded(), reason="the CUDA extension fusedlora._C is not built")


def _decode_name(field, p):
    if field == "data":
        return "w"
    if field == "absmax" and p.scheme == "nf4":
        return "absmax_q" if p.nested_absmax is not None else "absmax"
    return field


# path: (run(corrupted, good), schemes it reads, name of a field in its errors, marks, forced backend)
PATHS = {
    "dequantize": (lambda p, _: fl.QuantizedWeight(p).dequantize(torch.float32), ("nf4", "int4"),
                   lambda f, p: f, (), None),
    "dequantize-triton": (lambda p, _: fl.QuantizedWeight(p).dequantize(torch.float32), ("nf4", "int4"),
                          lambda f, p: f, (), "triton"),
    "dequantize-reference-oracle": (lambda p, _: dequantize_reference(p, torch.float32), ("nf4", "int4"),
                                    lambda f, p: f, (), None),
    "lora_linear": (_lora, ("nf4", "int4"), lambda f, p: _LORA_NAMES[f], (), None),
    "lora_linear-triton": (_lora, ("nf4", "int4"), lambda f, p: _LORA_NAMES[f], (), "triton"),
    "LoRALinear": (lambda p, _: LoRALinear(fl.QuantizedWeight(p, torch.float32), r=R), ("nf4", "int4"),
                   lambda f, p: _LORA_NAMES[f], (), None),
    "load_state_dict": (_load_state_dict, ("nf4", "int4"),
                        lambda f, p: {"block": "quant_meta[2] (block)", "nested_offset": "quant_offset"}.get(
                            f, f"quant_{f}"), (), None),
    "bnb_state_dict": (lambda p, _: fl.QuantizedWeight.from_bnb_state_dict(
        bnb_format.to_state_dict(p, torch.float32, "p"), "p"), ("nf4",), lambda f, p: _BNB_KEYS[f], (), None),
    "from_bnb": (_from_bnb, ("nf4",), lambda f, p: _BNB_KEYS[f].replace("p.", "param.", 1), (), None),
    "decode-binding": (_decode_binding, ("nf4", "int4"), _decode_name, (_needs_ext,), None),
    "dequant-binding": (_dequant_binding, ("nf4",), lambda f, p: {"block": "blocksize"}.get(f, f), (_needs_ext,),
                        None),
}
# Rows a path cannot express: a state dict cannot drop a buffer of the layer or add one it lacks (a strict
# load reports the key missing or unexpected); bitsandbytes' loaders read any integer dtype of the codes as
# their bytes (its quant_storage option).
_NOT_EXPRESSIBLE = {("load_state_dict", "nested_code-missing"), ("load_state_dict", "int4-with-absmax"),
                    ("bnb_state_dict", "data-int8"), ("from_bnb", "data-int8")}


def _metadata_cases():
    for path, (_, schemes, _, marks, _) in PATHS.items():
        for row_id, kind, _, _ in CORRUPTIONS:
            if kind.split("-")[0] in schemes and (path, row_id) not in _NOT_EXPRESSIBLE:
                yield pytest.param(path, row_id, id=f"{path}:{row_id}", marks=marks)


@pytest.mark.parametrize("path, row_id", list(_metadata_cases()))
def test_corrupted_4bit_metadata_is_refused_naming_the_field(path, row_id, monkeypatch):
    run, _, name_of, _, family = PATHS[path]
    _, kind, mutate, field = next(row for row in CORRUPTIONS if row[0] == row_id)
    if family:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("FUSEDLORA_BACKEND", family)
    good = _weight(kind)
    bad = mutate(good)
    binding = path.endswith("-binding")
    if field is None:
        if binding:  # every check passed; the CPU registration then refuses to compute
            with pytest.raises(ValueError, match="expected a CUDA tensor, got one on cpu"):
                run(bad, good)
        else:
            run(bad, good)
        return
    with pytest.raises((ValueError, TypeError)) as info:
        run(bad, good)
    name = name_of(field, good)
    assert re.search(rf"(?<!\w){re.escape(name)}:", str(info.value)), (name, str(info.value))


# ---- quantize: weights holding inf or NaN ----------------------------------------------------------------

NON_FINITE = [
    ("nf4-dq-inf", dict(scheme="nf4", double_quant=True), math.inf),
    ("nf4-dq-nan", dict(scheme="nf4", double_quant=True), math.nan),
    ("nf4-nan", dict(scheme="nf4", double_quant=False), math.nan),
    ("int4-neg-inf", dict(scheme="int4", group_size=64), -math.inf),
]


@pytest.mark.parametrize("row_id, kwargs, value", NON_FINITE, ids=[r[0] for r in NON_FINITE])
@pytest.mark.parametrize("family", ["reference", "triton"])
def test_quantize_refuses_non_finite_weights(row_id, kwargs, value, family, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDLORA_BACKEND", family)
    w = torch.randn(8, 128)
    w[3, 17] = value
    with pytest.raises(ValueError, match=r"w: expected finite values, got 1 inf/NaN \(the first at \[3, 17\]"):
        fl.quantize(w, **kwargs)


# ---- M = 0 (an expert that gets no tokens) --------------------------------------------------------------

NO_TOKENS = [(family, kind, lead) for family in ("reference", "triton") for kind in ("dense", "nf4-dq", "int4")
             for lead in ((0,), (2, 0))]


@pytest.mark.parametrize("family, kind, lead", NO_TOKENS)
def test_no_tokens_give_an_empty_output_and_zero_gradients(family, kind, lead, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDLORA_BACKEND", family)
    dtype = torch.float32
    if kind == "dense":
        weight = torch.randn(N, K, requires_grad=True)
    else:
        weight = fl.QuantizedWeight(_weight(kind), dtype)
    a, b = (t.requires_grad_() for t in _adapter(dtype))
    bias = torch.randn(N, requires_grad=True)
    x = torch.randn(*lead, K, requires_grad=True)
    y = fl.lora_linear(x, weight, a, b, 2.0, bias, dropout_p=0.1, training=True)
    assert y.shape == (*lead, N) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (a, b, bias) + ((weight,) if kind == "dense" else ()):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


# ---- fp16 activations whose x·Aᵀ overflows fp16 ------------------------------------------------------------

# (id, weight kind, 4-bit path): an outlier makes x·Aᵀ ~ 1e5, above fp16's 65504, while y (B small) and dX
# stay well inside it; the fp32 reference is finite, so the kernels must be too (rounding s·xa or s·g to
# fp16 before the product with B gives inf)
FP16_OUTLIERS = [(f"{kind}-{path}", kind, path) for kind in ("nf4-dq", "int4") for path in ("inloop", "dequant")]


@pytest.mark.parametrize("row_id, kind, path", FP16_OUTLIERS, ids=[r[0] for r in FP16_OUTLIERS])
def test_fp16_activation_outlier_stays_finite(row_id, kind, path, monkeypatch):
    from fusedlora.ops.lora import lora_linear_reference
    from fusedlora.ops.paths import forced_path

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    gen = torch.Generator().manual_seed(5)
    m, scale = 8, 2.0
    x = torch.randn(m, K, generator=gen).half()
    x[3, 10] = 3000.0
    a = (torch.randn(R, K, generator=gen) / K**0.5).half()
    a[:, 10] = 20.0
    b = (torch.randn(N, R, generator=gen) * 1e-3).half()
    dy = torch.randn(m, N, generator=gen).half() * 1e3
    assert (x[3].double() @ a.double().t()).abs().max() * scale > 65504  # the premise

    def run(fn, dtype):
        xx = x.detach().to(dtype).clone().requires_grad_(True)
        y = fn(xx)
        y.backward(dy.to(dtype))
        return y.detach().double(), xx.grad.double()

    packed = _weight(kind)
    with forced_path(path):
        ours = run(lambda xx: fl.lora_linear(xx, fl.QuantizedWeight(packed, torch.float16), a, b, scale),
                   torch.float16)
    ref = run(lambda xx: lora_linear_reference(xx, packed, a.double(), b.double(), scale, None, 0.0, False, None),
              torch.float64)
    for name, o, r in zip(("y", "dx"), ours, ref, strict=True):
        assert torch.isfinite(r).all() and torch.isfinite(o).all(), name
        # fp16 output rounding (2^-11 relative) and tf32 LoRA operands: within 1e-2 of the largest value
        assert (o - r).abs().max() <= 1e-2 * r.abs().max(), name


def test_no_tokens_never_reach_the_decode_kernel():
    p = _weight("nf4-dq")
    a, b = _adapter(torch.bfloat16)
    x = torch.empty(0, K, dtype=torch.bfloat16)
    assert not decode_module.decode_applies(x, p, a, b, None, 0.0, False)
    assert decode_module.decode_applies(_x(torch.bfloat16, m=1), p, a, b, None, 0.0, False)


@_needs_ext
def test_decode_binding_accepts_no_tokens():
    # M = 0 passes every check of the binding (its CPU registration then refuses to compute)
    p = _weight("nf4-dq")
    a, b = _adapter(torch.bfloat16)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        decode_module.decode_lora_linear(torch.empty(0, K, dtype=torch.bfloat16), p, a, b, 2.0, None)


def test_layer_with_a_4bit_base_takes_no_tokens():
    layer = LoRALinear(fl.QuantizedWeight(_weight("nf4-dq"), torch.float32), r=R, init_lora_weights=False)
    y = layer(torch.empty(2, 0, K))
    assert y.shape == (2, 0, N)
    y.sum().backward()
    assert not layer.lora_A.grad.any() and not layer.lora_B.grad.any()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nf4-dq", "int4"])
def test_gpu_no_tokens(kind):
    qw = fl.QuantizedWeight(_weight(kind), torch.bfloat16).to("cuda")
    a, b = (t.cuda() for t in _adapter(torch.bfloat16))
    with torch.no_grad():
        y = fl.lora_linear(torch.empty(0, K, dtype=torch.bfloat16, device="cuda"), qw, a, b, 2.0)
    assert y.shape == (0, N)
    if fl.extension_loaded():
        y = decode_module.decode_lora_linear(torch.empty(0, K, dtype=torch.bfloat16, device="cuda"), qw.packed, a,
                                             b, 2.0, None)
        assert y.shape == (0, N) and y.device.type == "cuda"


# ---- adapter_config.json ------------------------------------------------------------------------------------

# A pattern that backtracks without end on module names (about 0.6 s per name of 31 characters, growing
# exponentially with the length): Python's re never returns on the longer names.
CATASTROPHIC = r"(\w|\w\w|\w\w\w|\.)*[^a-z._0-9]"

ADAPTER_CONFIGS = [
    # r must agree with the weights file before anything is allocated (r = 400000 allocated 5 GB first)
    ("r-huge", dict(r=400000), r"shape \(400000, 64\) \(r=400000 from adapter_config.json"),
    ("rank_pattern-disagrees-with-file", dict(rank_pattern={"v_proj": 8}), r"v_proj\.lora_A\.weight.*r=8"),
    ("r-string", dict(r="4"), "'r' must be a positive int, got '4'"),
    ("r-bool", dict(r=True), "'r' must be a positive int, got True"),
    ("r-zero", dict(r=0), "'r' must be a positive int, got 0"),
    ("alpha-nan", dict(lora_alpha=math.nan), "'lora_alpha' must be a finite number > 0, got nan"),
    ("alpha-inf", dict(lora_alpha=math.inf), "'lora_alpha' must be a finite number > 0, got inf"),
    ("alpha-negative", dict(lora_alpha=-8), "'lora_alpha' must be a finite number > 0, got -8"),
    ("alpha-string", dict(lora_alpha="8"), "'lora_alpha' must be a finite number > 0, got '8'"),
    ("alpha_pattern-nan", dict(alpha_pattern={"q_proj": math.nan}),
     r"alpha_pattern\['q_proj'\] must be a finite number > 0, got nan"),
    ("rank_pattern-zero", dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int, got 0"),
    ("rank_pattern-float", dict(rank_pattern={"q_proj": 2.5}),
     r"rank_pattern\['q_proj'\] must be a positive int, got 2.5"),
    ("rank_pattern-list", dict(rank_pattern=["q_proj"]), "'rank_pattern' must be an object"),
    ("use_rslora-string", dict(use_rslora="false"), "'use_rslora' must be true or false, got 'false'"),
    ("use_rslora-int", dict(use_rslora=0), "'use_rslora' must be true or false, got 0"),
    ("use_dora-zero", dict(use_dora=0), "'use_dora' must be true or false, got 0"),
    ("dropout-too-large", dict(lora_dropout=1.5), "'lora_dropout' must be a number in"),
    ("dropout-string", dict(lora_dropout="0.1"), "'lora_dropout' must be a number in"),
    ("target_modules-int", dict(target_modules=5), "'target_modules' must be a regular expression or a list"),
    ("target_modules-list-of-ints", dict(target_modules=[1, 2]), "'target_modules' must be"),
    ("target_modules-invalid-regex", dict(target_modules="q_proj("), "target_modules: 'q_proj\\(' is not a valid"),
    ("target_modules-backtracking", dict(target_modules=CATASTROPHIC), "target_modules: matching .* took more than"),
    ("exclude_modules-backtracking", dict(exclude_modules=CATASTROPHIC), "exclude_modules: matching .* took more"),
    ("rank_pattern-backtracking", dict(rank_pattern={CATASTROPHIC: 4}), "rank_pattern: matching .* took more"),
    ("exclude_modules-int", dict(exclude_modules=7), "'exclude_modules' must be null, a regular expression"),
]


@pytest.fixture
def saved_adapter(tmp_path):
    pytest.importorskip("transformers")
    from lora_models import tiny_llama

    model = fl.inject(tiny_llama(), ["q_proj", "v_proj"], r=R, alpha=8, init_lora_weights=False)
    fl.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("row_id, changes, match", ADAPTER_CONFIGS, ids=[r[0] for r in ADAPTER_CONFIGS])
def test_adapter_config_refused_before_anything_is_injected(row_id, changes, match, saved_adapter, monkeypatch):
    from lora_models import tiny_llama

    monkeypatch.setattr(inject_module, "PATTERN_TIME_LIMIT_S", 0.3)
    path = saved_adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        fl.load_adapter(model, saved_adapter)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_valid_adapter_config_still_loads(saved_adapter):
    from lora_models import tiny_llama

    model = fl.load_adapter(tiny_llama(), saved_adapter)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4


def test_patterns_keep_peft_semantics():
    # rank_pattern keys match a name's dotted suffix ((.*\.)?(key)$); target strings match the whole name
    from fusedlora.inject import PatternMatcher, layer_settings

    rp, ap = {"q_proj": 2, r"layers\.1\..*v_proj": 6}, {"proj": 3}
    assert layer_settings("model.layers.0.self_attn.q_proj", 4, 8, rp, ap) == (2, 8)
    assert layer_settings("model.layers.1.self_attn.v_proj", 4, 8, rp, ap) == (6, 8)
    assert layer_settings("model.layers.0.self_attn.v_proj", 4, 8, rp, ap) == (4, 8)
    assert layer_settings("proj", 4, 8, rp, ap) == (4, 3)
    m = PatternMatcher()
    assert m.fullmatch("t", r".*\.q_proj", "model.layers.0.self_attn.q_proj")
    assert not m.fullmatch("t", r"q_proj", "model.layers.0.self_attn.q_proj")


# ---- bitsandbytes checkpoint folders ------------------------------------------------------------------------

def _checkpoint(root, architectures=("LlamaForCausalLM",), weight_map=None, corrupt=None):
    """A one-layer Llama saved as transformers saves a bitsandbytes 4-bit model (q_proj in NF4 with double
    quantization, its other tensors dense), or with ``weight_map`` only its index. ``corrupt``: a mutation
    of q_proj's 4-bit weight before it is written."""
    pytest.importorskip("transformers")
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    config = cfg.to_dict()
    config.update(architectures=list(architectures), quantization_config={
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})
    (root / "config.json").write_text(json.dumps(config))
    if weight_map is not None:
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return root
    tensors = {k: v.contiguous() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    prefix = "model.layers.0.self_attn.q_proj"
    packed = fl.quantize(tensors.pop(f"{prefix}.weight"), "nf4").packed
    tensors.update(bnb_format.to_state_dict((corrupt or _replace())(packed), torch.float32, prefix))
    save_file(tensors, root / "model.safetensors")
    return root


def _outside(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(64)}, tmp_path / "outside.safetensors")
    return tmp_path / "outside.safetensors"


CHECKPOINTS = [
    ("index-parent", lambda t: dict(weight_map={"model.norm.weight": "../outside.safetensors"}),
     "outside the checkpoint folder"),
    ("index-absolute", lambda t: dict(weight_map={"model.norm.weight": str(_outside(t))}),
     "outside the checkpoint folder"),
    ("index-nested-parent", lambda t: dict(weight_map={"model.norm.weight": "sub/../../outside.safetensors"}),
     "outside the checkpoint folder"),
    ("index-not-a-name", lambda t: dict(weight_map={"model.norm.weight": 3}), "expected file names"),
    ("architectures-function", lambda t: dict(architectures=["pipeline"]), "names no transformers model class"),
    ("architectures-config-class", lambda t: dict(architectures=["AutoConfig"]), "names no transformers model"),
    ("architectures-private", lambda t: dict(architectures=["__class__"]), "names no transformers model class"),
    # the loader reads 4-bit weights through check_packed, naming the file's key
    ("nested_absmax-short", lambda t: dict(corrupt=_replace(nested_absmax=lambda p: p.nested_absmax[:0])),
     r"model\.layers\.0\.self_attn\.q_proj\.weight\.nested_absmax: expected shape \(1,\), got \(0,\)"),
    ("nested_offset-nan", lambda t: dict(corrupt=_replace(nested_offset=math.nan)),
     "bitsandbytes__nf4: nested_offset: expected a finite number, got nan"),
]


@pytest.mark.parametrize("row_id, make, match", CHECKPOINTS, ids=[r[0] for r in CHECKPOINTS])
def test_checkpoint_loader_refuses_what_points_elsewhere_or_is_corrupted(row_id, make, match, tmp_path):
    _outside(tmp_path)
    root = _checkpoint(tmp_path / "ckpt", **make(tmp_path))
    with pytest.raises(ValueError, match=match):
        fl.load_quantized(root)


def test_checkpoint_loader_reads_a_valid_folder(tmp_path):
    model = fl.load_quantized(_checkpoint(tmp_path / "ckpt"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)


# ---- which backend runs: the extension must hold a kernel for the GPU ----------------------------------------

@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(backend_module, "_NO_KERNEL", {})
    monkeypatch.setattr(backend_module, "_LOGGED", set())


def _pretend_gpu(monkeypatch, error: str):
    monkeypatch.setattr(backend_module, "extension_loaded", lambda: True)
    monkeypatch.setattr(backend_module, "kernel_image_error", lambda index: error)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))


def test_gpu_without_a_kernel_image_falls_back_to_triton_with_one_line(monkeypatch, caplog, fresh_probe):
    _pretend_gpu(monkeypatch, "no kernel image is available for execution on the device")
    with caplog.at_level("WARNING", logger="fusedlora"):
        assert fl.backend("cuda:0") == "triton"
        assert fl.backend("cuda:0") == "triton"
    lines = [r.getMessage() for r in caplog.records if r.name == "fusedlora"]
    assert len(lines) == 1 and "compute capability 12.0" in lines[0] and "cuda:0" in lines[0]
    monkeypatch.setenv("FUSEDLORA_BACKEND", "cuda")  # forcing it is an error, never a silent fallback
    with pytest.raises(RuntimeError, match="no kernel for compute capability 12.0"):
        fl.backend("cuda:0")


def test_gpu_with_a_kernel_image_runs_the_extension(monkeypatch, fresh_probe):
    _pretend_gpu(monkeypatch, "")
    assert fl.backend("cuda:0") == "cuda"


@pytest.mark.parametrize("error", ["", "no kernel image is available for execution on the device"])
def test_the_kernel_probe_is_a_constant_to_torch_compile(error, monkeypatch, fresh_probe):
    # The probe calls into the extension, which torch.compile cannot trace: its result must be a constant of
    # the trace (a model on a GPU compiles with fullgraph=True, and the probe runs once).
    calls = []

    def untraceable_probe(index):
        calls.append(index)
        with open(__file__, "rb"):  # file I/O: a graph break if it were traced
            pass
        return error

    _pretend_gpu(monkeypatch, error)
    monkeypatch.setattr(backend_module, "kernel_image_error", untraceable_probe)
    family = "triton" if error else "cuda"
    compiled = torch.compile(lambda x: x * (2.0 if fl.backend("cuda:0") == family else 3.0), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    assert calls == [0]


@_needs_ext
def test_kernel_image_probe_is_registered_and_checks_its_device():
    if torch.cuda.is_available():
        assert torch.ops.fusedlora.kernel_image_error(torch.cuda.current_device()) == ""
    else:
        with pytest.raises(ValueError, match=r"device: expected a CUDA device index in \[0, 0\), got 0"):
            torch.ops.fusedlora.kernel_image_error(0)


# ---- every launch on the tensors' device ---------------------------------------------------------------------

def _record_device_guard(module, monkeypatch) -> list:
    """The devices ``module``'s launches enter a guard for, in order (the guard itself still runs)."""
    entered = []
    real = module.device_guard

    def recording(device):
        entered.append(torch.device(device))
        return real(device)

    monkeypatch.setattr(module, "device_guard", recording)
    return entered


@pytest.mark.parametrize("kind", ["nf4-dq", "int4"])
def test_dequant_launches_run_under_a_guard_for_their_device(kind, monkeypatch):
    import fusedlora.ops.dequant as dequant_ops

    entered = _record_device_guard(dequant_ops, monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    p = _weight(kind)
    assert torch.equal(fl.QuantizedWeight(p).dequantize(torch.float32), dequantize_reference(p, torch.float32))
    fl.quantize(torch.randn(4, 128), "nf4")
    assert entered == [torch.device("cpu")] * 2


def test_lora_launches_run_under_a_guard_for_their_device(monkeypatch):
    # Triton launches on the current CUDA device: the ops make the tensors' device current first, forward
    # and backward (a layer on cuda:1 would otherwise run on cuda:0 with cuda:1 pointers)
    import fusedlora.ops.lora_triton as lora_ops

    entered = _record_device_guard(lora_ops, monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    weight = fl.QuantizedWeight(_weight("nf4-dq"), torch.float32)
    a, b = (t.requires_grad_() for t in _adapter(torch.float32))
    x = torch.randn(5, K, requires_grad=True)
    fl.lora_linear(x, weight, a, b, 1.0, None, dropout_p=0.1, training=True).sum().backward()
    assert entered == [torch.device("cpu")] * 2  # the forward op and the backward op


@pytest.mark.multigpu
@pytest.mark.parametrize("family", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["nf4-dq", "int4"])
def test_a_layer_on_the_second_gpu_runs_there(family, kind, monkeypatch):
    if family == "cuda" and not fl.extension_loaded():
        pytest.skip("the CUDA extension fusedlora._C is not built")
    monkeypatch.setenv("FUSEDLORA_BACKEND", family)
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    p = _weight(kind)
    qw = fl.QuantizedWeight(p, torch.bfloat16).to(dev)
    want = dequantize_reference(p, torch.bfloat16)
    assert torch.equal(qw.dequantize(torch.bfloat16).cpu(), want)
    a, b = (t.to(dev) for t in _adapter(torch.bfloat16))
    with torch.no_grad():
        for m in (2, 64):  # the decode kernel (cuda family) and the Triton GEMM
            xm = torch.randn(m, K, dtype=torch.bfloat16)
            y = fl.lora_linear(xm.to(dev), qw, a, b, 2.0)
            exact = xm.double() @ want.double().T + 2.0 * (xm.double() @ a.cpu().double().T) @ b.cpu().double().T
            assert y.device == dev and torch.isfinite(y).all()
            torch.testing.assert_close(y.cpu().double(), exact, rtol=2e-2, atol=2e-2)
    assert torch.cuda.current_device() == 0
