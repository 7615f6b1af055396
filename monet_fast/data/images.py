"""Image helpers shared by the data readers and collators: RGB loading and token-budget resizing.

`resize_by_token_budget` reproduces the reference's function of the same name (NOVAglow646/Monet,
`src/utils.py`; REFERENCE.md §1.4, oracle 5): the sizes it picks decide how many visual tokens
each image costs, so changing them changes sequence layouts and breaks teacher caches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image

# One visual token of Qwen2.5-VL covers a 28x28 patch (14 px ViT patches, 2x2 merge).
PIXELS_PER_TOKEN = 28 * 28

# (global_max_pixels, per_img_max_pixels) budgets of the reference scripts, by use.
REFERENCE_TOKEN_BUDGETS: dict[str, tuple[int, int]] = {
    "sft_stage1": (2000 * PIXELS_PER_TOKEN, 1280 * PIXELS_PER_TOKEN),
    "teacher_reps": (2000 * PIXELS_PER_TOKEN, 1280 * PIXELS_PER_TOKEN),
    "sft_stage2": (1500 * PIXELS_PER_TOKEN, 1280 * PIXELS_PER_TOKEN),
    "teacher_latents": (1000 * PIXELS_PER_TOKEN, 500 * PIXELS_PER_TOKEN),
    "sft_stage3": (2000 * PIXELS_PER_TOKEN, 2000 * PIXELS_PER_TOKEN),
}


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully decoded as RGB, closing the file handle.

    Raises FileNotFoundError for a missing file and PIL's UnidentifiedImageError / OSError for
    an unreadable one; callers turn these into messages that name the sample.
    """
    with Image.open(path) as im:
        # convert() always returns a new, loaded image, so nothing refers to the closed file.
        return im.convert("RGB")


def resize_by_token_budget(
    images: Sequence[Image.Image],
    global_max_pixels: int = 2000 * PIXELS_PER_TOKEN,
    per_img_max_pixels: int = 1280 * PIXELS_PER_TOKEN,
    divisor: int = 28,
) -> tuple[list[Image.Image], list[tuple[int, int]] | None]:
    """Shrink `images` so that together they fit `global_max_pixels` (reference §1.4).

    If the total area already fits, the images are returned unchanged with `new_sizes=None`
    (the reference's signal that nothing was resized). Otherwise every image is scaled by the
    same ratio sqrt(global/total), each side floored to a multiple of `divisor` (at least
    `divisor`), then capped at `per_img_max_pixels` by a second rescale + floor, and resized
    with BICUBIC. `new_sizes` lists the (width, height) of every image, in order; stage 3 reuses
    it to size the student's question images like the teacher's.
    """
    if divisor <= 0:
        raise ValueError(f"divisor must be positive, got {divisor}")
    total = sum(img.width * img.height for img in images)
    if total <= global_max_pixels:
        return list(images), None

    ratio = math.sqrt(global_max_pixels / total)
    processed: list[Image.Image] = []
    new_sizes: list[tuple[int, int]] = []
    for img in images:
        # int() truncation then flooring, exactly as the reference: sizes must match token counts.
        w, h = int(img.width * ratio), int(img.height * ratio)
        w = max(divisor, (w // divisor) * divisor)
        h = max(divisor, (h // divisor) * divisor)
        if w * h > per_img_max_pixels:
            r = math.sqrt(per_img_max_pixels / (w * h))
            w = max(divisor, int(w * r) // divisor * divisor)
            h = max(divisor, int(h * r) // divisor * divisor)
        processed.append(img.resize((w, h), Image.Resampling.BICUBIC))
        new_sizes.append((w, h))
    return processed, new_sizes
