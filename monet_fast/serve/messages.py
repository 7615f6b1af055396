"""OpenAI chat messages -> the HF messages `generate()` renders, with images decoded and limited.

Images come as `image_url` items: `data:image/...;base64,...` URLs, or local files (`file://`
URLs or plain paths) only when the server was started with `--allow-local-images DIR`, and then
only inside DIR (symlinks resolved, through `monet_fast.data.paths.check_inside_root`). Nothing
is downloaded. Encoded size and pixel count are capped before the image is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from monet_fast.serve.schema import ApiError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImageLimits:
    """max_bytes: encoded image size; max_pixels: width x height; local_root: the
    `--allow-local-images` directory (None: local files refused)."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    local_root: str | None = None


def _bad(message: str, param: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _open_image(data: bytes, param: str, limits: ImageLimits):
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise _bad(
            f"image is {len(data)} bytes, over the server's limit of {limits.max_bytes} bytes",
            param,
            "image_too_large",
        )
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        width, height = img.size
    except Exception as err:  # PIL raises many types for garbage bytes
        raise _bad(f"image could not be decoded: {err}", param, "invalid_image") from None
    if width * height > limits.max_pixels:
        raise _bad(
            f"image is {width}x{height} = {width * height} pixels, over the server's limit of "
            f"{limits.max_pixels} pixels",
            param,
            "image_too_large",
        )
    try:
        return img.convert("RGB")
    except Exception as err:
        raise _bad(f"image could not be decoded: {err}", param, "invalid_image") from None


def _data_url(url: str, param: str, limits: ImageLimits):
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise _bad(
            f"data URL must be 'data:image/<type>;base64,<data>', got {url[:40]!r}...", param
        )
    # base64 grows 4/3: refuse an oversized payload before decoding it.
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise _bad(
            f"image is about {len(payload) * 3 // 4} bytes, over the server's limit of "
            f"{limits.max_bytes} bytes",
            param,
            "image_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise _bad(f"image data URL has invalid base64: {err}", param, "invalid_base64") from None
    return _open_image(data, param, limits)


def _local_file(url: str, param: str, limits: ImageLimits):
    from monet_fast.data.errors import DataError
    from monet_fast.data.paths import check_inside_root

    path = unquote(urlparse(url).path) if url.startswith("file://") else url
    if limits.local_root is None:
        raise _bad(
            f"local image {path!r} refused: start the server with --allow-local-images DIR to "
            "serve files under DIR",
            param,
            "local_images_disabled",
        )
    try:
        path = str(check_inside_root(limits.local_root, os.path.abspath(path)))
    except DataError:
        raise _bad(
            f"local image {path!r} is outside the allowed directory {limits.local_root!r}",
            param,
            "local_image_outside_root",
        ) from None
    if not os.path.isfile(path):
        raise _bad(f"local image {path!r} does not exist", param, "image_not_found")
    if os.path.getsize(path) > limits.max_bytes:
        raise _bad(
            f"image {path!r} is {os.path.getsize(path)} bytes, over the server's limit of "
            f"{limits.max_bytes} bytes",
            param,
            "image_too_large",
        )
    with open(path, "rb") as f:
        return _open_image(f.read(), param, limits)


def _image(item: dict, param: str, limits: ImageLimits):
    spec = item.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise _bad("image_url item needs {'image_url': {'url': str}}", param)
    if url.startswith("data:"):
        return _data_url(url, param, limits)
    if url.startswith(("http://", "https://")):
        raise _bad(
            f"image URLs are never downloaded; send a data URL instead of {url[:60]!r}",
            param,
            "remote_images_disabled",
        )
    return _local_file(url, param, limits)


def to_hf_messages(messages: list, limits: ImageLimits) -> list[dict]:
    """OpenAI messages -> HF messages (`{"type": "image", "image": PIL.Image}` items)."""
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object, got {message!r}", where)
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {list(ROLES)}, got {role!r}", where + ".role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise _bad(
                f"{where}.content must be a string or a non-empty list of parts",
                where + ".content",
            )
        parts = []
        for j, part in enumerate(content):
            param = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise _bad(f"{param}: images are allowed in user messages only", param)
                parts.append({"type": "image", "image": _image(part, param, limits)})
            else:
                raise _bad(
                    f"{param} must be {{'type': 'text', 'text': str}} or "
                    f"{{'type': 'image_url', 'image_url': {{'url': str}}}}, got {part!r}"[:300],
                    param,
                )
        out.append({"role": role, "content": parts})
    if out[-1]["role"] == "assistant":
        raise _bad("the last message must not be from the assistant", f"messages[{len(out) - 1}]")
    return out
