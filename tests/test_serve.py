"""`monet-fast serve` through the official `openai` client against a live uvicorn server.

One tiny-model server for the module (16 slots, so 32 concurrent requests reuse slots); the
server with 1 slot (429, disconnect, API key) is in test_serve_limits.py.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import image_data_url, live_server  # noqa: E402

MAX_CONTEXT = 256
MAX_IMAGE_BYTES = 20_000
MAX_BODY_BYTES = 2**20
START = "<abs_vis_token>"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "red.png")
    with live_server(
        max_batch=16,
        max_queue=16,
        max_new_tokens=16,
        max_context=MAX_CONTEXT,
        check_every=2,
        allow_local_images=str(root),
        max_image_bytes=MAX_IMAGE_BYTES,
        max_image_pixels=300 * 300,
        max_body_bytes=MAX_BODY_BYTES,
    ) as (url, scheduler):
        yield url, scheduler, root


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _messages(i: int, image: bool = True) -> list[dict]:
    content = [{"type": "text", "text": f"What is in picture number {i}?"}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(seed=i)}})
    return [{"role": "user", "content": content}]


def _chat(client, messages, **kw):
    kw.setdefault("max_tokens", 10)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 16


def test_plain_and_streamed_chat_with_image(client):
    plain = _chat(client, _messages(0))
    choice = plain.choices[0]
    assert choice.finish_reason == "length" and choice.message.content
    assert plain.usage.completion_tokens == 10 and plain.usage.prompt_tokens > 20
    assert plain.usage.model_extra["latent_tokens"] == 0

    stream = _chat(client, _messages(0), stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # streamed in several deltas
    assert "".join(pieces) == choice.message.content
    assert finish == "length" and usage.completion_tokens == 10


def test_served_alone_equals_generate(client):
    """The server decodes what `generate()` decodes for the same prompt (greedy)."""
    from monet_fast.decode import collapse_latent_spans, generate
    from monet_fast.serve.cli import load_model
    from monet_fast.serve.messages import ImageLimits, to_hf_messages

    model, processor, _ = load_model("tiny")
    conv = to_hf_messages(_messages(3), ImageLimits())
    ref = generate(model, processor, [conv], max_new_tokens=12)
    got = _chat(client, _messages(3), max_tokens=12).choices[0].message.content
    assert got == collapse_latent_spans(ref.texts[0])


def test_32_concurrent_greedy_equal_served_alone(server, client):
    n = 32
    messages = [_messages(i, image=i % 2 == 0) for i in range(n)]
    alone = [_chat(client, m).choices[0].message.content for m in messages]
    steps_before = server[1].stats()["decode_steps"]
    with ThreadPoolExecutor(n) as pool:
        together = list(pool.map(lambda m: _chat(client, m).choices[0].message.content, messages))
    assert together == alone
    assert len(set(alone)) > n // 2  # distinct prompts, distinct answers
    # Batched: far fewer decode steps than 32 requests x 10 tokens one after the other.
    assert server[1].stats()["decode_steps"] - steps_before < n * 10 // 4


def test_seeded_sampling_independent_of_batch(client):
    kw = dict(temperature=1.3, top_p=0.9, seed=1234, max_tokens=12)
    alone = _chat(client, _messages(5), **kw).choices[0].message.content
    others = [dict(temperature=1.0, seed=s, max_tokens=14) for s in range(7)]
    with ThreadPoolExecutor(8) as pool:
        noise = [pool.submit(_chat, client, _messages(10 + j), **o) for j, o in enumerate(others)]
        mine = pool.submit(_chat, client, _messages(5), **kw)
        together = mine.result().choices[0].message.content
        [f.result() for f in noise]
    assert together == alone
    other_seed = _chat(client, _messages(5), **dict(kw, seed=99)).choices[0].message.content
    assert other_seed != alone  # the seed matters


def test_latent_force_off_and_return(client, server):
    from monet_fast.model.tiny import tiny_processor

    start_id = tiny_processor().tokenizer.convert_tokens_to_ids(START)
    forced = _chat(
        client, _messages(1), extra_body={"latent": {"mode": "force", "size": 3, "return": True}}
    )
    text = forced.choices[0].message.content
    assert text.startswith(START + "<latent></abs_vis_token>")
    assert forced.usage.model_extra["latent_tokens"] == 3
    (block,) = forced.choices[0].model_extra["latents"]
    assert block["shape"] == [3, 64] and block["dtype"] == "float16"
    assert len(base64.b64decode(block["data"])) == 3 * 64 * 2

    # A logit bias makes the model open blocks; "off" must still never emit one.
    bias = {"logit_bias": {str(start_id): 30}, "max_tokens": 14}
    auto = _chat(client, _messages(2), **bias)
    assert START in auto.choices[0].message.content
    assert auto.usage.model_extra["latent_tokens"] > 0
    for i in range(4):
        off = _chat(client, _messages(i), extra_body={"latent": {"mode": "off"}}, **bias)
        assert START not in off.choices[0].message.content
        assert off.usage.model_extra["latent_tokens"] == 0


def test_stop_string_cuts_the_answer(client):
    full = _chat(client, _messages(4), max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = _chat(client, _messages(4), max_tokens=12, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


def test_local_image_inside_allowed_dir(client, server):
    root = server[2]
    ok = _chat(
        client,
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": str(root / "red.png")}}],
            }
        ],
    )
    assert ok.choices[0].message.content


def _big_png() -> str:
    url = image_data_url(seed=1, size=120)
    assert len(url) * 3 // 4 > MAX_IMAGE_BYTES
    return url


BAD = {
    "invalid json": (b"{not json", 400, "invalid_json"),
    "unknown model": ({"model": "gpt-4"}, 404, "model_not_found"),
    "bad base64": ({"image": "data:image/png;base64,@@@notbase64"}, 400, "invalid_base64"),
    "not an image": ({"image": "data:image/png;base64,aGVsbG8="}, 400, "invalid_image"),
    "image too large": ({"image": "BIG"}, 400, "image_too_large"),
    "too many pixels": ({"image": "WIDE"}, 400, "image_too_large"),
    "remote url": ({"image": "https://example.com/a.png"}, 400, "remote_images_disabled"),
    "path outside root": ({"image": "/etc/hostname"}, 400, "local_image_outside_root"),
    "prompt over context": ({"text": "word " * 400}, 400, "context_length_exceeded"),
    "body too large": ({"text": "x" * MAX_BODY_BYTES}, 413, "request_too_large"),
    "max_tokens over context": ({"max_tokens": MAX_CONTEXT}, 400, "context_length_exceeded"),
    "bad latent mode": ({"latent": {"mode": "sometimes"}}, 400, None),
    "unknown field": ({"best_of": 2}, 400, None),
    "n > 1": ({"n": 2}, 400, None),
    "temperature out of range": ({"temperature": 5}, 400, None),
    "empty messages": ({"messages": []}, 400, None),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_openai_error(server, case):
    spec, status, code = BAD[case]
    if isinstance(spec, bytes):
        raw = spec
    else:
        body = {"model": "tiny", "max_tokens": 4, "messages": _messages(0, image=False)}
        spec = dict(spec)
        if "image" in spec:
            url = spec.pop("image")
            url = {"BIG": _big_png(), "WIDE": image_data_url(size=310, fmt="JPEG")}.get(url, url)
            body["messages"] = [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
            ]
        if "text" in spec:
            body["messages"] = [{"role": "user", "content": spec.pop("text")}]
        body.update(spec)
        raw = json.dumps(body).encode()
    resp = httpx.post(server[0] + "/v1/chat/completions", content=raw, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    # The server keeps serving.
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=_messages(0), max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        _chat(client, _messages(0), extra_body={"latent": {"mode": "force", "size": 0}})
    assert "latent.size" in str(err.value)
