"""`monet-fast serve` limits on a one-slot server: 429 when full, a disconnect frees the slot,
the API key, the default bind address."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import live_server  # noqa: E402

KEY = "s3cret-key"
MESSAGES = [{"role": "user", "content": "Describe the picture."}]


@pytest.fixture(scope="module")
def server():
    with live_server(max_batch=1, max_queue=1, max_new_tokens=8, max_context=4096, api_key=KEY) as (
        url,
        scheduler,
    ):
        yield url, scheduler


def _client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_api_key_required(server):
    url, _ = server
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    resp = httpx.get(url + "/v1/models")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in _client(url).models.list().data] == ["tiny"]


def test_too_many_concurrent_requests_get_429(server):
    url, scheduler = server
    client = _client(url)
    scheduler.pause()  # nothing is admitted: requests pile up in flight
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
            )
        )
        for _ in range(2)  # 1 slot + 1 queued = the limit
    ]
    try:
        for t in threads:
            t.start()
        assert _wait(lambda: scheduler.stats()["queued"] == 2, 10)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
        assert err.value.body["code"] == "too_many_requests"
    finally:
        scheduler.resume()
        for t in threads:
            t.join(30)
    assert len(results) == 2 and all(r.choices[0].message.content for r in results)


def test_disconnect_mid_stream_frees_the_slot(server):
    url, scheduler = server
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 4000,  # about 10 s of decoding if the slot were not freed
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            contents = 0
            for line in lines:
                if line.startswith("data: ") and '"content": "' in line:
                    contents += 1
                if contents >= 3:  # some text arrived: now hang up
                    break
        assert scheduler.stats()["running"] == 1 or contents >= 3
    # The connection is closed: the slot must be freed within a few decode steps.
    assert _wait(lambda: scheduler.stats()["running"] == 0, 3.0), scheduler.stats()
    steps = scheduler.stats()["decode_steps"]
    assert steps < 2000
    # And the next request is served at once.
    start = time.monotonic()
    reply = _client(url).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content and time.monotonic() - start < 5


def test_non_streaming_client_gone_frees_the_slot(server):
    url, scheduler = server
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4000, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=1.0)
    assert _wait(lambda: scheduler.stats()["running"] == 0, 3.0), scheduler.stats()


def test_default_bind_is_localhost():
    from monet_fast.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "tiny"])
    assert args.host == "127.0.0.1" and args.port == 8000


def test_bench_serve_is_registered_and_filters():
    from monet_fast.bench import REGISTRY, run_benchmark

    assert "serve" in REGISTRY
    report = run_benchmark("serve", only="no such case")  # returns before starting a server
    assert not report.rows and "c=8" in (report.skipped or "")


def test_serves_a_checkpoint_directory(tmp_path):
    """`--model DIR`: the saved model, named after its directory, answers as the original."""
    from monet_fast.model.loading import save_pretrained
    from monet_fast.serve.cli import load_model

    model, processor, _ = load_model("tiny")
    save_pretrained(model, processor, tmp_path / "my-monet")
    with live_server(model_dir=str(tmp_path / "my-monet"), max_batch=2) as (url, _):
        client = _client(url, key="unused")
        assert [m.id for m in client.models.list().data] == ["my-monet"]
        got = client.chat.completions.create(
            model="my-monet", messages=MESSAGES, max_tokens=6, temperature=0
        )
    with live_server(max_batch=2) as (url, _):
        ref = _client(url, key="unused").chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, temperature=0
        )
    assert got.choices[0].message.content == ref.choices[0].message.content
