"""`monet-fast serve`: an OpenAI-compatible chat server with continuous batching.

    monet-fast serve --model DIR|tiny [--host 127.0.0.1] [--port 8000] [--max-batch N]
        [--max-new-tokens N] [--max-context N] [--max-queue N] [--api-key KEY]
        [--max-prefill-batch N] [--max-prefill-tokens N]
        [--allow-local-images DIR] [--device cuda] [--dtype bfloat16]

`--model tiny` serves the embedded tiny model (random weights; for smoke tests). The API key may
also come from the MONET_FAST_API_KEY environment variable (kept out of the process list).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TINY = "tiny"
# The tiny model as `monet-fast bench latent-decode` builds it: a larger init range so its greedy
# text is not one repeated token.
TINY_SEED, TINY_INIT_RANGE = 0, 0.2


def load_model(name: str, device: str | None = None, dtype: str | None = None):
    """(model, processor, model id) for `--model`: a checkpoint directory or "tiny"."""
    if name == TINY:
        from monet_fast.model.tiny import tiny_model

        model, processor = tiny_model(seed=TINY_SEED, initializer_range=TINY_INIT_RANGE)
        if device is not None:
            model = model.to(device)
        return model, processor, TINY
    if not Path(name).is_dir():
        raise FileNotFoundError(f"--model {name!r}: not a checkpoint directory (or 'tiny')")
    from monet_fast.model.loading import load_pretrained

    model, processor = load_pretrained(name, dtype=dtype, device=device)
    return model, processor, Path(name).resolve().name


def build_server(
    model,
    processor,
    model_id: str,
    *,
    max_batch: int = 8,
    max_new_tokens: int = 512,
    max_context: int = 4096,
    max_queue: int | None = None,
    check_every: int = 4,
    max_prefill_batch: int = 8,
    max_prefill_tokens: int = 8192,
    api_key: str | None = None,
    allow_local_images: str | None = None,
    max_image_bytes: int = 20 * 2**20,
    max_image_pixels: int = 4096 * 4096,
    max_body_bytes: int = 64 * 2**20,
):
    """(app, scheduler): the scheduler thread started, the ASGI app over it."""
    from monet_fast.decode.config import resolve_config
    from monet_fast.serve.app import create_app
    from monet_fast.serve.messages import ImageLimits
    from monet_fast.serve.prepare import ServeLimits
    from monet_fast.serve.scheduler import Scheduler

    if allow_local_images is not None and not Path(allow_local_images).is_dir():
        raise FileNotFoundError(f"--allow-local-images {allow_local_images!r} is not a directory")
    if max_new_tokens < 1 or max_context < 2:
        raise ValueError("--max-new-tokens must be >= 1 and --max-context >= 2")
    cfg = resolve_config(model, processor, max_new_tokens=1)
    scheduler = Scheduler(
        model,
        processor,
        slots=max_batch,
        max_context=max_context,
        max_queue=4 * max_batch if max_queue is None else max_queue,
        check_every=check_every,
        max_prefill_batch=max_prefill_batch,
        max_prefill_tokens=max_prefill_tokens,
        eos_ids=cfg.eos_ids,
        fill_id=cfg.fill_id,
    )
    root = os.path.realpath(allow_local_images) if allow_local_images else None
    limits = ServeLimits(
        max_context=max_context,
        max_new_tokens=max_new_tokens,
        images=ImageLimits(max_image_bytes, max_image_pixels, root),
        max_body_bytes=max_body_bytes,
    )
    scheduler.start()
    return create_app(scheduler, model_id, limits, api_key), scheduler


def _cmd_serve(args: argparse.Namespace) -> int:
    from monet_fast._optional import require

    uvicorn = require("uvicorn", "monet-fast serve")
    require("fastapi", "monet-fast serve")
    model, processor, model_id = load_model(args.model, args.device, args.dtype)
    app, scheduler = build_server(
        model,
        processor,
        model_id,
        max_batch=args.max_batch,
        max_new_tokens=args.max_new_tokens,
        max_context=args.max_context,
        max_queue=args.max_queue,
        check_every=args.check_every,
        max_prefill_batch=args.max_prefill_batch,
        max_prefill_tokens=args.max_prefill_tokens,
        api_key=args.api_key or os.environ.get("MONET_FAST_API_KEY") or None,
        allow_local_images=args.allow_local_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_body_bytes=args.max_body_bytes,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        scheduler.shutdown()
    return 0


def register(subparsers) -> None:
    """Add `serve` to the `monet-fast` command line."""
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible chat server with continuous batching (latent decoding)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="DIR|tiny", help="checkpoint dir or 'tiny'")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="decode slots (concurrent requests)")
    p.add_argument("--max-queue", type=int, default=None, help="queued requests (default 4x)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default max_tokens")
    p.add_argument("--max-context", type=int, default=4096, help="prompt + output tokens")
    p.add_argument("--check-every", type=int, default=4, help="decode steps between joins")
    p.add_argument(
        "--max-prefill-batch", type=int, default=8, help="requests prefilled in one forward"
    )
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=8192,
        help="padded prompt tokens (rows x longest) per prefill forward",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--allow-local-images", metavar="DIR", default=None, help="serve image files under DIR"
    )
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="encoded image size")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height")
    p.add_argument("--max-body-bytes", type=int, default=64 * 2**20, help="request body size")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: saved dtype)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_cmd_serve)
