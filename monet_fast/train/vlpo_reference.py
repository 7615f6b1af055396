"""The frozen VLPO reference under ZeRO-3, and full policy parameters for decoding under ZeRO-3.

Both exist because ZeRO-3 partitions weights: the reference is a DeepSpeed inference engine of
its own, and the decoder (which reads weights directly: embedding table, captured graphs) needs
the policy's parameters gathered with DeepSpeed's module hooks lifted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def zero3_reference(ref: nn.Module, world: int, bf16: bool, offload_param: bool) -> Any:
    """A frozen ZeRO-3 DeepSpeed engine around `ref` (ref.mode zero3), in eval mode."""
    from monet_fast._optional import require

    deepspeed = require("deepspeed", "VLPO training")

    zero: dict[str, Any] = {"stage": 3}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=ref, config=ds, dist_init_required=False)
    engine.eval()
    return engine


@contextmanager
def gathered_parameters(engine: Any, model: nn.Module, zero_stage: int) -> Iterator[None]:
    """Full parameters for decoding (ZeRO-3): gathered, with DeepSpeed's module hooks lifted.

    The decoder reads weights directly (embedding table, captured graphs) and ZeRO-3's
    post-forward hooks would re-partition a gathered parameter mid-decode, so the hooks are
    removed for the rollout and registered again afterwards (what TRL does for generation).
    Costs a full copy of the weights per rank while decoding.
    """
    if zero_stage != 3:
        yield
        return
    from monet_fast._optional import require

    deepspeed = require("deepspeed", "VLPO training")

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for p in offload.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


__all__ = ["gathered_parameters", "zero3_reference"]
