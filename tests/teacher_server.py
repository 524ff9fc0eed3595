"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, standing in for a provider.

The teacher reaches it through litellm over HTTP exactly as it reaches OpenAI. It counts
requests, and can add latency and inject 429/500 responses or hangs (client time-outs), answer
every request with an error no retry fixes (401, 403, 404, 400), send 429s with `Retry-After`,
and report prompt tokens served from a prompt cache as OpenAI does.
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
    error: str | None = None  # answer every request with this ERRORS entry: one no retry fixes
    rate_limited: int = 0  # the first this many requests are answered 429
    retry_after: str | None = None  # sent with those 429s as the Retry-After header (seconds or an HTTP date)


# Errors no retry fixes, as OpenAI answers them (status, error body): litellm maps them to its exceptions.
ERRORS = {
    "key": (401, {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                  "code": "invalid_api_key"}),
    "permission": (403, {"message": "You are not allowed to use this model.", "type": "invalid_request_error"}),
    "model": (404, {"message": "The model does not exist or you do not have access to it.",
                    "type": "invalid_request_error", "code": "model_not_found"}),
    "bad_request": (400, {"message": "Invalid value for 'temperature'.", "type": "invalid_request_error"}),
    "context": (400, {"message": "This model's maximum context length is 128000 tokens. However, your messages "
                      "resulted in 130000 tokens.", "type": "invalid_request_error",
                      "code": "context_length_exceeded"}),
}


@dataclass
class TeacherServer:
    responder: Responder
    faults: Faults = field(default_factory=Faults)
    requests: int = 0  # every HTTP request received
    answered: int = 0  # requests answered 200
    bodies: list = field(default_factory=list)
    api_keys: set = field(default_factory=set)  # the bearer tokens clients sent
    cached_tokens: int = 0  # prompt tokens reported as read from the prompt cache (at most the prompt's)

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
            if self.requests <= self.faults.rate_limited:
                return "429"
        if roll < self.faults.error_rate:
            return "429" if roll < self.faults.error_rate / 2 else "500"
        if roll < self.faults.error_rate + self.faults.hang_rate:
            return "hang"
        return None


def _handler(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real providers do
        # Headers and body go out in two writes: with Nagle's algorithm the body waits for the
        # client's delayed ACK, 40 ms on Linux, which real providers' servers do not add.
        disable_nagle_algorithm = True

        def log_message(self, *args):  # the tests' output stays readable
            return

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            server.api_keys.add(self.headers.get("Authorization", "").removeprefix("Bearer "))
            fault = server._fault()
            time.sleep(server.faults.latency)
            if fault == "hang":
                time.sleep(server.faults.hang_seconds)
            if server.faults.error is not None:
                status, error = ERRORS[server.faults.error]
                return self._send(status, {"error": error})
            if fault in ("429", "500"):
                message = "rate limit exceeded" if fault == "429" else "internal error"
                retry_after = server.faults.retry_after if fault == "429" else None
                headers = {"Retry-After": retry_after} if retry_after else {}
                return self._send(int(fault), {"error": {"message": message, "type": "server_error"}}, headers)
            content = server.responder(body)
            with server._lock:
                server.answered += 1
                server.bodies.append(body)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
            cached = min(server.cached_tokens, prompt_tokens)
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
                        **({"prompt_tokens_details": {"cached_tokens": cached}} if cached else {}),
                    },
                },
            )

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client timed out and left: what a hang is for

    return Handler
