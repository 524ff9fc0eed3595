"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, standing in for a provider.

The teacher reaches it through litellm over HTTP exactly as it reaches OpenAI. It counts
requests and records when each arrived, and can add latency and inject 429/500 responses or
hangs (client time-outs), at random or for the requests a predicate picks.
"""

import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[dict], str]  # request body -> assistant message content


@dataclass
class Faults:
    latency: float = 0.0  # seconds added to every answer
    error_rate: float = 0.0  # share of requests answered 429 or 500 (half each)
    hang_rate: float = 0.0  # share of requests that hang for `hang_seconds` (a client time-out)
    hang_seconds: float = 3.0
    seed: int = 0


@dataclass
class TeacherServer:
    responder: Responder
    faults: Faults = field(default_factory=Faults)
    requests: int = 0  # every HTTP request received
    answered: int = 0  # requests answered 200
    bodies: list = field(default_factory=list)
    api_keys: set = field(default_factory=set)  # the bearer tokens clients sent
    arrivals: list = field(default_factory=list)  # time.monotonic() at each request's arrival
    fail: Callable[[dict], bool] | None = None  # request body -> answer it 500 (every retry too)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "TeacherServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            roll = self._rng.random()
        if roll < self.faults.error_rate:
            return "429" if roll < self.faults.error_rate / 2 else "500"
        if roll < self.faults.error_rate + self.faults.hang_rate:
            return "hang"
        return None


def _handler(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real providers do

        def log_message(self, *args):  # the tests' output stays readable
            return

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with server._lock:
                server.arrivals.append(time.monotonic())
            server.api_keys.add(self.headers.get("Authorization", "").removeprefix("Bearer "))
            fault = server._fault()
            if server.fail is not None and server.fail(body):
                fault = "500"
            time.sleep(server.faults.latency)
            if fault == "hang":
                time.sleep(server.faults.hang_seconds)
            if fault in ("429", "500"):
                message = "rate limit exceeded" if fault == "429" else "internal error"
                return self._send(int(fault), {"error": {"message": message, "type": "server_error"}})
            content = server.responder(body)
            with server._lock:
                server.answered += 1
                server.bodies.append(body)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
            self._send(
                200,
                {
                    "id": f"chatcmpl-{server.answered}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": len(content.split()),
                        "total_tokens": prompt_tokens + len(content.split()),
                    },
                },
            )

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client timed out and left: what a hang is for

    return Handler
