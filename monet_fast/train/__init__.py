"""monet_fast.train: SFT stages 1-3 on DeepSpeed (recipes, teacher targets, checkpoints).

    from monet_fast.train import train
    result = train(stage=1, config="configs/tiny/stage1.yaml", output="runs/tiny/stage1")

Importing this package is cheap (configs only); the recipes import DeepSpeed when used.
"""

from __future__ import annotations

from monet_fast._lazy import lazy_exports
from monet_fast.train.config import ConfigError as ConfigError
from monet_fast.train.config import TrainConfig as TrainConfig
from monet_fast.train.config import load_config as load_config

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
    "rl": "monet_fast.train.rl_cli",
    "VLPORecipe": "monet_fast.train.vlpo",
    "RLConfig": "monet_fast.train.vlpo_config",
    "load_rl_config": "monet_fast.train.vlpo_config",
    "MonetReward": "monet_fast.train.rewards",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
__all__ = sorted([*_LAZY, "ConfigError", "TrainConfig", "load_config"])
