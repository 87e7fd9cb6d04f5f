"""bitsandbytes' state-dict format: round trips, real Linear4bit / Params4bit objects, errors naming keys."""

import json

import pytest
import torch

import fusedlora as fl
from fusedlora.formats.bnb import encode_json

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def _no_dynamo():
    with torch._dynamo.config.patch(disable=True):
        yield


def linear4bit(n, k, dtype, double_quant, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    layer = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant,
                                     blocksize=blocksize)
    return layer.to("cpu"), w  # .to() quantizes; no forward yet (an eval forward on CPU rewrites the state)


def bnb_dequant(param):
    return bnbf.dequantize_4bit(param.data, param.quant_state)


@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("dtype,blocksize", ((torch.bfloat16, 64), (torch.float16, 128), (torch.float32, 256)))
def test_real_linear4bit_state_dict_and_params(dtype, blocksize, double_quant):
    layer, w = linear4bit(13, 70, dtype, double_quant, blocksize)
    sd = layer.state_dict(prefix="model.proj.")
    want = bnb_dequant(layer.weight)
    for qw in (fl.QuantizedWeight.from_bnb(layer.weight),
               fl.QuantizedWeight.from_bnb(layer.weight.data, layer.weight.quant_state),
               fl.QuantizedWeight.from_bnb_state_dict(sd, "model.proj")):
        assert qw.dtype == dtype and tuple(qw.shape) == (13, 70) and qw.packed.double_quant == double_quant
        assert torch.equal(qw.dequantize(), want)
    # our own quantization writes exactly the layer's state dict: same keys, tensors and JSON bytes
    ours = fl.quantize(w, blocksize=blocksize, double_quant=double_quant).to_bnb_state_dict("model.proj")
    assert sorted(ours) == sorted(k for k in sd if k != "model.proj.bias")
    for key, t in ours.items():
        assert t.dtype == sd[key].dtype and torch.equal(t, sd[key]), key


@pytest.mark.parametrize("double_quant", (False, True))
def test_round_trip_through_our_state_dict(double_quant):
    qw = fl.quantize(torch.randn(9, 33), blocksize=128, double_quant=double_quant)
    for prefix in ("", "a.b", "a.b."):
        sd = qw.to_bnb_state_dict(prefix)
        assert ("weight" if prefix == "" else "a.b.weight") in sd
        back = fl.QuantizedWeight.from_bnb_state_dict(sd, prefix)
        assert back.dtype == torch.float32 and torch.equal(back.dequantize(), qw.dequantize())


def test_int4_has_no_bitsandbytes_form():
    with pytest.raises(ValueError, match="scheme: bitsandbytes state dicts hold NF4"):
        fl.quantize(torch.randn(4, 128), scheme="int4", group_size=64).to_bnb_state_dict("p")


def _sd(double_quant=True):
    return fl.quantize(torch.randn(8, 96), double_quant=double_quant).to_bnb_state_dict("p")


def _with_json(sd, **changes):
    key = "p.weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(sd[key].tolist()))
    state.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del state[k]
    return {**sd, key: encode_json(state)}


@pytest.mark.parametrize("case,exc,match", [
    ("drop:p.weight", KeyError, "p.weight: missing"),
    ("drop:p.weight.absmax", KeyError, "p.weight.absmax: missing"),
    ("drop:p.weight.nested_absmax", KeyError, "p.weight.nested_absmax: missing"),
    ("drop:p.weight.nested_quant_map", KeyError, "p.weight.nested_quant_map: missing"),
    ("drop:p.weight.quant_map", KeyError, "p.weight.quant_map: missing"),
    ("drop:p.weight.quant_state.bitsandbytes__nf4", KeyError, "p.weight.quant_state.bitsandbytes__nf4: missing"),
    ("shape:p.weight.absmax", ValueError, r"p.weight.absmax: expected shape \(12,\), got \(11,\)"),
    ("shape:p.weight", ValueError, r"p.weight: expected 384 bytes, got shape \(383, 1\)"),
    ("dtype:p.weight.nested_absmax", TypeError, "p.weight.nested_absmax: expected dtype float32"),
    ("json:quant_type=fp4", ValueError, "bitsandbytes__nf4: quant_type: expected 'nf4', got 'fp4'"),
    ("json:blocksize=128", ValueError, r"p.weight.absmax: expected shape \(6,\)"),
    ("json:blocksize=100", ValueError, "bitsandbytes__nf4: blocksize: expected one of"),
    ("json:shape=[8]", ValueError, "bitsandbytes__nf4: shape: expected"),
    ("json:nested_offset=None", ValueError, "bitsandbytes__nf4: double quantization fields incomplete"),
    ("json:dtype=int8", ValueError, "bitsandbytes__nf4: dtype: expected one of"),
    ("json:garbage", ValueError, "bitsandbytes__nf4: not valid UTF-8 JSON"),
])
def test_errors_name_the_key(case, exc, match):
    sd = _sd()
    kind, _, what = case.partition(":")
    if kind == "drop":
        del sd[what]
    elif kind == "shape":
        sd[what] = sd[what][:-1]
    elif kind == "dtype":
        sd[what] = sd[what].double()
    elif what == "garbage":
        sd["p.weight.quant_state.bitsandbytes__nf4"] = torch.tensor([123, 255, 1], dtype=torch.uint8)
    else:
        name, _, value = what.partition("=")
        sd = _with_json(sd, **{name: json.loads(value) if value not in ("None", "fp4", "int8") else
                               {"None": None, "fp4": "fp4", "int8": "int8"}[value]})
    with pytest.raises(exc, match=match):
        fl.QuantizedWeight.from_bnb_state_dict(sd, "p")


def test_unknown_quant_type_key_and_nested_without_json():
    sd = _sd()
    sd["p.weight.quant_state.bitsandbytes__fp4"] = sd.pop("p.weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="bitsandbytes__fp4: the key's suffix disagrees"):
        fl.QuantizedWeight.from_bnb_state_dict(sd, "p")
    sd = _sd(double_quant=False)
    sd["p.weight.nested_absmax"] = torch.ones(1)
    with pytest.raises(ValueError, match="p.weight.nested_absmax: present, but"):
        fl.QuantizedWeight.from_bnb_state_dict(sd, "p")


def test_from_bnb_rejects_fp4_and_unquantized():
    layer, _ = linear4bit(4, 64, torch.float32, False)
    layer.weight.quant_state.quant_type = "fp4"
    with pytest.raises(ValueError, match="quant_state.quant_type: expected 'nf4', got 'fp4'"):
        fl.QuantizedWeight.from_bnb(layer.weight)
    with pytest.raises(ValueError, match="param_or_data: expected a Params4bit with a quant_state"):
        fl.QuantizedWeight.from_bnb(torch.nn.Parameter(torch.zeros(4, 4)))


def test_to_device_keeps_everything():
    qw = fl.quantize(torch.randn(6, 64))
    moved = qw.to("cpu")
    assert moved is not qw and moved.packed.nested_offset == qw.packed.nested_offset
    assert torch.equal(moved.dequantize(), qw.dequantize())


def test_other_quant_storage_dtype_reads_the_same_bytes():
    # FSDP-style QLoRA stores the packed bytes in a float tensor (quant_storage); the bytes are what count
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    data, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True,
                                     quant_storage=torch.bfloat16)
    assert data.dtype == torch.bfloat16
    qw = fl.QuantizedWeight.from_bnb(data, state)
    assert qw.packed.data.dtype == torch.uint8
    assert torch.equal(qw.dequantize(), fl.quantize(w, blocksize=64).dequantize())


def test_from_bnb_after_a_cpu_eval_forward_is_refused():
    # bitsandbytes repacks the bytes and turns absmax into bf16 in place at the first CPU eval forward:
    # reading the layer afterwards would decode garbage, so it must be an error, not a silent result
    layer, _ = linear4bit(64, 128, torch.bfloat16, True)
    assert torch.equal(fl.QuantizedWeight.from_bnb(layer.weight).dequantize(), bnb_dequant(layer.weight))
    with torch.no_grad():
        layer.eval()(torch.randn(2, 128, dtype=torch.bfloat16))
    if layer.weight.quant_state.absmax.dtype == torch.uint8:
        pytest.skip("this bitsandbytes build keeps the stored state on a CPU forward")
    with pytest.raises(ValueError, match="first eval-mode forward on CPU"):
        fl.QuantizedWeight.from_bnb(layer.weight)
