"""`model.tiny_arch`: the architecture the embedded tiny model is built for (tiny_seed configs).

The recipes (through `RecipeBase.load_model`) and `monet-fast plan` read it; a value that is no
registered `monet_fast.model.arch` adapter is a config error naming the allowed values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from monet_fast.train.config import ConfigError, load_config
from monet_fast.train.plan import resolve_model, tiny_dims

STAGE1 = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage1.yaml"


def test_an_sft_step_on_the_tiny_qwen3_vl(tmp_path):
    from monet_fast.train.sft import train

    out = tmp_path / "run"
    overrides = [
        "model.tiny_arch=qwen3_vl",
        "model.latent_size=2",
        "data.n=2",
        "trainer.micro_batch_size=2",
        "trainer.grad_accum=1",
        "logging.progress=false",
    ]
    result = train(1, STAGE1, overrides, output=out, max_steps=1)
    assert result.global_step == 1 and result.losses[0] == result.losses[0]
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "qwen3_vl"


def test_the_default_and_a_bad_value():
    assert load_config(STAGE1).model.tiny_arch == "qwen2_5_vl"
    with pytest.raises(ConfigError, match=r"model.tiny_arch must be one of \['qwen2_5_vl', 'qwen3_vl'\], got 'llava'"):  # fmt: skip
        load_config(STAGE1, ["model.tiny_arch=llava"])


def test_plan_sizes_the_tiny_model_of_that_arch(tmp_path):
    raw = yaml.safe_load(STAGE1.read_text())
    raw["deepspeed"]["config"] = str((STAGE1.parent / raw["deepspeed"]["config"]).resolve())
    raw["model"]["tiny_arch"] = "qwen3_vl"
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(raw))
    dims, found = resolve_model(str(path))
    assert dims == tiny_dims(arch="qwen3_vl") and dims != tiny_dims()
    assert found["stage"] == "1" and found["dtype"] == "fp32"
