"""A scripted local OpenAI-compatible `/chat/completions` server for the judge tests (no network).

Each POST takes the next action of the script (default: reply "yes") and is recorded with its
path, body and Authorization header. Actions:
  ("reply", text)                        200 with choices[0].message.content = text
  ("status", code[, headers[, body]])    an error status, optional headers and body text
  ("redirect", code, location)           a redirect (Location may be relative)
  ("sleep", seconds, text)               reply after a delay (client time-outs)
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from monet_fast.data.types import Sample, Segment


def mc_sample(sample_id: str = "q0", answer: str = "B") -> Sample:
    """A 4-option multiple-choice sample (gold B = blue) the judge can be asked about."""
    return Sample(
        question=[Segment("text", "What colour is the cup?")],
        reasoning=[],
        answer=answer,
        sample_id=sample_id,
        choices=["red", "blue", "green", "yellow"],
    )


class StubJudge:
    def __init__(self, script=(), host: str = "127.0.0.1"):
        self.script = list(script)
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server API)
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                stub.requests.append(
                    {
                        "path": self.path,
                        "body": json.loads(raw) if raw else None,
                        "auth": self.headers.get("Authorization"),
                        "host": self.headers.get("Host"),
                    }
                )
                action = stub.script.pop(0) if stub.script else ("reply", "yes")
                if action[0] == "status":
                    headers = action[2] if len(action) > 2 else {}
                    body = (action[3] if len(action) > 3 else "").encode()
                    self._send(action[1], body, headers)
                    return
                if action[0] == "redirect":
                    self._send(action[1], b"", {"Location": action[2]})
                    return
                if action[0] == "sleep":
                    time.sleep(action[1])
                reply = {"choices": [{"message": {"role": "assistant", "content": action[-1]}}]}
                self._send(200, json.dumps(reply).encode(), {"Content-Type": "application/json"})

            def _send(self, code, body, headers):
                try:
                    self.send_response(code)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://{host}:{self.server.server_address[1]}"
        self.url = self.origin + "/v1"
        # A short poll interval: shutdown() waits up to one interval (0.5 s by default).
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
