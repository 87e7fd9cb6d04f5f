"""bitsandbytes' 4-bit state-dict format: key names and the quant_state JSON, without bitsandbytes.

For a module prefix p (``"model.layers.0.mlp.down_proj"``) a Linear4bit's weight is stored as

    p.weight                                  uint8 [ceil(N*K/2), 1]   the packed NF4 codes
    p.weight.absmax                           float32 [n_blocks], or uint8 [n_blocks] (double quant)
    p.weight.quant_map                        float32 [16]             the NF4 code book
    p.weight.nested_absmax                    float32 [ceil(n_blocks/256)]   (double quant only)
    p.weight.nested_quant_map                 float32 [256]                  (double quant only)
    p.weight.quant_state.bitsandbytes__nf4    uint8 [bytes]  UTF-8 JSON: quant_type, blocksize, dtype,
                                              shape, and with double quant nested_blocksize,
                                              nested_dtype, nested_offset
Every error names the key at fault.
"""

from __future__ import annotations

import json

import torch

from .nf4 import NF4_CODE
from .packed import BLOCKSIZES, NESTED_BLOCKSIZE, Packed4bit, check_packed, dtype_name

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_JSON_KEYS = ("nested_blocksize", "nested_dtype", "nested_offset")


def key_prefix(prefix: str) -> str:
    """``"p"`` and ``"p."`` both name module p; ``""`` is a top-level weight."""
    return prefix if prefix == "" or prefix.endswith(".") else prefix + "."


def state_keys(prefix: str, quant_type: str = "nf4") -> dict[str, str]:
    p = key_prefix(prefix) + "weight"
    return {
        "weight": p,
        "absmax": f"{p}.absmax",
        "quant_map": f"{p}.quant_map",
        "nested_absmax": f"{p}.nested_absmax",
        "nested_quant_map": f"{p}.nested_quant_map",
        "quant_state": f"{p}.quant_state.bitsandbytes__{quant_type}",
    }


def quant_state_json(packed: Packed4bit, dtype: torch.dtype) -> dict:
    state = {
        "quant_type": "nf4",
        "blocksize": packed.block,
        "dtype": dtype_name(dtype),
        "shape": list(packed.shape),
    }
    if packed.double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=packed.nested_offset)
    return state


def encode_json(state: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(state).encode("utf-8")), dtype=torch.uint8).clone()


def to_state_dict(packed: Packed4bit, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    """bitsandbytes' exact keys and tensors for an NF4 weight."""
    if packed.scheme != "nf4":
        raise ValueError(f"scheme: bitsandbytes state dicts hold NF4 weights, got scheme {packed.scheme!r}")
    keys = state_keys(prefix)
    sd = {
        keys["weight"]: packed.data,
        keys["absmax"]: packed.absmax,
        keys["quant_map"]: torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device),
    }
    if packed.double_quant:
        sd[keys["nested_absmax"]] = packed.nested_absmax
        sd[keys["nested_quant_map"]] = packed.nested_code
    sd[keys["quant_state"]] = encode_json(quant_state_json(packed, dtype))
    return sd


def _find_quant_state_key(sd, prefix: str) -> str:
    base = key_prefix(prefix) + "weight.quant_state.bitsandbytes__"
    found = [k for k in sd if k.startswith(base)]
    if not found:
        raise KeyError(f"{base}nf4: missing from the state dict (no quant_state for prefix {prefix!r})")
    if len(found) > 1:
        raise ValueError(f"{base}*: expected one quant_state key, got {sorted(found)}")
    return found[0]


def _decode_json(key: str, t) -> dict:
    if isinstance(t, torch.Tensor):
        if t.dtype != torch.uint8:
            raise TypeError(f"{key}: expected a uint8 tensor of UTF-8 JSON bytes, got dtype {t.dtype}")
        raw = bytes(t.detach().cpu().reshape(-1).tolist())
    elif isinstance(t, (bytes, bytearray)):
        raw = bytes(t)
    else:
        raise TypeError(f"{key}: expected a uint8 tensor of UTF-8 JSON bytes, got {type(t).__name__}")
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{key}: expected a JSON object, got {type(state).__name__}")
    return state


def parse_quant_state(key: str, state: dict) -> dict:
    """Validated fields of a quant_state JSON: quant_type, blocksize, dtype, shape, nested, nested_offset."""
    for name in _JSON_KEYS:
        if name not in state:
            raise ValueError(f"{key}: JSON lacks {name!r} (has {sorted(state)})")
    if state["quant_type"] != "nf4":
        raise ValueError(f"{key}: quant_type: expected 'nf4', got {state['quant_type']!r}")
    if key.rsplit("__", 1)[-1] != state["quant_type"]:
        raise ValueError(f"{key}: the key's suffix disagrees with quant_type {state['quant_type']!r}")
    bs = state["blocksize"]
    if not isinstance(bs, int) or bs not in BLOCKSIZES:
        raise ValueError(f"{key}: blocksize: expected one of {BLOCKSIZES}, got {bs!r}")
    if state["dtype"] not in DTYPE_NAMES:
        raise ValueError(f"{key}: dtype: expected one of {sorted(DTYPE_NAMES)}, got {state['dtype']!r}")
    shape = state["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 1 for s in shape)):
        raise ValueError(f"{key}: shape: expected [N, K] with positive integers, got {shape!r}")
    nested = [n for n in _NESTED_JSON_KEYS if n in state]
    if nested and len(nested) != len(_NESTED_JSON_KEYS):
        missing = [n for n in _NESTED_JSON_KEYS if n not in state]
        raise ValueError(f"{key}: double quantization fields incomplete: has {nested}, lacks {missing}")
    out = {"blocksize": bs, "dtype": DTYPE_NAMES[state["dtype"]], "shape": (shape[0], shape[1]),
           "nested": bool(nested), "nested_offset": 0.0}
    if nested:
        if state["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise ValueError(
                f"{key}: nested_blocksize: expected {NESTED_BLOCKSIZE}, got {state['nested_blocksize']!r}"
            )
        if state["nested_dtype"] != "float32":
            raise ValueError(f"{key}: nested_dtype: expected 'float32', got {state['nested_dtype']!r}")
        off = state["nested_offset"]
        if not isinstance(off, (int, float)) or isinstance(off, bool):
            raise ValueError(f"{key}: nested_offset: expected a number, got {off!r}")
        try:
            out["nested_offset"] = float(off)  # a NaN or inf is refused by check_packed, naming this key
        except OverflowError:
            raise ValueError(f"{key}: nested_offset: expected a finite number, got {off!r}") from None
    return out


def _tensor(sd, key: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"{key}: missing from the state dict")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
    return t


def from_state_dict(sd, prefix: str) -> tuple[Packed4bit, torch.dtype]:
    """(Packed4bit, original dtype) from bitsandbytes' keys under ``prefix``; every problem names its key.

    The tensors' dtypes and sizes are checked by ``check_packed`` (the one validation of a 4-bit weight),
    with the state dict's keys as the names it reports."""
    qkey = _find_quant_state_key(sd, prefix)
    meta = parse_quant_state(qkey, _decode_json(qkey, sd[qkey]))
    keys = state_keys(prefix)
    data = _tensor(sd, keys["weight"])
    if data.dtype != torch.uint8 and data.is_contiguous():
        data = data.view(torch.uint8).reshape(-1, 1)  # another quant_storage dtype holds the same bytes
    qmap = _tensor(sd, keys["quant_map"])
    if qmap.dtype != torch.float32 or not torch.equal(qmap.cpu(), torch.tensor(NF4_CODE, dtype=torch.float32)):
        raise ValueError(f"{keys['quant_map']}: expected the 16 NF4 values as float32, got {qmap.tolist()} "
                         f"({dtype_name(qmap.dtype)})")
    nested = {}
    if meta["nested"]:
        nested = dict(nested_absmax=_tensor(sd, keys["nested_absmax"]),
                      nested_code=_tensor(sd, keys["nested_quant_map"]), nested_offset=meta["nested_offset"])
    else:
        for extra in ("nested_absmax", "nested_quant_map"):
            if keys[extra] in sd:
                raise ValueError(f"{keys[extra]}: present, but {qkey} has no double quantization fields")
    packed = Packed4bit("nf4", data, meta["shape"], meta["blocksize"], absmax=_tensor(sd, keys["absmax"]),
                        **nested)
    names = {"data": keys["weight"], "absmax": keys["absmax"], "nested_absmax": keys["nested_absmax"],
             "nested_code": keys["nested_quant_map"], "shape": f"{qkey}: shape",
             "block": f"{qkey}: blocksize", "nested_offset": f"{qkey}: nested_offset"}
    return check_packed(packed, names), meta["dtype"]
