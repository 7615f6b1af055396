"""Tiny tokenizer and MonetProcessor: determinism, Monet tokens, chat template, image-pad
expansion, HF-compatible outputs and save/load round trips (CPU, no downloads)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from monet_fast.model import (
    IMAGE_PAD,
    MONET_TOKENS,
    QWEN_SPECIAL_TOKENS,
    VISION_END,
    VISION_START,
    MonetProcessor,
    TokenIds,
    add_monet_tokens,
    tiny_processor,
    tiny_tokenizer,
)
from monet_fast.model.processor import image_processor_class
from monet_fast.model.tiny import _train_bpe

# (height, width) of test images; awkward sizes so the resize to multiples of 28 matters.
IMAGE_SIZES = [(112, 112), (150, 97), (224, 168), (30, 300)]


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor() -> MonetProcessor:
    return tiny_processor()


def user_turn(n_images: int, text: str = "What color is the small circle?") -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------- tokenizer


def test_tiny_bpe_is_deterministic():
    # The uncached trainer twice: identical vocabulary and merges. Each training run builds
    # fresh Rust hash maps with new random keys, so this also catches hash-order dependence
    # (checked by hand across processes with different PYTHONHASHSEED / RAYON_NUM_THREADS).
    assert _train_bpe() == _train_bpe()
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a is not b


def test_tiny_tokenizer_matches_qwen_conventions():
    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    # ~1000 BPE entries, then Qwen's specials in Qwen's order, then Monet's tokens.
    specials = [vocab[t] for t in QWEN_SPECIAL_TOKENS]
    assert specials == list(range(specials[0], specials[0] + len(specials)))
    assert 900 <= specials[0] <= 1000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert tok.tokenize("assistant") == ["assistant"]
    assert tok("<|im_start|>assistant").input_ids == [vocab["<|im_start|>"], vocab["assistant"]]
    # No BOS/EOS added around plain text (Qwen adds none).
    ids = tok("red circle").input_ids
    assert tok.decode(ids) == "red circle"


def test_monet_tokens_consecutive_and_idempotent():
    tok = tiny_tokenizer(monet_tokens=False)
    n = len(tok)
    ids = add_monet_tokens(tok)
    # Same relative order as the reference (151665..151669 on the real tokenizer).
    assert ids == list(range(n, n + len(MONET_TOKENS)))
    assert add_monet_tokens(tok) == ids
    assert len(tok) == n + len(MONET_TOKENS)
    t = TokenIds.from_tokenizer(tok)
    assert [t.latent_pad, t.latent_start, t.latent_end, t.obs_start, t.obs_end] == ids
    # Special tokens are atomic in text.
    text = "<abs_vis_token><abs_vis_token_pad></abs_vis_token><observation>red</observation>"
    enc = tok(text).input_ids
    assert enc[:3] == [t.latent_start, t.latent_pad, t.latent_end]
    assert enc[3] == t.obs_start and enc[-1] == t.obs_end


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert back.get_vocab() == tok.get_vocab()
    assert len(back) == len(tok)
    text = "<|im_start|>user\nZoom in: <abs_vis_token></abs_vis_token> \\boxed{A}<|im_end|>"
    assert back(text).input_ids == tok(text).input_ids
    assert (back.eos_token, back.pad_token) == (tok.eos_token, tok.pad_token)


# ------------------------------------------------------------------------ chat template


def test_chat_template_default_system_prompt(processor):
    text = processor.apply_chat_template(user_turn(1), add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "What color is the small circle?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_given_system_and_string_content(processor):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = processor.apply_chat_template(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
    )
    # A batch of conversations renders to a list.
    assert processor.apply_chat_template([messages, messages]) == [text, text]


def test_chat_template_tokenize_with_images(processor):
    img = make_image(112, 112)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": img}, {"type": "text", "text": "Count."}],
        }
    ]
    out = processor.apply_chat_template(messages, tokenize=True, return_tensors="pt")
    ref = processor(
        text=[processor.apply_chat_template(messages)], images=[img], return_tensors="pt"
    )
    for key in ref:
        torch.testing.assert_close(out[key], ref[key])


# --------------------------------------------------------------------- image expansion


@pytest.mark.parametrize("height, width", IMAGE_SIZES)
def test_image_pad_expansion_matches_grid(processor, height, width):
    img = make_image(height, width)
    text = processor.apply_chat_template(user_turn(1))
    out = processor(text=[text], images=[img], return_tensors="pt")
    grid = out["image_grid_thw"]
    assert grid.shape == (1, 3)
    # What the image processor alone implies for this image.
    alone = processor.image_processor(images=[img], return_tensors="pt")
    torch.testing.assert_close(alone["image_grid_thw"], grid)
    torch.testing.assert_close(alone["pixel_values"], out["pixel_values"])
    n_image_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_image_tokens == int(grid.prod()) // 4
    assert out["pixel_values"].shape[0] == int(grid.prod())
    # The pads sit between vision_start and vision_end, contiguous.
    ids = out["input_ids"][0].tolist()
    vocab = processor.tokenizer.get_vocab()
    start = ids.index(vocab[VISION_START])
    assert ids[start + 1 + n_image_tokens] == vocab[VISION_END]
    # Budget of the tiny processor: 4..64 LLM tokens per image.
    assert 4 <= n_image_tokens <= 64


def test_batch_images_consumed_in_order_with_padding(processor):
    images = [make_image(*IMAGE_SIZES[i], seed=i) for i in range(3)]
    texts = [
        processor.apply_chat_template(user_turn(2, "Compare.")),
        processor.apply_chat_template(user_turn(1, "A much longer question about colors.")),
    ]
    out = processor(text=texts, images=images, return_tensors="pt", padding=True)
    per_image = processor.num_image_tokens(out["image_grid_thw"])
    counts = (out["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert counts == [per_image[0] + per_image[1], per_image[2]]
    assert out["input_ids"].shape == out["attention_mask"].shape == out["mm_token_type_ids"].shape
    expected_types = (out["input_ids"] == processor.image_token_id).long()
    torch.testing.assert_close(out["mm_token_type_ids"].long(), expected_types)
    # Right padding by default (tokenizer.padding_side), with <|endoftext|> as pad.
    lengths = out["attention_mask"].sum(dim=1)
    short = int(lengths.argmin())
    assert out["attention_mask"][short, -1] == 0
    assert out["input_ids"][short, -1] == processor.tokenizer.pad_token_id


def test_padding_side_follows_tokenizer():
    proc = tiny_processor()
    proc.tokenizer.padding_side = "left"
    out = proc(text=["red", "a small blue circle"], return_tensors="pt", padding=True)
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1


def test_text_only_call(processor):
    out = processor(text="no images here", return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert int(out["mm_token_type_ids"].sum()) == 0


@pytest.mark.parametrize("n_pads, n_images", [(2, 1), (1, 0), (0, 1), (1, 2)])
def test_image_count_mismatch_raises(processor, n_pads, n_images):
    text = processor.apply_chat_template(user_turn(n_pads))
    images = [make_image(56, 56, seed=i) for i in range(n_images)] or None
    with pytest.raises(ValueError, match=rf"{n_pads} {re.escape(IMAGE_PAD)} .* {n_images} image"):
        processor(text=[text], images=images, return_tensors="pt")


def test_truncation_through_image_raises(processor):
    text = processor.apply_chat_template(user_turn(1))
    with pytest.raises(ValueError, match="truncation"):
        processor(text=[text], images=[make_image(112, 112)], truncation=True, max_length=20)


def test_decode_delegates(processor):
    ids = processor(text="the red circle")["input_ids"][0]
    assert processor.decode(ids) == "the red circle"
    assert processor.batch_decode([ids, ids]) == ["the red circle"] * 2


# ---------------------------------------------------------------------------- save/load


def test_processor_save_load_round_trip(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    back = MonetProcessor.from_pretrained(tmp_path)
    assert back.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert back.chat_template == processor.chat_template
    assert back.image_processor.size == processor.image_processor.size
    img = make_image(150, 97)
    text = processor.apply_chat_template(user_turn(1))
    a = processor(text=[text], images=[img], return_tensors="pt")
    b = back(text=[text], images=[img], return_tensors="pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key])


@pytest.mark.parametrize(
    "template_in", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"]
)
def test_from_pretrained_qwen_layout(tmp_path, template_in):
    """A directory shaped like Qwen2.5-VL-7B-Instruct: no Monet tokens, min/max_pixels keys, the
    chat template in any of the places transformers 4.x / 5.x put it."""
    tok = tiny_tokenizer(monet_tokens=False)
    n = len(tok)
    custom = tiny_processor().chat_template.replace("You are a helpful", "You are a careful")
    tok.chat_template = custom if template_in == "chat_template.jinja" else None
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file() == (template_in == "chat_template.jinja")
    if template_in == "chat_template.json":
        (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": custom}))
    if template_in == "tokenizer_config.json":
        tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
        tok_cfg["chat_template"] = custom
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor",
            }
        )
    )
    proc = MonetProcessor.from_pretrained(tmp_path, max_pixels=28 * 28 * 16)
    assert isinstance(proc.image_processor, image_processor_class())
    assert proc.image_processor.size.shortest_edge == 3136
    assert proc.image_processor.size.longest_edge == 28 * 28 * 16
    assert [proc.tokenizer.convert_tokens_to_ids(t) for t in MONET_TOKENS] == list(range(n, n + 5))
    assert "You are a careful assistant." in proc.apply_chat_template(user_turn(0))


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MonetProcessor.from_pretrained(tmp_path / "nope")
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        MonetProcessor.from_pretrained(tmp_path)
