import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly without CUDA; FUSEDLORA_REQUIRE_GPU=1 (the device check) turns a skip into
    a failure, so a GPU run cannot pass by skipping. `multigpu` tests (not part of `-m gpu`) skip without two
    GPUs."""
    if torch.cuda.device_count() < 2:
        for item in items:
            if "multigpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))
    if torch.cuda.is_available():
        return
    if os.environ.get("FUSEDLORA_REQUIRE_GPU") == "1":
        raise pytest.UsageError("FUSEDLORA_REQUIRE_GPU=1 but torch sees no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Each test starts from the default backend choice; a test forces one with monkeypatch.setenv."""
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)


@pytest.fixture
def use_backend(monkeypatch):
    """Force a backend family for the test; the Triton kernels need a GPU or, on CPU, TRITON_INTERPRET=1
    (the test is skipped otherwise)."""
    from fusedlora.ops.backend import triton_interpreted

    def force(family: str) -> None:
        if family == "triton" and not torch.cuda.is_available() and not triton_interpreted():
            pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
        monkeypatch.setenv("FUSEDLORA_BACKEND", family)

    return force


@pytest.fixture
def triton_backend(use_backend):
    """The Triton kernels forced for the test."""
    use_backend("triton")
