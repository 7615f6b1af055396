"""Tiny offline Qwen2.5-VL model, latent config and checkpoint loading/saving (CPU, no downloads)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from monet_fast.model import (
    LATENT_END,
    LATENT_PAD,
    LATENT_START,
    MONET_TOKENS,
    LatentConfig,
    MonetProcessor,
    apply_latent_config,
    ensure_embedding_rows,
    get_latent_config,
    load_pretrained,
    save_pretrained,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)


def make_image(height: int = 112, width: int = 112, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def sample_batch(processor: MonetProcessor, seed: int = 0):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "What color is the small circle?"},
            ],
        },
        {"role": "assistant", "content": "The observation shows a red circle. \\boxed{A}"},
    ]
    text = processor.apply_chat_template(messages)
    return processor(text=[text], images=[make_image(seed=seed)], return_tensors="pt", padding=True)


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


# ------------------------------------------------------------------------------ model


def test_forward_with_image(tiny):
    model, processor = tiny
    batch = sample_batch(processor)
    # Without mm_token_type_ids the model silently falls back to 1-D positions.
    assert "mm_token_type_ids" in batch
    logits = logits_of(model, batch)
    vocab = model.config.text_config.vocab_size
    assert logits.shape == (1, batch["input_ids"].shape[1], vocab)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # The image gets 3-D (t, h, w) positions: h and w vary inside the image block.
    pos, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    image = batch["mm_token_type_ids"][0].bool()
    assert pos[1, 0, image].unique().numel() > 1 and pos[2, 0, image].unique().numel() > 1
    assert (pos[0, 0, image] == pos[0, 0, image][0]).all()


def test_model_is_eval_fp32_and_stock_class(tiny):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, _ = tiny
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Untied LM head, like the 7B.
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_same_seed_same_weights_and_rng_untouched():
    state = torch.random.get_rng_state()
    a, _ = tiny_model(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = tiny_model(seed=3)
    c, _ = tiny_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_build_time():
    tiny_model(seed=0)  # the tokenizer is trained once per process; time a warm build
    start = time.perf_counter()
    tiny_model(seed=1)
    assert time.perf_counter() - start < 3.0


def test_tiny_config_shape():
    tok = tiny_tokenizer()
    cfg = tiny_config(tokenizer=tok)
    text, vision = cfg.text_config, cfg.vision_config
    assert text.vocab_size % 64 == 0 and text.vocab_size > len(tok)
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.out_hidden_size == text.hidden_size
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    vocab = tok.get_vocab()
    assert cfg.image_token_id == vocab["<|image_pad|>"]
    assert cfg.vision_start_token_id == vocab["<|vision_start|>"]
    assert cfg.vision_end_token_id == vocab["<|vision_end|>"]
    assert cfg.video_token_id == vocab["<|video_pad|>"]
    assert cfg.tie_word_embeddings is False
    # Overrides reach the right sub-config and keep mRoPE consistent.
    big = tiny_config(tokenizer=tok, hidden_size=128, num_hidden_layers=3)
    assert big.text_config.num_hidden_layers == 3 and big.vision_config.out_hidden_size == 128
    assert sum(big.text_config.rope_parameters["mrope_section"]) == 128 // 4 // 2
    with pytest.raises(ValueError, match="unknown tiny_config override"):
        tiny_config(tokenizer=tok, hiden_size=128)


def test_monet_tokens_fit_spare_rows(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in MONET_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 5))
    rows = model.get_input_embeddings().weight.shape[0]
    assert max(ids) < rows
    assert ensure_embedding_rows(model, tok) is False  # no resize needed
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_ensure_embedding_rows_grows_with_mean_and_never_shrinks():
    model, processor = tiny_model(seed=0, vocab_size=1024)
    tok = processor.tokenizer
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    tok.add_tokens([f"<extra_{i}>" for i in range(1100 - len(tok))], special_tokens=True)
    assert len(tok) == 1100
    assert ensure_embedding_rows(model, tok) is True
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert emb.shape == (1100, old_emb.shape[1]) and head.shape == (1100, old_head.shape[1])
    torch.testing.assert_close(emb[:1024], old_emb)
    torch.testing.assert_close(head[:1024], old_head)
    # HF's mean_resizing samples around the mean with 1e-9 x covariance: the mean, in practice.
    torch.testing.assert_close(emb[1024:], old_emb.mean(0).expand(76, -1), atol=1e-4, rtol=0)
    torch.testing.assert_close(head[1024:], old_head.mean(0).expand(76, -1), atol=1e-4, rtol=0)
    # A smaller tokenizer never shrinks the table.
    assert ensure_embedding_rows(model, tiny_tokenizer()) is False
    assert model.get_input_embeddings().weight.shape[0] == 1100


# --------------------------------------------------------------------------- latent config


def test_latent_config_on_tiny_model(tiny):
    model, processor = tiny
    cfg = get_latent_config(model)
    vocab = processor.tokenizer.get_vocab()
    assert cfg == LatentConfig(
        latent_size=8,
        latent_layout="sft",
        latent_token_id=vocab[LATENT_PAD],
        latent_start_id=vocab[LATENT_START],
        latent_end_id=vocab[LATENT_END],
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latent_size": 0}, "latent_size must be an int >= 1, got 0"),
        ({"latent_size": -3}, "got -3"),
        ({"latent_size": 2.5}, "got 2.5"),
        ({"latent_size": True}, "got True"),
        ({"latent_layout": "vllm"}, r"one of \['sft', 'monet_vllm'\], got 'vllm'"),
        ({"latent_token_id": -1}, "latent_token_id must be None or an int >= 0, got -1"),
    ],
)
def test_latent_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentConfig(**kwargs)


def test_latent_config_defaults_on_plain_qwen_config():
    from transformers import Qwen2_5_VLConfig

    assert get_latent_config(Qwen2_5_VLConfig()) == LatentConfig()


def test_latent_config_from_tokenizer_needs_monet_tokens():
    with pytest.raises(ValueError, match="add_monet_tokens"):
        LatentConfig.from_tokenizer(tiny_tokenizer(monet_tokens=False))


# ------------------------------------------------------------------------- save / load


def test_save_load_equal_logits(tmp_path, tiny):
    from safetensors import safe_open

    model, processor = tiny
    apply_latent_config(model, get_latent_config(model).replace(latent_size=5))
    try:
        out = save_pretrained(model, processor, tmp_path / "ckpt")
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
        # Weight names as in the released Qwen2.5-VL-7B / Monet-7B files (transformers 4.x).
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= keys
        assert "visual.patch_embed.proj.weight" in keys
        loaded, loaded_proc = load_pretrained(out)
    finally:
        apply_latent_config(model, get_latent_config(model).replace(latent_size=8))
    assert not loaded.training
    assert get_latent_config(loaded).latent_size == 5
    assert loaded_proc.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    a = sample_batch(processor)
    b = sample_batch(loaded_proc)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    torch.testing.assert_close(logits_of(loaded, b), logits_of(model, a))
    # Overrides win over the saved latent config.
    again, _ = load_pretrained(out, latent_size=10, latent_layout="monet_vllm")
    assert (get_latent_config(again).latent_size, get_latent_config(again).latent_layout) == (
        10,
        "monet_vllm",
    )
    # Saving over an existing checkpoint replaces it.
    save_pretrained(again, loaded_proc, out)
    assert get_latent_config(load_pretrained(out)[0]).latent_size == 10


def test_load_real_checkpoint_like_directory(tmp_path, tiny):
    """Stock Qwen2.5-VL-7B layout: a flat transformers-4.x config.json (no latent fields,
    `rope_scaling` with type "mrope", `torch_dtype`), tokenizer without Monet's tokens,
    preprocessor_config.json with min/max_pixels, chat_template.json."""
    model, processor = tiny
    d = tmp_path / "qwen"
    model.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    for key in LatentConfig().to_dict():
        config.pop(key)
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k not in ("model_type", "dtype")})
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["rope_theta"] = rope["rope_theta"]
    config["torch_dtype"] = config.pop("dtype")
    (d / "config.json").write_text(json.dumps(config))
    base_tok = tiny_tokenizer(monet_tokens=False)
    base_tok.chat_template = None
    base_tok.save_pretrained(d)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    (d / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 28 * 28 * 4,
                "max_pixels": 28 * 28 * 64,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )
    loaded, proc = load_pretrained(d, dtype=torch.float32, device="cpu", max_pixels=28 * 28 * 16)
    assert proc.image_processor.size.longest_edge == 28 * 28 * 16
    proc.image_processor.size = processor.image_processor.size  # same images as the reference
    n = len(base_tok)
    tok = proc.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in MONET_TOKENS] == list(range(n, n + 5))
    assert loaded.get_input_embeddings().weight.shape[0] == model.config.text_config.vocab_size
    cfg = get_latent_config(loaded)
    assert (cfg.latent_size, cfg.latent_layout) == (8, "sft")
    assert (cfg.latent_token_id, cfg.latent_start_id, cfg.latent_end_id) == (n, n + 1, n + 2)
    batch = sample_batch(proc)
    torch.testing.assert_close(logits_of(loaded, batch), logits_of(model, sample_batch(processor)))


def test_load_missing_or_incomplete(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    model, processor = tiny
    d = save_pretrained(model, processor, tmp_path / "ckpt")
    (d / "config.json").unlink()
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json.*preprocessor_config\.json"):
        load_pretrained(d)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_weights_named(tmp_path, tiny, damage):
    model, processor = tiny
    d = save_pretrained(model, processor, tmp_path / "ckpt")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\x00not safetensors" * 64, "empty": b""}[
            damage
        ]
    )
    with pytest.raises(
        ValueError, match=r"corrupted or truncated safetensors file .*model\.safetensors"
    ):
        load_pretrained(d)


def test_load_rejects_other_model_type(tmp_path, tiny):
    model, processor = tiny
    d = save_pretrained(model, processor, tmp_path / "ckpt")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_pretrained(d)
