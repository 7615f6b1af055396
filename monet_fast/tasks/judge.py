"""An LLM judge over any OpenAI-compatible `/chat/completions` endpoint, standard library only.

`OpenAIJudge(question, prediction, gold) -> bool` asks a yes/no answer-equivalence question.
Transport rules, because the judge may hold a paid API key and runs unattended for hours:

* The key is read from an environment variable at request time, never stored on the object,
  and never sent over plain `http://` except to a loopback host (localhost, 127.0.0.0/8, ::1):
  construction (or the request, if the key appears later) fails with an error naming the URL.
* Redirects: only 307/308 (which mean "repeat this POST there") are followed, to http(s) only;
  `Authorization` is dropped whenever the target's scheme, host or port differs from the
  request's. 301/302/303 would turn the POST into a GET, so they are errors naming the target.
* Each attempt has a time-out. Connection errors, time-outs, HTTP 408, 429 and 5xx are retried
  up to `retries` times with exponential backoff and "equal jitter" (a wait in [d/2, d],
  d = backoff * 2**n, capped at `max_backoff`); a `Retry-After` header (seconds or HTTP date) is
  honoured up to the same cap. Any other 4xx fails at once.
* Error messages and the repr never contain the key: they are built from the status, a short
  excerpt of the response body and the URL (user info and query string redacted), and the key is
  masked out of all of them.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import logging
import os
import random
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

logger = logging.getLogger(__name__)

JUDGE_PROMPT = (
    "You are grading an answer to a visual question. Decide whether the model's final answer "
    "means the same as the reference answer; ignore the reasoning, formatting and letter-vs-text "
    "differences.\n\nQuestion:\n{question}\n\nReference answer: {gold}\n\nModel response:\n"
    "{prediction}\n\nReply with exactly one word: yes or no."
)
_YES = {"yes", "correct", "true", "1", "right"}
_NO = {"no", "incorrect", "false", "0", "wrong"}
_FOLLOWED_REDIRECTS = (307, 308)
_MASK = "***"


class JudgeError(RuntimeError):
    """The judge gave no usable verdict (after retries, or a non-retryable HTTP error)."""


def is_loopback(host: str | None) -> bool:
    """Whether `host` names this machine: "localhost" (or a subdomain of it) or a loopback IP."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """`url` without user info and with query values replaced, for messages and reprs."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    query = "&".join(
        f"{k}={_MASK}" for k, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def check_key_transport(url: str) -> None:
    """Raise ValueError if an API key must not be sent to `url` (plain http to another host)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(
            f"refusing to send the judge API key over plain http to {redact_url(url)!r}: "
            "use an https:// base_url, a localhost endpoint, or send no key "
            "(api_key_env=None / unset the variable)"
        )


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP date), None if absent
    or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow 307/308 with the same method and body; drop Authorization across origins."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib API)
        if code not in _FOLLOWED_REDIRECTS:
            return None  # urllib then raises HTTPError(code), reported with its Location
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            return None
        kept = {k: v for k, v in req.header_items() if k.lower() != "host"}
        if _origin(newurl) != _origin(req.full_url):
            kept = {k: v for k, v in kept.items() if k.lower() != "authorization"}
            logger.debug("judge redirect to another origin: Authorization dropped")
        return urllib.request.Request(
            newurl,
            data=req.data,
            headers=kept,
            method=req.get_method(),
            origin_req_host=req.origin_req_host,
            unverifiable=True,
        )


_OPENER = urllib.request.build_opener(_RedirectHandler)


def _retryable(code: int) -> bool:
    return code in (408, 429) or 500 <= code <= 599


class OpenAIJudge:
    """Yes/no answer-equivalence judge over an OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: e.g. "https://api.example.com/v1" or "http://localhost:8000/v1" (the request
            goes to base_url + "/chat/completions").
        model: the served model name.
        api_key_env: environment variable holding the API key; sent as a Bearer token when set.
            None sends no header. A key is refused over plain http to a non-loopback host.
        timeout: seconds per attempt.
        retries: extra attempts after a time-out, connection error, HTTP 408, 429 or 5xx.
        backoff: base wait in seconds before the first retry, doubled each time (with jitter).
        max_backoff: cap on any single wait, Retry-After included.
        temperature, max_tokens: sampling of the verdict.
        prompt: template with {question}, {gold} and {prediction}.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float = 0.0,
        max_tokens: int = 8,
        prompt: str = JUDGE_PROMPT,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {redact_url(base_url)!r}"
            )
        if timeout <= 0 or retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(
                "need timeout > 0, retries >= 0, backoff >= 0, max_backoff >= 0; got "
                f"{timeout}, {retries}, {backoff}, {max_backoff}"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        if self._key() is not None:
            check_key_transport(self.url)  # fail at set-up, not hours into a run
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.n_requests = 0  # attempts made, for the report
        self.sleep: Callable[[float], None] = time.sleep  # replaceable in tests
        self._rng = random.Random()

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(url={redact_url(self.url)!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, retries={self.retries})"
        )

    def _key(self) -> str | None:
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def __call__(self, question: str, prediction: str, gold: str) -> bool:
        """True if the judge says the prediction matches `gold`; raises JudgeError otherwise."""
        content = self.prompt.format(question=question, gold=gold, prediction=prediction)
        reply = self._complete(content)
        word = (
            reply.strip().split(maxsplit=1)[0].strip(string.punctuation).lower()
            if reply.strip()
            else ""
        )
        if word in _YES:
            return True
        if word in _NO:
            return False
        raise JudgeError(f"judge reply is neither yes nor no: {reply[:80]!r}")

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Wait before retry `attempt` (1-based): equal jitter in [d/2, d], d = backoff·2^(n-1),
        raised to Retry-After when the server sent one; never above max_backoff."""
        d = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        wait = d / 2 + self._rng.uniform(0, d / 2)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_backoff)

    def _complete(self, content: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        key = self._key()
        try:
            return self._attempts(body, key)
        except JudgeError as err:
            # One place masks every message: the key must never reach a log or a traceback.
            raise JudgeError(_masked(str(err), key)) from None

    def _attempts(self, body: bytes, key: str | None) -> str:
        url = redact_url(self.url)
        headers = {"Content-Type": "application/json"}
        if key:
            try:
                check_key_transport(self.url)
            except ValueError as err:
                raise JudgeError(str(err)) from None
            headers["Authorization"] = f"Bearer {key}"
        last_error = "no attempt made"
        retry_after = None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self.backoff_delay(attempt, retry_after)
                logger.info(
                    "judge %s: %s; retry %d/%d in %.2fs",
                    url,
                    _masked(last_error, key),
                    attempt,
                    self.retries,
                    wait,
                )
                self.sleep(wait)
            self.n_requests += 1
            retry_after = None
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code} {err.reason}{_excerpt(err)}"
                response_headers = err.headers or {}
                if 300 <= err.code < 400:
                    location = response_headers.get("Location") or ""
                    target = redact_url(urllib.parse.urljoin(self.url, location))
                    raise JudgeError(
                        f"{url}: HTTP {err.code} redirect to {target!r} (only 307/308 are "
                        "followed; set base_url to the final address)"
                    ) from None
                if not _retryable(err.code):
                    raise JudgeError(f"{url}: {last_error} (not retried)") from None
                retry_after = retry_after_seconds(response_headers.get("Retry-After"))
                continue
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                http.client.HTTPException,
            ) as err:
                # socket time-outs surface as TimeoutError or URLError(reason=timeout); a reply
                # cut mid-way as http.client.IncompleteRead / RemoteDisconnected.
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise JudgeError(f"{url}: response is not JSON ({err})") from None
            try:
                return str(payload["choices"][0]["message"]["content"])
            except (KeyError, IndexError, TypeError):
                raise JudgeError(
                    f"{url}: no choices[0].message.content in {str(payload)[:120]}"
                ) from None
        raise JudgeError(f"{url}: gave up after {self.retries + 1} attempts ({last_error})")


def _excerpt(err: urllib.error.HTTPError, limit: int = 200) -> str:
    """A short excerpt of an error response body (OpenAI-style APIs explain 4xx there)."""
    try:
        text = err.read(limit).decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 (a broken error body must not hide the status)
        return ""
    return f": {' '.join(text.split())[:limit]}" if text else ""


def _masked(text: str, key: str | None) -> str:
    return text.replace(key, _MASK) if key else text


__all__ = [
    "JUDGE_PROMPT",
    "JudgeError",
    "OpenAIJudge",
    "check_key_transport",
    "is_loopback",
    "redact_url",
    "retry_after_seconds",
]
