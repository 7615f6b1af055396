"""Training-engine set-up shared by the SFT and VLPO recipes: torch.distributed through
DeepSpeed, seeding, the DeepSpeed config, the optimizer and the LR schedule."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from monet_fast.train.config_schema import ConfigError, OptimSection, RunConfig, SchedulerSection

logger = logging.getLogger("monet_fast.train")


# --------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent).

    Launched by `deepspeed` or `torchrun`, the launcher's env vars are used. A plain single
    process gets RANK=0, WORLD_SIZE=1 and a free local port, so tests and the demo need no
    launcher. On CPU the backend is gloo and DeepSpeed's shared-memory allreduce op is not built
    (its first-use JIT build costs 50-80 s; set MONET_FAST_DS_SHM=1 to allow it).
    """
    from monet_fast._optional import require

    deepspeed = require("deepspeed", "training")

    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ["WORLD_SIZE"] = "1"
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("MONET_FAST_DS_SHM") != "1":
        # `import deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm
        # re-exports it), so patch the module object itself.
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# DeepSpeed config, optimizer, schedule
# --------------------------------------------------------------------------------------------


def _fill(ds: dict, key: str, value: Any, where: str) -> None:
    """Set ds[key] = value where the JSON says "auto" or nothing; refuse a conflicting value."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config {where} sets {key}={current!r} but the training config implies "
            f'{value!r}; use "auto" there (it is filled from the training config)'
        )


def _deep_merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def build_deepspeed_config(cfg: RunConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config dict: the JSON file (if any) with "auto" filled from `cfg`."""
    path = cfg.resolved_deepspeed_json()
    where = str(path) if path is not None else "(built in)"
    ds: dict = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"DeepSpeed config {where} defines {key!r}: remove it, monet_fast builds the "
                "optimizer and LR schedule from the optim / scheduler sections"
            )
    tr = cfg.trainer
    _fill(ds, "train_micro_batch_size_per_gpu", tr.micro_batch_size, where)
    _fill(ds, "gradient_accumulation_steps", tr.grad_accum, where)
    _fill(ds, "train_batch_size", tr.micro_batch_size * tr.grad_accum * world_size, where)
    _fill(ds, "gradient_clipping", cfg.optim.grad_clip, where)
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    elif bool(ds["bf16"]["enabled"]) != bf16:
        raise ConfigError(
            f"DeepSpeed config {where} sets bf16.enabled={ds['bf16']['enabled']} but "
            f"model.precision resolves to {'bf16' if bf16 else 'fp32'}"
        )
    ds.setdefault("fp16", {"enabled": False})
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    if zero.get("stage", "auto") == "auto":
        zero["stage"] = 2
    stage = zero["stage"]
    pin = torch.cuda.is_available()
    if cfg.deepspeed.offload_optimizer:
        if stage < 1:
            raise ConfigError("deepspeed.offload_optimizer needs ZeRO stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.deepspeed.offload_param:
        if stage != 3:
            raise ConfigError(f"deepspeed.offload_param needs ZeRO stage 3, got {stage}")
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if "offload_optimizer" in zero:
        # We pass a torch optimizer; DeepSpeed otherwise insists on its JIT-built CPU Adam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if cfg.optim.name == "sgd" and stage > 0:
        # DeepSpeed whitelists Adam-type optimizers under ZeRO; plain SGD partitions fine.
        ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    return _deep_merge(ds, dict(cfg.deepspeed.extra))


def build_optimizer(
    model: nn.Module, o: OptimSection, *, fused: bool = False
) -> torch.optim.Optimizer:
    """A torch optimizer over trainable params; no weight decay on biases and norm weights.

    A torch optimizer (not DeepSpeed's) so nothing is JIT-built; `fused` AdamW on GPU matches the
    reference's `adamw_torch_fused`.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kwargs)


def lr_lambda(s: SchedulerSection, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up from 0, then linear/cosine/constant.

    Same shape as transformers' get_{linear,cosine}_schedule_with_warmup (HF Trainer default).
    """
    warm = s.warmup_steps

    def fn(step: int) -> float:
        if step < warm:
            return step / max(1, warm)
        if s.name == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        progress = min(max(progress, 0.0), 1.0)
        if s.name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn
