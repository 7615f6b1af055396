"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined,
so it is set here, at import time, before tests import kernels."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(42)
    yield


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# One tiny model per architecture (`monet_fast.model.arch`): tests that must hold for every
# base model take `tiny_arch` (arch name, model, processor), built once per session per arch.
# Tests must not change its weights (gradients are fine: zero them).
from archs import ARCHS  # noqa: E402


@pytest.fixture(scope="session", params=ARCHS)
def tiny_arch(request):
    from monet_fast.model.tiny import tiny_model

    model, processor = tiny_model(seed=0, arch=request.param)
    return request.param, model.float(), processor
