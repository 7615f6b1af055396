"""The request body of `POST /v1/chat/completions`: validation into a typed `ChatRequest`.

Validated by hand (not by a pydantic model) so every refusal is an OpenAI-style error body that
names the field, the value and what is allowed. Unknown fields are errors; OpenAI fields this
server does not implement are accepted only at their no-op value (e.g. `n: 1`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


LATENT_MODES = ("auto", "off", "force")
MAX_STOPS = 4
_KNOWN = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "latent",
    "logit_bias",
    "user",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
}
# Accepted only at these values (the OpenAI defaults): anything else is not implemented.
_NOOP = {
    "n": (1,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
}


@dataclass(frozen=True)
class LatentOptions:
    """The `latent` extension field: mode, K (None: the model's) and whether to return vectors."""

    mode: str = "auto"
    size: int | None = None
    return_vectors: bool = False


@dataclass
class ChatRequest:
    """A validated chat completion request (messages still in OpenAI form)."""

    model: str
    messages: list[dict]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    latent: LatentOptions = field(default_factory=LatentOptions)
    logit_bias: tuple[tuple[int, float], ...] = ()


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise _bad(f"'{name}' must be in [{lo}, {hi}], got {value!r}", name)
    return float(value)


def _int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _bad(f"'{name}' must be an integer >= {lo}, got {value!r}", name)
    return value


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 naming the problem."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(f"request body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {type(body).__name__}", None)
    return body


def _latent(value: Any, vocab_k_max: int) -> LatentOptions:
    if value is None:
        return LatentOptions()
    if not isinstance(value, dict):
        raise _bad(f"'latent' must be an object, got {value!r}", "latent")
    unknown = sorted(set(value) - {"mode", "size", "return"})
    if unknown:
        raise _bad(f"unknown field(s) {unknown} in 'latent'; allowed: mode, size, return", "latent")
    mode = value.get("mode", "auto")
    if mode not in LATENT_MODES:
        raise _bad(
            f"'latent.mode' must be one of {list(LATENT_MODES)}, got {mode!r}", "latent.mode"
        )
    size = value.get("size")
    if size is not None:
        size = _int(size, "latent.size", 1)
        if size > vocab_k_max:
            raise _bad(f"'latent.size' must be <= {vocab_k_max}, got {size}", "latent.size")
    ret = value.get("return", False)
    if not isinstance(ret, bool):
        raise _bad(f"'latent.return' must be true or false, got {ret!r}", "latent.return")
    return LatentOptions(mode=mode, size=size, return_vectors=ret)


def parse_request(body: dict, vocab_size: int, max_latent_size: int = 256) -> ChatRequest:
    """Validate a chat completion body (model name and messages are checked by the caller)."""
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; allowed: {sorted(_KNOWN)}", unknown[0])
    for name, allowed in _NOOP.items():
        if name in body and body[name] is not None and body[name] not in allowed:
            raise _bad(
                f"'{name}' = {body[name]!r} is not supported by this server (only {allowed[0]!r})",
                name,
            )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad(f"'model' must be a non-empty string, got {model!r}", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of messages", "messages")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _int(max_tokens, "max_tokens", 1)
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0.0:
        raise _bad("'top_p' must be > 0, got 0", "top_p")

    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise _bad(f"'stop' takes 1 to {MAX_STOPS} non-empty strings, got {stop!r}", "stop")

    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise _bad(f"'seed' must be an integer in [0, 2**63), got {seed!r}", "seed")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad(
            f"'stream_options' must be {{'include_usage': bool}}, got {options!r}",
            "stream_options",
        )

    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise _bad(f"'logit_bias' must be an object, got {bias!r}", "logit_bias")
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise _bad(
                f"'logit_bias' key {key!r} is not a token id in [0, {vocab_size})", "logit_bias"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 100:
            raise _bad(
                f"'logit_bias' value for {key!r} must be a number in [-100, 100], got {value!r}",
                "logit_bias",
            )
        pairs.append((token, float(value)))

    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stops,
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        latent=_latent(body.get("latent"), max_latent_size),
        logit_bias=tuple(pairs),
    )
