"""MonetProcessor: a Qwen2.5-VL / Qwen3-VL processor of our own with the HF call signature.

Both architectures use the Qwen2-VL image processor (Qwen3-VL with patch 16 and mean/std 0.5:
the defaults come from its `monet_fast.model.arch` adapter or the checkpoint's
preprocessor_config.json) and the same image-pad expansion; `model_type` records which one.

Why not `Qwen2_5_VLProcessor`: in transformers 5.24 it cannot be constructed without
torchvision (its video processor needs it), and no torchvision wheel works with the CPU torch
we pin (ENVIRONMENT.md). What a Monet pipeline needs from a processor is small: render a chat
with the Qwen2-VL template, resize/patchify images with the Qwen2-VL image processor, expand each
`<|image_pad|>` to one token per merged patch, tokenize, pad, and mark image tokens in
`mm_token_type_ids` (without which the model silently uses 1-D positions). This module does
exactly that, with the same call signature and output keys, so it is a drop-in wherever
`AutoProcessor` would be used, and it loads both our own saves and the directory layout of the
released Qwen2.5-VL-7B / Monet-7B checkpoints (local files only).

Videos are not supported (Monet uses images only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tokens import IMAGE_PAD, VIDEO_PAD, add_monet_tokens

# The Qwen2-VL / Qwen2.5-VL chat template, verbatim from Qwen2.5-VL-7B-Instruct's
# chat_template.json. The reference renders every sample with it (REFERENCE.md §1.3).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Keyword arguments of a processor call that belong to the image processor; everything else
# goes to the tokenizer (padding, truncation, max_length, padding_side, ...), as in HF.
_IMAGE_KWARGS = frozenset(
    {
        "min_pixels",
        "max_pixels",
        "size",
        "do_resize",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
        "patch_size",
        "temporal_patch_size",
        "merge_size",
    }
)

PREPROCESSOR_CONFIG = "preprocessor_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"


def image_processor_class() -> type:
    """The Qwen2-VL image processor class that works here.

    transformers >= 5.2x split it into a torchvision backend (`Qwen2VLImageProcessor`, which
    falls back with a warning when torchvision is missing) and a PIL/numpy one
    (`Qwen2VLImageProcessorPil`). We use the PIL one whenever it exists, so CPU and GPU
    machines give identical pixel values; older releases only have `Qwen2VLImageProcessor`.
    """
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil
    except ImportError:  # transformers without the PIL split
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor


def qwen_image_processor(
    min_pixels: int | None = None, max_pixels: int | None = None, **kwargs: Any
) -> Any:
    """A Qwen2-VL image processor with patch 14, merge 2, temporal patch 2 (Qwen2.5-VL's)."""
    kwargs.setdefault("patch_size", 14)
    kwargs.setdefault("merge_size", 2)
    kwargs.setdefault("temporal_patch_size", 2)
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    return image_processor_class()(**kwargs)


def _flatten_images(images: Any) -> list[Any]:
    # HF accepts one image, a flat list, or one list per text; images are consumed in order.
    if isinstance(images, (list, tuple)):
        flat: list[Any] = []
        for item in images:
            flat.extend(_flatten_images(item))
        return flat
    return [images]


class MonetProcessor:
    """Tokenizer + Qwen2-VL image processor + chat template, called like an HF processor.

    `processor(text=..., images=..., return_tensors="pt", padding=True)` returns a
    `transformers.BatchFeature` with `input_ids`, `attention_mask`, `mm_token_type_ids`
    (0 text, 1 image) and, when images are given, `pixel_values` and `image_grid_thw`.
    `model_type` names the architecture it prepares inputs for (`monet_fast.model.arch`).
    """

    image_token = IMAGE_PAD
    video_token = VIDEO_PAD
    model_input_names = [
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "mm_token_type_ids",
    ]

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        chat_template: str | None = None,
        model_type: str = "qwen2_5_vl",
    ):
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in (IMAGE_PAD, VIDEO_PAD) if tok not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks Qwen2.5-VL special tokens {missing}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or QWEN2_VL_CHAT_TEMPLATE
        self.image_token_id = vocab[IMAGE_PAD]
        self.video_token_id = vocab[VIDEO_PAD]
        self.model_type = model_type

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        videos: Any = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ):
        """Process a batch; kwargs are split between the image processor and the tokenizer."""
        from transformers import BatchFeature

        if videos is not None:
            raise NotImplementedError("MonetProcessor does not support videos")
        if images is None and text is None:
            raise ValueError("MonetProcessor needs text, images, or both")
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _IMAGE_KWARGS}
        merge_size = image_kwargs.get("merge_size", self.image_processor.merge_size)

        flat_images = _flatten_images(images) if images is not None else []
        texts: list[str] | None = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            if any(VIDEO_PAD in t for t in texts):
                raise NotImplementedError(f"MonetProcessor does not support videos ({VIDEO_PAD})")
            n_pads = sum(t.count(IMAGE_PAD) for t in texts)
            if n_pads != len(flat_images):
                raise ValueError(
                    f"the text has {n_pads} {IMAGE_PAD} placeholder(s) but {len(flat_images)} "
                    "image(s) were passed; there must be exactly one image per placeholder"
                )

        data: dict[str, Any] = {}
        n_tokens: list[int] = []
        if flat_images:
            image_inputs = self.image_processor(
                images=flat_images, return_tensors=return_tensors, **image_kwargs
            )
            data.update(image_inputs)
            n_tokens = self.num_image_tokens(image_inputs["image_grid_thw"], merge_size)

        if texts is not None:
            expanded, expected = self._expand_image_pads(texts, n_tokens)
            text_inputs = self.tokenizer(expanded, **kwargs)
            input_ids = text_inputs["input_ids"]
            for row, (ids, want) in enumerate(zip(input_ids, expected)):
                got = sum(1 for i in ids if i == self.image_token_id)
                if got != want:
                    raise ValueError(
                        f"text {row}: expected {want} image tokens after expansion but the "
                        f"tokenized sequence has {got}; truncation (max_length) must not cut "
                        "through an image"
                    )
            data.update(text_inputs)
            data["mm_token_type_ids"] = [
                [1 if i == self.image_token_id else 0 for i in ids] for ids in input_ids
            ]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand_image_pads(
        self, texts: list[str], n_tokens: list[int]
    ) -> tuple[list[str], list[int]]:
        # Images are consumed in order across the whole batch (as HF does).
        it = iter(n_tokens)
        expanded: list[str] = []
        expected: list[int] = []
        for t in texts:
            pieces = t.split(IMAGE_PAD)
            out = [pieces[0]]
            count = 0
            for piece in pieces[1:]:
                n = next(it)
                count += n
                out.append(IMAGE_PAD * n)
                out.append(piece)
            expanded.append("".join(out))
            expected.append(count)
        return expanded, expected

    def num_image_tokens(self, image_grid_thw: Any, merge_size: int | None = None) -> list[int]:
        """Tokens each image occupies in the LLM sequence: grid_t*grid_h*grid_w / merge^2.

        (The vision merger turns each merge x merge block of patches into one LLM token.)
        """
        m = merge_size if merge_size is not None else self.image_processor.merge_size
        return [t * h * w // m**2 for t, h, w in _rows(image_grid_thw)]

    # ------------------------------------------------------------- chat / decode

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render one conversation (str) or a batch of them (list[str]) with the chat template.

        Content may be a string or a list of {"type": "text", "text": ...} /
        {"type": "image", ...} items; images render as
        `<|vision_start|><|image_pad|><|vision_end|>`, and a missing system message becomes
        "You are a helpful assistant.". With `tokenize=True` the rendered text is processed
        together with the in-memory images (PIL images or local paths under "image") found in
        the messages, in order, and a BatchFeature is returned.
        """
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = list(messages) if batched else [messages]
        template = chat_template or self.chat_template
        template_kwargs = {k: kwargs.pop(k) for k in ("add_vision_id",) if k in kwargs}
        rendered = [
            self.tokenizer.apply_chat_template(
                list(conv),
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
            for conv in conversations
        ]
        if not tokenize:
            return rendered if batched else rendered[0]
        images = [img for conv in conversations for img in _images_in(conv)]
        return self(text=rendered, images=images or None, return_tensors=return_tensors, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    # ------------------------------------------------------------ persistence

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write tokenizer files, preprocessor_config.json and chat_template.jinja."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        files = list(self.image_processor.save_pretrained(str(out)))
        files += list(self.tokenizer.save_pretrained(str(out)))
        # chat_template.jinja is where transformers 5.x processors keep the template; it is
        # written last so it wins over a template the tokenizer may also have written there.
        (out / CHAT_TEMPLATE_JINJA).write_text(self.chat_template, encoding="utf-8")
        files.append(str(out / CHAT_TEMPLATE_JINJA))
        return files

    @classmethod
    def from_pretrained(
        cls,
        pretrained_dir: str | os.PathLike,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        add_monet: bool = True,
        **image_kwargs: Any,
    ) -> MonetProcessor:
        """Load from a local directory: our own saves or a Qwen2.5-VL-7B / Monet-7B layout.

        Reads tokenizer.json (+ tokenizer_config.json), preprocessor_config.json and the chat
        template from chat_template.jinja, chat_template.json, or the tokenizer config (in that
        order; the Qwen2-VL template if none). `min_pixels` / `max_pixels` override the saved
        image budget. Monet's special tokens are added (idempotently) unless `add_monet=False`.
        Never downloads.
        """
        from transformers import AutoTokenizer

        path = Path(pretrained_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"processor directory {str(path)!r} does not exist")
        missing = missing_processor_files(path)
        if missing:
            raise FileNotFoundError(
                f"processor directory {str(path)!r} is incomplete: missing {', '.join(missing)}"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if min_pixels is not None:
            image_kwargs["min_pixels"] = min_pixels
        if max_pixels is not None:
            image_kwargs["max_pixels"] = max_pixels
        image_processor = image_processor_class().from_pretrained(
            str(path), local_files_only=True, **image_kwargs
        )
        chat_template = _read_chat_template(path) or getattr(tokenizer, "chat_template", None)
        if add_monet:
            add_monet_tokens(tokenizer)
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            chat_template=chat_template,
            model_type=_model_type(path),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer={type(self.tokenizer).__name__}"
            f"(len={len(self.tokenizer)}), image_processor={type(self.image_processor).__name__}"
            f"(merge_size={self.image_processor.merge_size}))"
        )


def missing_processor_files(path: str | os.PathLike) -> list[str]:
    """Names of the processor files a directory lacks (empty if complete)."""
    p = Path(path)
    missing = []
    has_tokenizer = (p / "tokenizer.json").is_file() or (
        (p / "vocab.json").is_file() and (p / "merges.txt").is_file()
    )
    if not has_tokenizer:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if not (p / PREPROCESSOR_CONFIG).is_file():
        missing.append(PREPROCESSOR_CONFIG)
    return missing


def _model_type(path: Path) -> str:
    # A model directory says which architecture its processor serves; a bare processor
    # directory (no config.json) is taken as Qwen2.5-VL's.
    config = path / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("model_type") or "qwen2_5_vl"
        except ValueError:
            pass  # load_pretrained reports a corrupt config.json by name
    return "qwen2_5_vl"


def _read_chat_template(path: Path) -> str | None:
    jinja = path / CHAT_TEMPLATE_JINJA
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    # Qwen2.5-VL-7B-Instruct ships {"chat_template": "..."} in chat_template.json (4.x format).
    for name in (CHAT_TEMPLATE_JSON, "processor_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text(encoding="utf-8")).get("chat_template")
            if template:
                return template
    return None


def _rows(grid: Any) -> list[tuple[int, int, int]]:
    # image_grid_thw may be a tensor, a numpy array or nested lists depending on return_tensors.
    if hasattr(grid, "tolist"):
        grid = grid.tolist()
    return [tuple(int(v) for v in row) for row in grid]


def _images_in(conversation: Sequence[dict[str, Any]]) -> list[Any]:
    images = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            continue
        for item in content:
            if item.get("type") == "image" or "image" in item or "image_url" in item:
                image = item.get("image", item.get("image_url"))
                if isinstance(image, (str, os.PathLike)):
                    if str(image).startswith(("http://", "https://")):
                        raise ValueError(f"MonetProcessor never downloads; got image URL {image!r}")
                    from PIL import Image

                    image = Image.open(image)
                if image is None:
                    raise ValueError(f"image item without an image: {item!r}")
                images.append(image)
    return images
