"""One config schema for SFT and VLPO: the shared sections are validated once, in one place, so
both loaders refuse the same values with the same message at load time (no model is built)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from monet_fast.train.config import TrainConfig, load_config
from monet_fast.train.config_schema import (
    ConfigError,
    DataSection,
    DeepSpeedSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    SchedulerSection,
    TrainerBasics,
)
from monet_fast.train.vlpo_config import RLConfig, load_rl_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


def _sft(overrides: list[str]):
    return load_config(TINY / "stage1.yaml", overrides)


def _rl(overrides: list[str]):
    return load_rl_config(TINY / "vlpo.yaml", overrides)


def _message(load, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load(overrides)
    text = str(info.value)
    # The file prefix differs (stage1.yaml / vlpo.yaml); the rule's message must not.
    return text.split(": ", 1)[1] if text.startswith(str(TINY)) else text


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        # The drift this schema fixes: RL used to accept it and fail later, building AdamW.
        ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
        ("optim.eps=0", "optim.eps must be > 0"),
        ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
        ("optim.name=lion", "optim.name must be one of ['adamw', 'sgd']"),
        ("scheduler.total_steps=0", "scheduler.total_steps must be > 0"),
        ("model.feedback_norm=bogus", "model.feedback_norm must be one of"),
        ("model.latent_size=0", "model.latent_size must be >= 1"),
        ("trainer.keep_last=0", "trainer.keep_last must be > 0"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage must be one of [0, 1, 2, 3]"),
        ("deepspeed.offload_param=true", "deepspeed.offload_param needs deepspeed.zero_stage 3"),
        ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ],
)
def test_sft_and_rl_refuse_a_bad_shared_value_with_the_same_message(override, expected):
    extra = ["deepspeed.zero_stage=2"] if override.startswith("deepspeed.offload") else []
    sft = _message(_sft, [override, *extra])
    rl = _message(_rl, [override, *extra])
    assert expected in sft, sft
    assert sft == rl


def test_an_unknown_top_level_key_suggests_the_right_one_in_both():
    assert "did you mean 'optim'" in _message(_sft, ["optimm.lr=1"])
    assert "did you mean 'optim'" in _message(_rl, ["optimm.lr=1"])


def test_both_configs_are_built_from_the_same_shared_sections():
    shared = {
        "model": ModelSection,
        "optim": OptimSection,
        "scheduler": SchedulerSection,
        "deepspeed": DeepSpeedSection,
        "logging": LoggingSection,
    }
    for cls in (TrainConfig, RLConfig):
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, section in shared.items():
            assert types[name] in (section, section.__name__), (cls.__name__, name)
    sft, rl = _sft([]), _rl([])
    assert isinstance(sft.trainer, TrainerBasics) and isinstance(rl.trainer, TrainerBasics)
    assert isinstance(sft.data, DataSection) and isinstance(rl.data, DataSection)


def test_yaml_keys_are_unchanged_and_a_dump_reloads_equal(tmp_path):
    # The keys written configs use; renaming one would break configs and run directories.
    sft_trainer = {"epochs", "micro_batch_size", "grad_accum", "max_steps", "log_every"}
    sft_trainer |= {"save_every", "keep_last", "shared_filesystem", "export", "shuffle"}
    rl_trainer = (sft_trainer - {"grad_accum"}) | {"mini_batch_prompts"}
    for load, trainer_keys, path in ((_sft, sft_trainer, "s.yaml"), (_rl, rl_trainer, "r.yaml")):
        cfg = load([])
        if cfg.deepspeed.config is not None:  # relative to its YAML: pin it before moving
            cfg = load([f"deepspeed.config={cfg.resolved_deepspeed_json()}"])
        assert set(cfg.to_dict()["trainer"]) == trainer_keys
        dumped = tmp_path / path
        dumped.write_text(cfg.dump())
        again = (load_config if load is _sft else load_rl_config)(dumped)
        assert again.to_dict() == cfg.to_dict()
    # The RL defaults that differ from SFT's survive the shared base.
    assert RLConfig().trainer.micro_batch_size == 2 and TrainConfig().trainer.micro_batch_size == 1
    assert RLConfig().optim.lr == 1e-6 and RLConfig().scheduler.name == "constant"


def test_sft_and_vlpo_recipes_are_siblings_over_one_base():
    from monet_fast.train.loop import SFTRecipe
    from monet_fast.train.recipe_base import RecipeBase
    from monet_fast.train.vlpo import VLPORecipe

    assert SFTRecipe not in VLPORecipe.__mro__ and VLPORecipe not in SFTRecipe.__mro__
    assert issubclass(SFTRecipe, RecipeBase) and issubclass(VLPORecipe, RecipeBase)
    # The shared machinery is defined once, on the base, not overridden by either recipe.
    for name in ("load_model", "prepare_policy", "init_engine", "resume_progress", "export"):
        assert name not in vars(SFTRecipe) and name not in vars(VLPORecipe), name


def test_train_and_rl_entries_take_a_file_with_flags_or_an_object_without():
    from monet_fast.train.rl_cli import build_rl_config
    from monet_fast.train.sft import build_config

    cfg = build_config(1, TINY / "stage1.yaml", ["optim.lr=0.5"], output="o", max_steps=3)
    assert (cfg.optim.lr, cfg.output, cfg.trainer.max_steps) == (0.5, "o", 3)
    rl = build_rl_config(TINY / "vlpo.yaml", None, output="r", init="m", max_steps=2)
    assert (rl.output, rl.model.init, rl.trainer.max_steps) == ("r", "m", 2)
    assert build_config(1, cfg) is cfg and build_rl_config(rl) is rl  # objects: validated as is
    with pytest.raises(ValueError, match="edit the TrainConfig object"):
        build_config(1, cfg, output="elsewhere")
    with pytest.raises(ValueError, match="edit the RLConfig object"):
        build_rl_config(rl, ["vlpo.kl_coef=0"])
    with pytest.raises(ConfigError, match="stage 2 requested, config has stage 1"):
        build_config(2, cfg)
