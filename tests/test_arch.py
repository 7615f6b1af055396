"""The architecture seam (`monet_fast.model.arch`) and Qwen3-VL as the second architecture:
registry errors, the tiny Qwen3-VL model, mRoPE positions equal to the stock `get_rope_index`,
loading a stock-layout Qwen3-VL directory, and SFT + VLPO on it. The parity tests that run for
every architecture take the `tiny_arch` fixture (test_latent_forward.py, test_decode.py)."""

from __future__ import annotations

import json

import pytest
import torch
from archs import ARCHS

from monet_fast.data import collate, make_samples
from monet_fast.model import latent_forward
from monet_fast.model.arch import arch_of, get_arch, supported
from monet_fast.model.loading import load_pretrained, save_pretrained
from monet_fast.model.tiny import tiny_model, tiny_tokenizer
from monet_fast.model.tokens import MONET_TOKENS


def test_registry_names_every_architecture_and_rejects_others():
    assert supported() == sorted(ARCHS)
    with pytest.raises(ValueError, match=r"'llava'.*\['qwen2_5_vl', 'qwen3_vl'\]"):
        get_arch("llava")
    with pytest.raises(ValueError, match="unsupported architecture"):
        tiny_model(arch="llava")


def test_tiny_model_is_the_stock_class_with_monet_tokens(tiny_arch):
    arch, model, processor = tiny_arch
    stock = {
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration",
    }
    assert type(model).__name__ == stock[arch]
    assert arch_of(model).model_type == arch == processor.model_type
    vocab = processor.tokenizer.get_vocab()
    assert all(tok in vocab for tok in MONET_TOKENS)
    assert model.config.latent_token_id == vocab["<abs_vis_token_pad>"]
    assert model.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer)
    if arch == "qwen3_vl":
        assert len(model.config.vision_config.deepstack_visual_indexes) == 2
        assert processor.image_processor.patch_size == 16
        # Qwen3-VL's template adds no default system message.
        text = processor.apply_chat_template([{"role": "user", "content": "hi"}])
        assert text == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_rope_index_equals_stock_get_rope_index(tiny_arch, padding_side):
    _, model, processor = tiny_arch
    batch = collate(make_samples(3, seed=1), processor, "stage2", 4, padding_side=padding_side)
    want, _ = model.model.get_rope_index(
        batch.input_ids,
        batch.mm_token_type_ids,
        image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.attention_mask,
    )
    valid = batch.attention_mask.bool().expand(3, -1, -1)
    assert torch.equal(batch.position_ids[valid], want[valid])


def _stock_qwen3_dir(tmp_path, model, processor):
    """A directory laid out like Qwen3-VL-8B-Instruct: HF save, tokenizer without Monet's
    tokens, chat_template.json, preprocessor_config.json with Qwen3-VL's image settings."""
    d = tmp_path / "qwen3"
    model.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    for key in ("latent_size", "latent_layout", "latent_token_id", "latent_start_id",
                "latent_end_id", "feedback_norm"):  # fmt: skip
        config.pop(key, None)
    (d / "config.json").write_text(json.dumps(config))
    base = tiny_tokenizer(monet_tokens=False)
    base.chat_template = None
    base.save_pretrained(d)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    (d / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64},
                "patch_size": 16,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "image_processor_type": "Qwen2VLImageProcessorFast",
                "processor_class": "Qwen3VLProcessor",
            }
        )
    )
    return d, len(base)


def test_load_pretrained_accepts_a_qwen3_vl_directory(tmp_path):
    model, processor = tiny_model(seed=1, arch="qwen3_vl")
    d, n_base = _stock_qwen3_dir(tmp_path, model, processor)
    loaded, proc = load_pretrained(d, dtype=torch.float32)
    assert type(loaded) is type(model) and proc.model_type == "qwen3_vl"
    tok = proc.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in MONET_TOKENS] == list(range(n_base, n_base + 5))
    batch = collate(make_samples(2, seed=2), proc, "stage1")
    want = collate(make_samples(2, seed=2), processor, "stage1")
    assert torch.equal(batch.input_ids, want.input_ids)
    assert torch.equal(batch.pixel_values, want.pixel_values)
    with torch.no_grad():
        got = latent_forward(loaded, batch, return_logits=True).logits
        ref = latent_forward(model, want, return_logits=True).logits
    torch.testing.assert_close(got, ref)
    # Our own save of it loads again as Qwen3-VL.
    again, proc2 = load_pretrained(save_pretrained(loaded, proc, tmp_path / "ours"))
    assert type(again) is type(model) and proc2.model_type == "qwen3_vl"


def test_unsupported_model_type_is_named(tmp_path):
    model, processor = tiny_model(seed=0)
    d = save_pretrained(model, processor, tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llava"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type 'llava'.*'qwen3_vl'"):
        load_pretrained(d)


@pytest.mark.slow
def test_sft_stage2_and_a_vlpo_step_run_on_qwen3_vl(tmp_path):
    """The recipes take a Qwen3-VL directory as model.init: SFT stage 2 (latents, stage-2 mask,
    online teacher = the init model) moves the weights; one VLPO step runs on the result."""
    from pathlib import Path

    from monet_fast.train.metrics import read_metrics
    from monet_fast.train.rl_cli import rl
    from monet_fast.train.sft import train

    configs = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    model, processor = tiny_model(seed=0, arch="qwen3_vl", latent_size=4)
    init = save_pretrained(model, processor, tmp_path / "init")
    out = tmp_path / "sft"
    result = train(
        2,
        configs / "stage2.yaml",
        [
            "data.n=4",
            "model.latent_size=4",
            f"model.init={init}",
            "logging.progress=false",
            "trainer.micro_batch_size=2",
            "trainer.grad_accum=1",
            "scheduler.warmup_steps=0",
            "scheduler.name=constant",
            "optim.lr=3e-3",
        ],
        output=out,
        max_steps=2,
    )
    losses = [m["loss"] for m in read_metrics(out)]
    assert result.global_step == 2 and all(m == m for m in losses), losses
    trained, _ = load_pretrained(out / "hf")
    assert type(trained).__name__ == "Qwen3VLForConditionalGeneration"
    before, after = model.state_dict(), trained.state_dict()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 10
    rl_out = tmp_path / "vlpo"
    rl_result = rl(
        configs / "vlpo.yaml",
        [
            "logging.progress=false",
            "model.latent_size=4",
            "data.n=4",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=12",
            "trainer.mini_batch_prompts=2",
            "trainer.micro_batch_size=4",
            "trainer.export=false",
            "filter.max_extra_rollouts=0",
            "filter.enabled=false",
        ],
        output=rl_out,
        init=out / "hf",
        max_steps=1,
    )
    assert rl_result.global_step == 1
    assert read_metrics(rl_out)


@pytest.mark.slow
def test_quick_demo_runs_on_qwen3_vl(tmp_path):
    """`monet-fast demo --quick --arch qwen3_vl`: every phase on the tiny Qwen3-VL."""
    from monet_fast.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick_config(tmp_path / "demo")
    cfg.arch, cfg.compare_feedback = "qwen3_vl", False
    run_demo(cfg)
    config = json.loads((tmp_path / "demo" / "vlpo" / "run" / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert (tmp_path / "demo" / "report.json").is_file()
