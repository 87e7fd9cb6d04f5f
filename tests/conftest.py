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
