"""`monet-fast bench train-step`: both providers run a real DeepSpeed training step on the tiny
model and are registered (the timing itself is the benchmark's business)."""

from __future__ import annotations

import pytest
import torch

from monet_fast.bench import REGISTRY
from monet_fast.bench.train_step import PROVIDERS, Case, saved_activation_mib, setup_case


def test_registered():
    assert REGISTRY["train-step"] == "monet_fast.bench.train_step:run"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_updates_weights(provider):
    step = setup_case(Case("tiny", 2), provider)
    module = step.engine.module
    before = module.model.lm_head.weight.detach().clone()
    saved = saved_activation_mib(step)
    assert saved > 0
    assert not torch.equal(before, module.model.lm_head.weight)
