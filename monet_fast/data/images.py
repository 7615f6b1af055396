"""Image helpers shared by the data readers and collators: checked RGB loading, token-budget resizing.

Every image a reader or collator decodes goes through `open_rgb` / `decode_rgb` (or, header only,
`probe_image`), so an empty, truncated or corrupt file, a decompression bomb (over
`pixel_limit()`, checked from the header before any pixel is decoded) or a mode that does not
convert to RGB faithfully is one `DataError` naming the image, never a PIL exception.

`resize_by_token_budget` reproduces the reference's function of the same name (NOVAglow646/Monet,
`src/utils.py`; REFERENCE.md §1.4, oracle 5): the sizes it picks decide how many visual tokens
each image costs, so changing them changes sequence layouts and breaks teacher caches.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence

from PIL import Image

from monet_fast.data.errors import DataError

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


# Modes that convert to RGB faithfully. 32-bit integer / float / 16-bit modes ("I", "F",
# "I;16") convert by clamping to 0..255, which silently turns most images white: refused.
RGB_CONVERTIBLE_MODES: tuple[str, ...] = (
    "1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
)  # fmt: skip


_TOO_LARGE_HINT = (
    "set PIL.Image.MAX_IMAGE_PIXELS higher (or None) to read trusted very large images"
)


def pixel_limit() -> int | None:
    """Largest image area accepted: PIL's `Image.MAX_IMAGE_PIXELS` (89.5 Mpx unless changed;
    None disables). One process-wide knob, so PIL's own bomb check and ours agree."""
    return Image.MAX_IMAGE_PIXELS


def check_image(im: Image.Image, name: str) -> None:
    """Refuse an opened (header-only) image that is empty, too large or of an unusable mode.

    Runs before any pixel is decoded, so a decompression bomb costs only its header.
    """
    width, height = im.size
    if width <= 0 or height <= 0:
        raise DataError(f"image {name!r} has no pixels ({width}x{height})")
    limit = pixel_limit()
    if limit is not None and width * height > limit:
        raise DataError(
            f"image {name!r} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limit} (a decompression bomb?); {_TOO_LARGE_HINT}"
        )
    if im.mode not in RGB_CONVERTIBLE_MODES:
        raise DataError(
            f"image {name!r} has mode {im.mode!r}, which does not convert to RGB faithfully "
            f"(allowed: {list(RGB_CONVERTIBLE_MODES)})"
        )


def _open_checked(source: str | os.PathLike | io.BytesIO, name: str, decode: bool):
    """Open, `check_image`, and (if `decode`) return the RGB pixels; every failure a DataError."""
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS; check_image raises for those instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                check_image(im, name)
                # convert() always returns a new, loaded image, so nothing refers to the file.
                return im.convert("RGB") if decode else None
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise DataError(f"image {name!r} is too large ({err}); {_TOO_LARGE_HINT}") from None
    except MemoryError:
        raise
    except Exception as err:
        # PIL's decoders raise many types on corrupt input (OSError for truncation,
        # UnidentifiedImageError, SyntaxError, ValueError, struct.error, IndexError...): all
        # mean "this file is not a usable image", which is a data problem, not a crash.
        raise DataError(
            f"image {name!r} does not decode to an image ({type(err).__name__}: {err})"
        ) from None


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully decoded as RGB, closing the file handle.

    Raises `DataError` naming the path for a missing, empty, truncated, corrupt, oversized
    (`pixel_limit`) or unconvertible (`RGB_CONVERTIBLE_MODES`) file; callers add the row.
    """
    name = os.fspath(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise DataError(f"missing image file {name!r}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read image file {name!r} ({err})") from None
    if size == 0:
        raise DataError(f"image file {name!r} is empty (0 bytes)")
    return _open_checked(path, name, decode=True)


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """`open_rgb` for encoded image bytes (e.g. a base64 column); `name` is used in messages."""
    if not data:
        raise DataError(f"image {name!r} is empty (0 bytes)")
    return _open_checked(io.BytesIO(data), name, decode=True)


def probe_image(data: bytes, name: str) -> None:
    """Check encoded image bytes by their header only (format, size limit, mode): cheap."""
    if not data:
        raise DataError(f"image {name!r} is empty (0 bytes)")
    _open_checked(io.BytesIO(data), name, decode=False)


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
