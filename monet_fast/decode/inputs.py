"""Turn generate() inputs (chat conversations or templated prompts) into one left-padded batch.

An input is one of:
  * a chat conversation: a list of HF messages (`{"role": ..., "content": str | [items]}`),
    with images as `{"type": "image", "image": PIL.Image | path}` items; it is rendered with the
    processor's chat template and a generation prompt;
  * an already templated prompt: `{"text": str, "images": [PIL.Image | path, ...]}` (one image
    per `<|image_pad|>` placeholder, in order), or a bare string without images.

A prompt whose text ends with `<abs_vis_token>` starts in latent mode: the token is taken off the
prompt and forced as the first decoded token (so both layouts apply their rule to it exactly as
if the model had sampled it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monet_fast.model.tokens import IMAGE_PAD, LATENT_START


@dataclass
class PreparedBatch:
    """A processed, left-padded batch plus what the decoder needs to know per row."""

    texts: list[str]  # prompt texts as prefilled (a trailing START removed)
    forced_start: list[bool]  # row starts in latent mode
    input_ids: torch.Tensor  # [B, P]
    attention_mask: torch.Tensor  # [B, P], 0 on (left) padding
    mm_token_type_ids: torch.Tensor  # [B, P], 0 text, 1 image
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


def _load_image(image: Any, where: str) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if str(image).startswith(("http://", "https://")):
            raise ValueError(f"{where}: images are never downloaded; got URL {str(image)!r}")
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except OSError as err:
            raise ValueError(f"{where}: {str(path)!r} is not a readable image ({err})") from err
    raise ValueError(
        f"{where}: unknown image {type(image).__name__!r}; pass a PIL.Image or a local file path"
    )


def _images_in_messages(messages: list[dict], where: str) -> list[Any]:
    images = []
    for message in messages:
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        for item in content:
            if not isinstance(item, dict):
                raise ValueError(f"{where}: message content items must be dicts, got {item!r}")
            if item.get("type") == "image" or "image" in item:
                if item.get("image") is None:
                    raise ValueError(f"{where}: image item without an image: {item!r}")
                images.append(_load_image(item["image"], where))
    return images


def _is_conversation(item: Any) -> bool:
    return (
        isinstance(item, (list, tuple))
        and len(item) > 0
        and all(isinstance(m, dict) and "role" in m for m in item)
    )


def render_input(processor: Any, item: Any, index: int) -> tuple[str, list[Any]]:
    """(prompt text, loaded images) of one generate() input; raises a clear error if malformed."""
    where = f"input {index}"
    if isinstance(item, str):
        text, images = item, []
    elif isinstance(item, dict) and "text" in item:
        text = item["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        images = [_load_image(img, where) for img in (item.get("images") or [])]
    elif _is_conversation(item):
        text = processor.apply_chat_template(list(item), tokenize=False, add_generation_prompt=True)
        images = _images_in_messages(list(item), where)
    else:
        raise ValueError(
            f"{where}: expected a chat conversation (list of messages with 'role'), a "
            f"{{'text': str, 'images': [...]}} prompt or a string, got {type(item).__name__}"
        )
    if not text.strip():
        raise ValueError(f"{where}: empty prompt")
    n_pads = text.count(IMAGE_PAD)
    if n_pads != len(images):
        raise ValueError(
            f"{where}: the prompt has {n_pads} {IMAGE_PAD} placeholder(s) but {len(images)} "
            "image(s) were given; pass exactly one image per placeholder"
        )
    return text, images


def prepare_batch(processor: Any, inputs: list[Any]) -> PreparedBatch:
    """Render, validate and process `inputs` into one left-padded batch."""
    if isinstance(inputs, (str, dict)) or _is_conversation(inputs):
        raise ValueError("inputs must be a list of inputs (wrap a single input in a list)")
    if not inputs:
        raise ValueError("inputs is empty: pass at least one prompt")
    texts, images, forced = [], [], []
    for i, item in enumerate(inputs):
        text, imgs = render_input(processor, item, i)
        starts_latent = text.endswith(LATENT_START)
        if starts_latent:
            text = text[: -len(LATENT_START)]
            if not text.strip():
                raise ValueError(f"input {i}: empty prompt before {LATENT_START}")
        texts.append(text)
        images.extend(imgs)
        forced.append(starts_latent)

    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    # Left padding: the last column is every row's last prompt token, so one decode step
    # appends one column for all rows.
    tokenizer.padding_side = "left"
    try:
        enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    if enc["input_ids"].shape[1] == 0:
        raise ValueError("every prompt tokenized to nothing")
    mm_types = enc.get("mm_token_type_ids")
    if mm_types is None:
        # HF's Qwen2.5-VL processor returns these only on request; they mark the image tokens.
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        mm_types = (enc["input_ids"] == image_id).long()
    return PreparedBatch(
        texts=texts,
        forced_start=forced,
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        mm_token_type_ids=mm_types,
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
    )
