"""A validated `ChatRequest` -> a scheduler `Job`: images, chat template, tokens, budget.

Runs in the HTTP handler's worker thread (image decoding and tokenization stay off the decode
thread). Refusals are 400 `ApiError`s: bad messages or images, a prompt that with `max_tokens`
does not fit the context.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from monet_fast.decode.config import NO_BLOCK_CAP
from monet_fast.decode.inputs import prepare_batch, render_input
from monet_fast.decode.slots import SlotParams
from monet_fast.model.tokens import LATENT_START
from monet_fast.serve.messages import ImageLimits, to_hf_messages
from monet_fast.serve.scheduler import Job
from monet_fast.serve.schema import ApiError, ChatRequest


@dataclass(frozen=True)
class ServeLimits:
    """Server-wide limits: context length (cache columns per slot), default max_tokens, images,
    request body size."""

    max_context: int
    max_new_tokens: int
    images: ImageLimits
    max_body_bytes: int = 64 * 2**20


def build_job(
    req: ChatRequest,
    processor,
    limits: ServeLimits,
    notify: Callable[[str, object], None],
    default_seed: int,
    tokenizer_lock: threading.Lock,
) -> Job:
    """Render, tokenize and size-check `req`; `default_seed` seeds a sampling request without one."""
    conversation = to_hf_messages(req.messages, limits.images)
    # The fast tokenizer is shared with the decode thread and the other requests, and padding
    # settings mutate it: one user at a time.
    with tokenizer_lock:
        return _job(req, processor, limits, notify, default_seed, conversation)


def _job(req, processor, limits, notify, default_seed, conversation) -> Job:
    try:
        text, images = render_input(processor, conversation, 0)
    except (ValueError, FileNotFoundError) as err:
        raise ApiError(400, str(err), param="messages") from None
    force = req.latent.mode == "force"
    try:
        batch = prepare_batch(
            processor, [{"text": text + (LATENT_START if force else ""), "images": images}]
        )
    except ValueError as err:
        raise ApiError(400, str(err), param="messages") from None
    forced = batch.forced_start[0]
    prompt_len = int(batch.input_ids.shape[1])
    room = limits.max_context - prompt_len - int(forced)
    if req.max_tokens is None:
        max_tokens = min(limits.max_new_tokens, room)
        if max_tokens < 1:
            raise ApiError(
                400,
                f"the prompt is {prompt_len} tokens, which leaves no room in the server's "
                f"{limits.max_context}-token context",
                param="messages",
                code="context_length_exceeded",
            )
    else:
        max_tokens = req.max_tokens
        if max_tokens > room:
            raise ApiError(
                400,
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                f"server's {limits.max_context}-token context; at most {max(room, 0)} new tokens "
                "fit",
                param="max_tokens" if room > 0 else "messages",
                code="context_length_exceeded",
            )
    do_sample = req.temperature > 0
    params = SlotParams(
        max_new_tokens=max_tokens,
        do_sample=do_sample,
        temperature=req.temperature if do_sample else 1.0,
        top_p=req.top_p,
        seed=req.seed if req.seed is not None else default_seed,
        latent_size=req.latent.size,
        max_blocks=0 if req.latent.mode == "off" else NO_BLOCK_CAP,
        force_latent=False,  # the trailing START of the prompt forces it (as generate() does)
        logit_bias=req.logit_bias,
    )
    return Job(
        batch=batch,
        params=params,
        stops=req.stop,
        return_latents=req.latent.return_vectors,
        stream=req.stream,
        notify=notify,
        forced=forced,
    )
