"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, standing in for a provider.

The teacher reaches it through litellm over HTTP exactly as it reaches OpenAI. It counts
requests, and can add latency and inject 429/500 responses or hangs (client time-outs), answer
every request with an error no retry fixes (401, 403, 404, 400), send 429s with `Retry-After`,
and report prompt tokens served from a prompt cache as OpenAI does.
It records when each request arrived, and also serves OpenAI's Batch API (`/v1/files`, `/v1/batches`): a batch runs through the same
responder, ends after `batch_polls` retrievals, and ends as `batch_outcomes` says.
"""

import email.parser
import email.policy
import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[dict], str]  # request body -> assistant message content
# request body -> an HTTP error status to answer with (and its message), or None
Refuser = Callable[[dict], int | tuple[int, str] | None]


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
    refuse: Refuser | None = None  # scripted errors for chosen requests (e.g. a provider outage for some)
    requests: int = 0  # every HTTP request received
    answered: int = 0  # requests answered 200
    bodies: list = field(default_factory=list)
    api_keys: set = field(default_factory=set)  # the bearer tokens clients sent
    batch_polls: int = 1  # retrievals of a batch until it ends; its completed count grows with each
    batch_outcomes: list = field(default_factory=list)  # per batch created: completed | expired | failed
    batch_poll_errors: int = 0  # retrievals of a batch answered 500 before any is answered
    batch_creates: int = 0  # POST /v1/batches received
    batches: dict = field(default_factory=dict)  # batch id -> the batch object, as last returned
    files: dict = field(default_factory=dict)  # file id -> content (uploaded inputs, written outputs)
    cached_tokens: int = 0  # prompt tokens reported as read from the prompt cache (at most the prompt's)
    usage: bool = True  # whether answers report their token usage (some OpenAI-compatible servers do not)
    arrivals: list = field(default_factory=list)  # time.monotonic() at each request's arrival

    def __post_init__(self):
        self._lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._httpd = _Listener(("127.0.0.1", 0), _handler(self))
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


class _Listener(ThreadingHTTPServer):
    # socketserver's backlog of 5 resets connections a client opens 32 at a time; providers' do not.
    request_queue_size = 256


def _handler(server: TeacherServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real providers do
        # Headers and body go out in two writes: with Nagle's algorithm the body waits for the
        # client's delayed ACK, 40 ms on Linux, which real providers' servers do not add.
        disable_nagle_algorithm = True

        def log_message(self, *args):  # the tests' output stays readable
            return

        def do_POST(self):
            if not self.path.endswith("/chat/completions"):
                return self._batch_api()
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with server._lock:
                server.arrivals.append(time.monotonic())
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
            refused = server.refuse(body) if server.refuse else None
            if refused is not None:
                status, message = refused if isinstance(refused, tuple) else (refused, f"scripted error {refused}")
                return self._send(status, {"error": {"message": message, "type": "server_error"}})
            content = server.responder(body)
            with server._lock:
                server.answered += 1
                server.bodies.append(body)
            completion = _completion(body, content, server.answered, server.cached_tokens)
            if not server.usage:
                del completion["usage"]
            self._send(200, completion)

        def do_GET(self):
            self._batch_api()

        def _batch_api(self) -> None:
            """OpenAI's files and batches endpoints: upload, content, create, retrieve."""
            server.api_keys.add(self.headers.get("Authorization", "").removeprefix("Bearer "))
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = self.path.removeprefix("/v1/").split("/")
            with server._lock:
                if self.command == "POST" and parts == ["files"]:
                    return self._send(200, _upload(server, self.headers["Content-Type"], data))
                if self.command == "GET" and parts[0] == "files" and parts[-1] == "content":
                    return self._send_bytes(server.files[parts[1]])
                if self.command == "POST" and parts == ["batches"]:
                    return self._send(200, _create_batch(server, json.loads(data)))
                if self.command == "GET" and parts[0] == "batches" and len(parts) == 2:
                    if server.batch_poll_errors:
                        server.batch_poll_errors -= 1
                        return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                    return self._send(200, _poll_batch(server, parts[1]))
            missing = {"message": f"no route {self.command} {self.path}", "type": "invalid_request_error"}
            self._send(404, {"error": missing})

        def _send_bytes(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

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


def _completion(body: dict, content: str, number: int, cached_tokens: int = 0) -> dict:
    """A chat.completion answering `body` with `content`; a token is a word; up to `cached_tokens`
    of the prompt's reported as read from the prompt cache."""
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    cached = min(cached_tokens, prompt_tokens)
    return {
        "id": f"chatcmpl-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(content.split()),
            "total_tokens": prompt_tokens + len(content.split()),
            **({"prompt_tokens_details": {"cached_tokens": cached}} if cached else {}),
        },
    }


def _upload(server: TeacherServer, content_type: str, data: bytes) -> dict:
    """Stores the multipart upload's `file` part; answers with the file object."""
    form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + data
    )
    upload = next(part for part in form.iter_parts() if part.get_param("name", header="content-disposition") == "file")
    file_id = f"file-{len(server.files) + 1}"
    server.files[file_id] = upload.get_payload(decode=True)
    return {"id": file_id, "object": "file", "bytes": len(server.files[file_id]), "created_at": int(time.time()),
            "filename": upload.get_filename(), "purpose": "batch", "status": "processed"}


def _create_batch(server: TeacherServer, body: dict) -> dict:
    server.batch_creates += 1
    total = len(server.files[body["input_file_id"]].splitlines())
    batch_id = f"batch-{server.batch_creates}"
    server.batches[batch_id] = {
        "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
        "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
        "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": int(time.time()),
        "request_counts": {"total": total, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
        "polls": 0,
    }
    return {k: v for k, v in server.batches[batch_id].items() if k != "polls"}


def _poll_batch(server: TeacherServer, batch_id: str) -> dict:
    """The batch after one more retrieval: in progress until `batch_polls`, then ended."""
    batch = server.batches[batch_id]
    if batch["status"] in ("validating", "in_progress"):
        batch["polls"] += 1
        counts = batch["request_counts"]
        if batch["polls"] < server.batch_polls:
            batch["status"] = "in_progress"
            counts["completed"] = counts["total"] * batch["polls"] // server.batch_polls
        else:
            number = int(batch_id.removeprefix("batch-"))
            outcome = server.batch_outcomes[number - 1] if number <= len(server.batch_outcomes) else "completed"
            _end_batch(server, batch, outcome)
    return {k: v for k, v in batch.items() if k != "polls"}


def _end_batch(server: TeacherServer, batch: dict, outcome: str) -> None:
    """Answers the batch's requests (the first half only when it expires) and writes its files."""
    now = int(time.time())
    if outcome == "failed":
        batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [
            {"code": "invalid_request", "message": "scripted failure", "line": 1, "param": None}]})
        return
    lines = [json.loads(line) for line in server.files[batch["input_file_id"]].splitlines()]
    finished = lines if outcome == "completed" else lines[: len(lines) // 2]
    output = [{"id": f"batch_req_{i}", "custom_id": line["custom_id"], "error": None,
               "response": {"status_code": 200, "request_id": f"req_{i}",
                            "body": _completion(line["body"], server.responder(line["body"]), i)}}
              for i, line in enumerate(finished)]
    errors = [{"id": f"batch_req_{len(finished) + i}", "custom_id": line["custom_id"], "response": None,
               "error": {"code": "batch_expired", "message": "not finished within the completion window"}}
              for i, line in enumerate(lines[len(finished):])]
    for name, rows in (("output_file_id", output), ("error_file_id", errors)):
        if rows:
            file_id = f"file-{len(server.files) + 1}"
            server.files[file_id] = "".join(json.dumps(row) + "\n" for row in rows).encode()
            batch[name] = file_id
    batch["request_counts"].update(completed=len(output), failed=len(errors))
    batch.update(status=outcome, **{f"{outcome}_at": now})
