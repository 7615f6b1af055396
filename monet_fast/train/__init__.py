"""monet_fast.train: SFT stages 1-3 on DeepSpeed (recipes, teacher targets, checkpoints).

    from monet_fast.train import train
    result = train(stage=1, config="configs/tiny/stage1.yaml", output="runs/tiny/stage1")

Importing this package is cheap (configs only); the recipes import DeepSpeed when used.
"""

from __future__ import annotations

from typing import Any

from monet_fast.train.config import ConfigError, TrainConfig, load_config

_LAZY = {
    "train": "monet_fast.train.sft",
    "precompute_teacher": "monet_fast.train.sft",
    "Stage1Recipe": "monet_fast.train.sft",
    "Stage2Recipe": "monet_fast.train.sft",
    "Stage3Recipe": "monet_fast.train.sft",
    "RECIPES": "monet_fast.train.sft",
    "SFTRecipe": "monet_fast.train.loop",
    "TrainResult": "monet_fast.train.loop",
    "TrainingProgress": "monet_fast.train.checkpoint",
    "OnlineTeacher": "monet_fast.train.teacher",
    "TeacherCache": "monet_fast.train.teacher",
    "MissingTeacherEntry": "monet_fast.train.teacher",
    "precompute_teacher_cache": "monet_fast.train.teacher",
    "read_metrics": "monet_fast.train.metrics",
    "rl": "monet_fast.train.vlpo",
    "VLPORecipe": "monet_fast.train.vlpo",
    "RLConfig": "monet_fast.train.vlpo",
    "load_rl_config": "monet_fast.train.vlpo",
    "MonetReward": "monet_fast.train.rewards",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'monet_fast.train' has no attribute {name!r}")


__all__ = [
    "RECIPES",
    "ConfigError",
    "MissingTeacherEntry",
    "OnlineTeacher",
    "SFTRecipe",
    "Stage1Recipe",
    "Stage2Recipe",
    "Stage3Recipe",
    "TeacherCache",
    "TrainConfig",
    "TrainResult",
    "TrainingProgress",
    "load_config",
    "precompute_teacher",
    "precompute_teacher_cache",
    "read_metrics",
    "train",
    # VLPO
    "MonetReward",
    "RLConfig",
    "VLPORecipe",
    "load_rl_config",
    "rl",
]
