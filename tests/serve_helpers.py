"""Start the `monet-fast serve` app on a free localhost port in a thread (serve tests)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager


@contextmanager
def live_server(model_dir: str = "tiny", **options):
    """Yield (base_url, scheduler) of a server of `model_dir` (default: the tiny model) built
    with `build_server(**options)`."""
    import uvicorn

    from monet_fast.serve.cli import build_server, load_model

    model, processor, model_id = load_model(model_dir)
    app, scheduler = build_server(model, processor, model_id, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held by us until uvicorn takes the socket
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        scheduler.shutdown()
        sock.close()


def image_data_url(seed: int = 0, size: int = 56, fmt: str = "PNG") -> str:
    """A small seeded noise image as a `data:image/...;base64,` URL."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
