"""The judge client's transport rules (monet_fast/tasks/judge.py) against local stub servers: no
API key over plain http except to loopback, Authorization dropped on cross-host redirects,
bounded retries with jittered exponential backoff and Retry-After, and the key never in an error,
a repr or a log line."""

from __future__ import annotations

import email.utils
import logging
import socket
import time

import pytest
from judge_stub import StubJudge, mc_sample

from monet_fast.tasks.judge import (
    JudgeError,
    OpenAIJudge,
    redact_url,
    retry_after_seconds,
)
from monet_fast.tasks.scoring import score_item

KEY_ENV = "MONET_TEST_JUDGE_KEY"
SECRET = "sk-live-DoNotLeak-0123456789abcdef"


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def _judge(url, **kw):
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("backoff", 0.0)
    judge = OpenAIJudge(url, "m", **kw)
    judge.sleep = lambda s: None  # waits are asserted through backoff_delay, not slept
    return judge


# ------------------------------------------------------------------------------- key over http


@pytest.mark.parametrize(
    "url", ["http://judge.example.com/v1", "http://10.0.0.7:8000/v1", "http://[2001:db8::1]/v1"]
)
def test_key_is_refused_over_plain_http_to_another_host(secret, url):
    with pytest.raises(ValueError, match="refusing to send the judge API key over plain http") as e:
        OpenAIJudge(url, "m", api_key_env=KEY_ENV)
    message = str(e.value)
    assert (
        url.split("/v1")[0] in message and "https://" in message and "api_key_env=None" in message
    )
    # Without a key the same endpoint is fine (nothing secret to leak), and https always is.
    OpenAIJudge(url, "m", api_key_env=None)
    OpenAIJudge(url.replace("http://", "https://"), "m", api_key_env=KEY_ENV)


@pytest.mark.parametrize(
    "url", ["http://localhost:8000/v1", "http://127.0.0.1:9/v1", "http://[::1]:8000/v1"]
)
def test_key_is_allowed_over_plain_http_to_loopback(secret, url):
    OpenAIJudge(url, "m", api_key_env=KEY_ENV)


def test_a_key_that_appears_after_construction_is_still_refused(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    judge = _judge("http://judge.example.com/v1")
    monkeypatch.setenv(KEY_ENV, SECRET)
    with pytest.raises(JudgeError, match="refusing to send") as e:
        judge("Q?", "p", "g")
    assert judge.n_requests == 0 and SECRET not in str(e.value)


# ------------------------------------------------------------------------------- redirects


def test_authorization_is_dropped_on_a_cross_host_redirect(secret):
    # 127.0.0.2 is another host for the client (another origin), still this machine.
    with StubJudge(host="127.0.0.2") as other:
        with StubJudge([("redirect", 307, other.url + "/chat/completions")]) as first:
            assert _judge(first.url)("Q?", "p", "g") is True
    assert first.requests[0]["auth"] == f"Bearer {SECRET}"
    (moved,) = other.requests
    assert moved["auth"] is None  # the key did not follow the redirect
    assert moved["body"]["model"] == "m"  # 307: the same POST, body included


def test_same_origin_redirect_keeps_authorization_and_302_is_not_followed(secret):
    with StubJudge([("redirect", 308, "/v2/chat/completions")]) as stub:
        assert _judge(stub.url)("Q?", "p", "g") is True
    assert [r["path"] for r in stub.requests] == ["/v1/chat/completions", "/v2/chat/completions"]
    assert all(r["auth"] == f"Bearer {SECRET}" for r in stub.requests)
    # 301/302/303 would turn the POST into a GET: an error naming the target, not followed.
    with StubJudge(host="127.0.0.2") as other:
        with StubJudge([("redirect", 302, other.url)]) as stub:
            judge = _judge(stub.url, retries=3)
            with pytest.raises(JudgeError, match="HTTP 302 redirect to 'http://127.0.0.2"):
                judge("Q?", "p", "g")
    assert other.requests == [] and judge.n_requests == 1


# ------------------------------------------------------------------------------- retries


def test_retries_back_off_and_honour_retry_after():
    script = [("status", 503), ("status", 429, {"Retry-After": "7"}), ("reply", "yes")]
    with StubJudge(script) as stub:
        judge = OpenAIJudge(stub.url, "m", api_key_env=None, retries=3, backoff=0.5)
        waits = []
        judge.sleep = waits.append
        assert judge("Q?", "p", "g") is True
    assert judge.n_requests == 3 and len(stub.requests) == 3
    assert 0.25 <= waits[0] <= 0.5  # first retry: d = backoff, equal jitter in [d/2, d]
    assert waits[1] == 7.0  # Retry-After beats the jittered 0.5..1.0
    # Exponential, jittered and capped.
    for n, d in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)):
        drawn = [judge.backoff_delay(n) for _ in range(50)]
        assert all(d / 2 <= w <= d for w in drawn) and len(set(drawn)) > 1
    assert judge.backoff_delay(20) <= judge.max_backoff
    assert judge.backoff_delay(1, retry_after=1e6) == judge.max_backoff


def test_client_errors_are_not_retried_and_attempts_are_bounded():
    for code in (400, 401, 404):
        with StubJudge([("status", code), ("reply", "yes")]) as stub:
            judge = _judge(stub.url, api_key_env=None, retries=3)
            with pytest.raises(JudgeError, match=f"HTTP {code}.*not retried"):
                judge("Q?", "p", "g")
        assert len(stub.requests) == 1
    with StubJudge([("status", 500)] * 5) as stub:
        judge = _judge(stub.url, api_key_env=None, retries=2)
        with pytest.raises(JudgeError, match="gave up after 3 attempts"):
            judge("Q?", "p", "g")
    assert len(stub.requests) == 3


def test_connection_errors_and_time_outs_are_retried():
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = _judge(f"http://127.0.0.1:{port}/v1", api_key_env=None, retries=2, timeout=1.0)
    with pytest.raises(JudgeError, match="gave up after 3 attempts.*URLError"):
        judge("Q?", "p", "g")
    assert judge.n_requests == 3
    with StubJudge([("sleep", 0.5, "no"), ("reply", "yes")]) as stub:
        judge = _judge(stub.url, api_key_env=None, retries=1, timeout=0.2)
        assert judge("Q?", "p", "g") is True and judge.n_requests == 2


def test_retry_after_parses_seconds_and_http_dates():
    now = time.time()
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == (
        pytest.approx(30, abs=1)
    )
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


# ------------------------------------------------------------------------------- secrecy


def test_the_key_never_reaches_errors_reprs_or_logs(secret, caplog):
    """A hostile or verbose server echoes the Authorization header back in its error bodies."""
    echo = f"invalid header Authorization: Bearer {SECRET}"
    caplog.set_level(logging.DEBUG)
    texts = []
    with StubJudge([("status", 500, {}, echo), ("status", 401, {}, echo)]) as stub:
        judge = _judge(stub.url, retries=2)
        texts.append(repr(judge))
        with pytest.raises(JudgeError) as e:
            judge("Q?", "p", "g")
        texts.append(str(e.value))
        # Through the scorer too: it logs the failure with the sample id and keeps going.
        stub.script = [("status", 403, {}, echo)]
        item = score_item("no idea", mc_sample("s-17"), judge)
    assert item.judge == "error" and not item.correct
    assert "invalid header" in texts[1] and "***" in texts[1]  # the excerpt is kept, masked
    assert stub.requests[0]["auth"] == f"Bearer {SECRET}"  # it was sent (to the right host)
    log = caplog.text
    assert "s-17" in log and "HTTP 403" in log
    for text in [*texts, log]:
        assert SECRET not in text


def test_urls_are_redacted_in_messages():
    assert redact_url("https://user:pw@h.example:8443/v1?api_key=abc&x=1") == (
        "https://h.example:8443/v1?api_key=***&x=***"
    )
    judge = OpenAIJudge("https://u:sk-inurl@h.example/v1", "m", api_key_env=None)
    assert "sk-inurl" not in repr(judge)


def test_vlpo_judge_config_refuses_a_key_over_plain_http(secret):
    from monet_fast.train.rewards import build_judge

    with pytest.raises(ValueError, match="reward.judge: refusing to send the judge API key"):
        build_judge("http://judge.example.com/v1", "m", api_key_env=KEY_ENV)
    assert build_judge("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV) is not None
