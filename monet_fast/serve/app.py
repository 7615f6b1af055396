"""The FastAPI app: `POST /v1/chat/completions` (plain and SSE), `GET /v1/models`, `GET /health`.

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`. The optional
API key (`Authorization: Bearer KEY`) is compared with `hmac.compare_digest` (constant time).
A request whose client disconnects is cancelled in the scheduler, which frees its slot.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' annotations
# (fastapi.Request, a local name) at definition time.

import asyncio
import hmac
import json
import random
import time
import uuid
from collections.abc import AsyncIterator

from monet_fast._optional import require
from monet_fast.serve.prepare import ServeLimits, build_job
from monet_fast.serve.scheduler import Job, Result, Scheduler, encode_latents
from monet_fast.serve.schema import ApiError, parse_json, parse_request

# How often a non-streaming handler checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


async def _read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413,
                f"request body over the server's limit of {limit} bytes",
                code="request_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _usage(result: Result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "latent_tokens": result.latent_tokens,
    }


def create_app(
    scheduler: Scheduler,
    model_name: str,
    limits: ServeLimits,
    api_key: str | None = None,
):
    """The ASGI app serving `scheduler` (already started) under the model id `model_name`."""
    fastapi = require("fastapi", "monet-fast serve")
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = fastapi.FastAPI(title="monet-fast serve")
    created = int(time.time())
    vocab = scheduler.model.lm_head.weight.shape[0]
    seeds = random.SystemRandom()  # seeds of sampling requests that bring none

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        body = ApiError(err.status_code, str(err.detail), code=None).body()
        return JSONResponse(body, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, err: Exception):  # a bug, answered in the OpenAI error shape
        body = ApiError(500, f"internal error: {err!r}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def check_key(request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(
                401,
                "invalid or missing API key (send 'Authorization: Bearer KEY')",
                code="invalid_api_key",
                type="authentication_error",
            )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models(request: fastapi.Request):
        check_key(request)
        entry = {"id": model_name, "object": "model", "created": created, "owned_by": "monet_fast"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request):
        check_key(request)
        body = parse_json(await _read_body(request, limits.max_body_bytes))
        req = parse_request(body, vocab)
        if req.model != model_name:
            raise ApiError(
                404,
                f"model {req.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def notify(kind: str, payload: object) -> None:  # called on the decode thread
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = await run_in_threadpool(
            build_job,
            req,
            scheduler.processor,
            limits,
            notify,
            seeds.getrandbits(63),
            scheduler.tokenizer_lock,
        )
        scheduler.submit(job)
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            stream = _sse(job, events, scheduler, ident, model_name, req.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        scheduler.cancel(job)
                        return JSONResponse({}, status_code=499)
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise
        if kind == "error":
            raise payload
        result: Result = payload
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
        }
        if result.latents is not None:
            choice["latents"] = encode_latents(result.latents)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [choice],
            "usage": _usage(result),
        }

    return app


async def _sse(
    job: Job,
    events: asyncio.Queue,
    scheduler: Scheduler,
    ident: str,
    model_name: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE stream of one request; leaving it early (client gone) cancels the job."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
        body = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name,
            "choices": [choice],
        }
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                yield chunk({"content": payload})
                continue
            if kind == "error":
                yield f"data: {json.dumps(payload.body())}\n\n"
                return
            result: Result = payload
            rest = result.text[len(job.sent) :] if result.text.startswith(job.sent) else ""
            extra = {}
            if result.latents is not None:
                extra["latents"] = encode_latents(result.latents)
            yield chunk({"content": rest} if rest else {}, result.finish_reason, **extra)
            if include_usage:
                body = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model_name,
                    "choices": [],
                    "usage": _usage(result),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        if not job.finished:
            scheduler.cancel(job)
