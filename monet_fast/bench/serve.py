"""`monet-fast bench serve`: `monet-fast serve` under load vs sequential `generate()` calls.

The server runs as a real `monet-fast serve --model tiny` subprocess on a free localhost port;
this process is the client (asyncio + httpx, `concurrency` requests in flight at a time), so the
numbers include HTTP, JSON, tokenization and scheduling. The same prompts (text and image
questions, greedy, `max_tokens` each) are also decoded by `generate()` one request after the
other in this process: the baseline a user without a server would have. Reported per
concurrency 1, 8 and 32: requests/s, output tokens/s, their ratio to the baseline, p50/p99
request latency; each a median over rounds, with the min-max spread of tokens/s.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

from monet_fast.bench.common import BenchReport, matches, no_match

CONCURRENCY = (1, 8, 32)
# On CPU both sides run one torch thread: on a shared 2-core machine two OpenMP threads per
# process make the tiny model's step time swing by 10x (spinning threads preempted).
CPU_THREADS = 1


def _prompts(n: int) -> list[list[dict]]:
    """OpenAI messages: every other one with a small image (data URL)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        content: list[dict] = [{"type": "text", "text": f"What is shown in picture {i}?"}]
        if i % 2 == 0:
            pixels = np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        out.append([{"role": "user", "content": content}])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(max_batch: int, max_tokens: int, device: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "monet_fast.cli", "serve", "--model", "tiny", "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-queue", "64", "--log-level", "warning"]
    cmd += ["--max-new-tokens", str(max_tokens), "--device", device]
    env = dict(os.environ)
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(CPU_THREADS)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


async def _load(url: str, prompts, concurrency: int, max_tokens: int) -> tuple[float, list, int]:
    """(wall seconds, per-request latencies, output tokens) of all prompts, `concurrency` at once."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(client, messages) -> None:
        nonlocal tokens
        async with gate:
            body = {"model": "tiny", "messages": messages, "max_tokens": max_tokens}
            body["temperature"] = 0
            start = time.perf_counter()
            resp = await client.post(url + "/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            resp.raise_for_status()
            tokens += resp.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, m) for m in prompts))
        return time.perf_counter() - start, latencies, tokens


def _sequential(prompts, max_tokens: int, device: str):
    """A function timing `generate()` on each prompt alone, one after the other:
    prompts -> (seconds, output tokens)."""
    import torch

    from monet_fast.decode import generate
    from monet_fast.model.tiny import tiny_model

    # The model `monet-fast serve --model tiny` serves (serve.cli.TINY_SEED / TINY_INIT_RANGE).
    model, processor = tiny_model(seed=0, initializer_range=0.2)
    model = model.to(device)

    def timed(batch) -> tuple[float, int]:
        convs = [_hf_messages(m) for m in batch]
        start = time.perf_counter()
        tokens = 0
        with torch.inference_mode():
            for conv in convs:
                out = generate(model, processor, [conv], max_new_tokens=max_tokens)
                tokens += len(out.sequences[0])
        return time.perf_counter() - start, tokens

    timed(prompts)  # warm-up
    return timed


def _hf_messages(messages: list[dict]) -> list[dict]:
    import base64
    import io

    from PIL import Image

    out = []
    for m in messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "text":
                parts.append({"type": "text", "text": p["text"]})
            else:
                data = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                parts.append(
                    {"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")}
                )
        out.append({"role": m["role"], "content": parts})
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(quick: bool = False, only: str | None = None) -> BenchReport:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)  # before the report records the thread count
    try:
        return _run(quick, only, device)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, only: str | None, device: str) -> BenchReport:
    report = BenchReport(name="serve")
    n_requests, max_tokens, rounds = (16, 16, 2) if quick else (32, 32, 3)
    labels = [f"c={c}" for c in CONCURRENCY]
    selected = [c for c in CONCURRENCY if matches(f"c={c}", only)]
    if not selected:
        return no_match(report, only, labels)
    prompts = _prompts(n_requests)
    proc, url = _start_server(max(CONCURRENCY), max_tokens, device)
    base: list[float] = []
    tps: dict[int, list[float]] = {c: [] for c in selected}
    walls: dict[int, list[float]] = {c: [] for c in selected}
    lats: dict[int, list[float]] = {c: [] for c in selected}
    try:
        asyncio.run(_load(url, prompts[:2], 2, max_tokens))  # warm-up
        baseline = _sequential(prompts[:2], max_tokens, device)  # warm-up, and the model
        # Rounds interleave the baseline and every concurrency, so that load changes on a shared
        # machine hit all of them alike (the idle server thread waits without using CPU).
        for _ in range(rounds):
            seconds, tokens = baseline(prompts)
            base.append(tokens / seconds)
            for c in selected:
                wall, latencies, tokens = asyncio.run(_load(url, prompts, c, max_tokens))
                walls[c].append(wall)
                tps[c].append(tokens / wall)
                lats[c].extend(latencies)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base_tps = statistics.median(base)
    report.add(
        config=f"{n_requests} requests",
        provider="sequential generate()",
        tokens_per_s=base_tps,
        tps_min=min(base),
        tps_max=max(base),
    )
    for c in selected:
        wall = statistics.median(walls[c])
        report.add(
            config=f"c={c}",
            provider="monet-fast serve",
            seconds=wall,
            requests_per_s=n_requests / wall,
            tokens_per_s=statistics.median(tps[c]),
            tps_min=min(tps[c]),
            tps_max=max(tps[c]),
            vs_sequential=statistics.median(tps[c]) / base_tps,
            p50_latency_s=_pct(lats[c], 0.5),
            p99_latency_s=_pct(lats[c], 0.99),
        )
    side = " (1 torch thread each side)" if device == "cpu" else ""
    report.notes = (
        f"{n_requests} chat requests (half with a 56x56 image), greedy, max_tokens={max_tokens}, "
        f"tiny fp32 model on {device}{side}. Server: a `monet-fast serve --max-batch 32` "
        "subprocess (check-every 4; eager on CPU, CUDA graph on GPU); client: asyncio httpx in "
        f"this process. Median of {rounds} interleaved rounds; tps_min/max: spread over rounds; "
        "p50/p99 over all requests of all rounds. vs_sequential = server tokens/s / sequential "
        "generate() tokens/s."
    )
    return report
