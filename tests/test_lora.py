"""LoRA through peft on the tiny model: the latent forward and the decoder through the peft
wrapper equal peft's own merged model; the merged export loads in stock transformers with equal
logits and the adapters alone reload; only adapters train (vision tower frozen); config keys and
refusals (QLoRA on CPU without bitsandbytes); a stage-2 SFT run and VLPO's reference (the base
with adapters disabled, no copy)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from decode_helpers import latent_inputs  # noqa: E402

from monet_fast.data import collate, make_samples  # noqa: E402
from monet_fast.decode import generate  # noqa: E402
from monet_fast.model import latent_forward  # noqa: E402
from monet_fast.model.lora import (  # noqa: E402
    adapters_disabled,
    add_lora,
    export_merged,
    lora_layers,
)
from monet_fast.model.quantize import quantization_config  # noqa: E402
from monet_fast.model.tiny import tiny_model  # noqa: E402
from monet_fast.model.unwrap import unwrap  # noqa: E402
from monet_fast.train.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
K = 3


def _randomise_adapters(peft_model, seed: int = 0, scale: float = 0.2) -> None:
    """peft initialises B = 0 (adapters start as the identity): give them a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def lora_tiny():
    """(peft model, peft's merged copy, untouched base copy, processor), fp32, eval."""
    model, processor = tiny_model(seed=0, latent_size=K, initializer_range=0.2)
    model = model.float().eval()
    base = copy.deepcopy(model)
    peft_model = add_lora(model, r=4, alpha=8.0, dropout=0.0)
    _randomise_adapters(peft_model)
    peft_model.eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    return peft_model, merged, base, processor


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return latent_forward(model, batch, return_logits=True).logits


def test_latent_forward_through_the_wrapper_equals_the_merged_model(lora_tiny):
    peft_model, merged, base, processor = lora_tiny
    batch = collate(make_samples(2, seed=9), processor, "stage2", K)
    got = _logits(peft_model, batch)
    torch.testing.assert_close(got, _logits(merged, batch), rtol=1e-4, atol=1e-4)
    # The adapters matter (the comparison above is not base vs base).
    assert (got - _logits(base, batch)).abs().max() > 1.0
    # Disabled adapters: exactly the model before LoRA.
    with adapters_disabled(peft_model) as plain:
        torch.testing.assert_close(_logits(plain, batch), _logits(base, batch), rtol=0, atol=0)
    assert unwrap(peft_model) is peft_model.get_base_model() and unwrap(base) is base


def test_generate_through_the_wrapper_equals_the_merged_model(lora_tiny):
    peft_model, merged, base, processor = lora_tiny
    inputs = latent_inputs(processor)[1:3]  # an image prompt, and one ending in START
    kw = {"max_new_tokens": 12, "return_latents": True, "use_cuda_graphs": False}
    got = generate(peft_model, processor, inputs, **kw)
    want = generate(merged, processor, inputs, **kw)
    plain = generate(base, processor, inputs, **kw)
    assert sum(len(x) for x in got.latents) > 0  # the prompt ending in START feeds latents back
    for a, b in zip(got.sequences, want.sequences):
        assert a.tolist() == b.tolist()
    for a, b in zip(got.latents, want.latents):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert any(a.tolist() != c.tolist() for a, c in zip(got.sequences, plain.sequences))


def test_export_merges_into_a_stock_checkpoint_and_saves_the_adapters(lora_tiny, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    peft_model, _, base, processor = lora_tiny
    export_merged(peft_model, processor, tmp_path / "hf", tmp_path / "adapter")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    batch = collate(make_samples(2, seed=9), processor, "stage2", K)
    want = _logits(peft_model, batch)
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(stock, batch), want, rtol=1e-4, atol=1e-4)
    # The adapters alone, on a fresh copy of the base, give the same model.
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded, batch), want, rtol=0, atol=0)
    # QLoRA's export path: adapters saved, applied to a fresh full-precision base, merged.
    from monet_fast.train.lora import merge_onto_base

    merge_onto_base(peft_model, copy.deepcopy(base), processor, tmp_path / "q", tmp_path / "qa")
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "q").eval()
    torch.testing.assert_close(_logits(stock, batch), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_only_adapters_train_and_the_vision_tower_is_frozen(freeze_vision):
    from monet_fast.train.config import OptimSection
    from monet_fast.train.loop import build_optimizer

    model, _ = tiny_model(seed=0, latent_size=K)
    peft_model = add_lora(
        model,
        r=2,
        alpha=4.0,
        dropout=0.1,
        freeze_vision=freeze_vision,
        target_modules=["q_proj", "up_proj"],
    )
    layers = lora_layers(peft_model)
    assert any(n.startswith("model.language_model.") for n in layers)
    assert any(".visual." in f".{n}" for n in layers) is not freeze_vision
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = build_optimizer(model, OptimSection())
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)


def _cfg(*overrides: str):
    return load_config(TINY / "stage2.yaml", ["model.latent_size=4", *overrides]).validate()


def test_config_keys_and_refusals(monkeypatch):
    cfg = _cfg("model.lora.r=8", "model.lora.target_modules=[q_proj, v_proj]")
    assert cfg.model.lora.r == 8 and cfg.model.lora.alpha == 32.0
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert _cfg("model.lora={}").model.lora.target_modules[-1] == "down_proj"
    assert _cfg().model.lora is None
    with pytest.raises(ConfigError, match=r"unknown config key 'model.lora.rank'"):
        _cfg("model.lora.rank=8")
    with pytest.raises(ConfigError, match=r"model.lora.r must be > 0, got 0"):
        _cfg("model.lora.r=0")
    with pytest.raises(ConfigError, match=r"model.lora.dropout must be in \[0, 1\), got 1.0"):
        _cfg("model.lora.dropout=1.0")
    with pytest.raises(ConfigError, match=r"model.quantize must be one of \['4bit', '8bit'\]"):
        _cfg("model.lora={}", "model.quantize=2bit")
    with pytest.raises(ConfigError, match="model.quantize 4bit needs model.lora"):
        _cfg("model.quantize=4bit")
    # QLoRA on CPU: refused by name, without importing (or needing) bitsandbytes.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model.quantize 8bit \(QLoRA\) needs a CUDA GPU"):
        _cfg("model.lora={}", "model.quantize=8bit", "model.init=/nonexistent")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        quantization_config("4bit", torch.float32)
    assert "bitsandbytes" not in sys.modules


def test_vlpo_config_refuses_a_reference_copy_with_lora():
    from monet_fast.train.vlpo_config import load_rl_config

    cfg = load_rl_config(TINY / "vlpo.yaml", ["model.lora.r=4"]).validate()
    assert cfg.model.lora.r == 4
    with pytest.raises(ConfigError, match="adapters disabled .* got ref.mode 'offload'"):
        load_rl_config(TINY / "vlpo.yaml", ["model.lora.r=4", "ref.mode=offload"]).validate()


FAST_SFT = [
    "data.n=4",
    "model.latent_size=4",
    "logging.progress=false",
    "trainer.micro_batch_size=2",
    "trainer.grad_accum=1",
    "scheduler.warmup_steps=0",
    "scheduler.name=constant",
    "optim.lr=1e-2",
    "model.lora.r=4",
]


def _full_state(recipe) -> dict[str, torch.Tensor]:
    """The model's weights (gathered under ZeRO-3, where each rank holds a partition)."""
    import contextlib

    import deepspeed

    params = list(recipe.model.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params)
        if recipe.zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        return {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}


@pytest.mark.slow  # ~10 s each: DeepSpeed set-up, online teacher, export
@pytest.mark.parametrize("stage,zero", [(1, 2), (2, 2), (2, 3), (3, 2)])
def test_sft_with_lora_trains_adapters_only_and_exports(tmp_path, stage, zero):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from monet_fast.train.sft import RECIPES, build_config

    more = [f"deepspeed.zero_stage={zero}"] + (["teacher.mode=online"] if stage > 1 else [])
    cfg = build_config(
        stage, TINY / f"stage{stage}.yaml", [*FAST_SFT, *more], output=tmp_path / "run", max_steps=1
    )
    recipe = RECIPES[stage](cfg)
    try:
        recipe.setup()
        before = _full_state(recipe)
        result = recipe.train()
        after = _full_state(recipe)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
        assert any(".lora_B." in k for k in changed)  # B moved off zero: adapters learned
        batch = collate(make_samples(2, seed=9), recipe.processor, f"stage{stage}", 4)
        recipe.model.eval()
        want = _logits(recipe.model, batch)
        stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(result.export).eval()
        torch.testing.assert_close(_logits(stock, batch), want, rtol=1e-4, atol=1e-4)
        assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    finally:
        recipe.cleanup()


VLPO_FAST = [
    "logging.progress=false",
    "model.latent_size=4",
    "data.n=4",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=24",
    "trainer.mini_batch_prompts=2",
    "trainer.max_steps=1",
    "trainer.export=false",
    "filter.enabled=false",
    "model.lora.r=4",
]


def _vlpo_recipe(tmp_path):
    from monet_fast.train.rl_cli import build_rl_config
    from monet_fast.train.vlpo import VLPORecipe

    cfg = build_rl_config(TINY / "vlpo.yaml", VLPO_FAST, output=tmp_path / "rl", init=None)
    recipe = VLPORecipe(cfg)
    recipe.setup()
    return recipe


@pytest.mark.slow  # ~9 s on 2 busy cores: a VLPO recipe set-up with LoRA (DeepSpeed engine)
def test_vlpo_reference_is_the_base_with_adapters_disabled(tmp_path):
    from monet_fast.train.rollout import build_replay_batch, generate_rollouts
    from monet_fast.train.vlpo_module import score_steps

    recipe = _vlpo_recipe(tmp_path)
    try:
        assert recipe.ref_model is recipe.model  # no second copy of the weights
        _randomise_adapters(recipe.peft_model, seed=1, scale=0.05)
        base, _ = tiny_model(recipe.cfg.model.tiny_seed, latent_size=4)
        base = base.float().eval()
        ros = generate_rollouts(
            recipe.model,
            recipe.processor,
            make_samples(1, 5),
            group_size=2,
            max_new_tokens=24,
            latent_size=4,
            temperature=0.5,
            top_p=0.99,
            seed=3,
            ban=recipe.ban,
        )
        rb = build_replay_batch(ros, recipe.processor, 4)
        kw = {"temperature": 0.5, "sigma": 10.0, "ban": recipe.ban}
        with recipe._reference_on_device() as ref:
            got = score_steps(ref, rb, **kw)
        want = score_steps(base, rb, **kw)
        torch.testing.assert_close(got.token, want.token, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.latent, want.latent, rtol=0, atol=1e-6)
        policy = score_steps(recipe.model, rb, **kw)  # adapters back on afterwards
        assert (policy.token - want.token).abs().max() > 1e-3
        assert recipe.model.training  # the reference pass restored the train mode
    finally:
        recipe.cleanup()


@pytest.mark.slow  # ~20 s on 2 busy cores: rollouts, scoring and one DeepSpeed update
def test_vlpo_step_with_lora_updates_adapters_only(tmp_path):
    recipe = _vlpo_recipe(tmp_path)
    try:
        before = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
        recipe.train()
        after = recipe.model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    finally:
        recipe.cleanup()
