import importlib

import pytest
import torch

import fusedlora as fl
from fusedlora.ops import registry


def test_cpu_defaults_to_reference():
    assert fl.backend("cpu") == "reference"


def test_forcing_reference_is_allowed_everywhere(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "reference")
    assert fl.backend("cpu") == "reference"


def test_forcing_cuda_on_cpu_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FUSEDLORA_BACKEND=cuda cannot run on cpu"):
        fl.backend("cpu")


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fl.backend("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fl.backend("cpu") == "triton"


def test_forcing_triton_without_triton_installed_is_an_error(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(importlib.import_module("fusedlora.ops.backend"), "_TRITON_FOUND", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fl.backend("cpu")


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "tpu")
    with pytest.raises(ValueError, match="expected one of .*'tpu'"):
        fl.backend("cpu")


def test_float64_always_selects_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    family, fn = registry.select("lora_linear", torch.device("cpu"), torch.float64)
    assert family == "reference" and fn is registry._IMPLS["lora_linear"]["reference"]


def test_registry_rejects_double_registration():
    with pytest.raises(RuntimeError, match="already has"):
        registry.register("lora_linear", "reference")(lambda *a: None)


def test_unknown_op():
    with pytest.raises(KeyError, match="unknown op"):
        registry.select("no_such_op", torch.device("cpu"))


def test_forced_sets_and_restores(monkeypatch):
    from fusedlora.ops.backend import forced

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FUSEDLORA_BACKEND", "reference")
    with forced("triton"):
        assert fl.backend("cpu") == "triton"
        with forced(None):
            assert fl.backend("cpu") == "reference"  # unset: the CPU default
    assert fl.backend("cpu") == "reference"
    with pytest.raises(RuntimeError), forced("cuda"):
        fl.backend("cpu")
    assert fl.backend("cpu") == "reference"
