"""A small HTTP front for Triton that refuses requests whose declared tensors could not be legitimate.

Triton's HTTP endpoint sizes a JSON input's buffer from its declared shape before it compares the shape with
the model config: ~100 bytes declaring [1, 1, 1000000, 1000000] made tritonserver allocate a terabyte and die.
Triton therefore listens on loopback only, and this front, on the address users reach, checks every
inference request (body size, and each input's shape: whole numbers whose product fits the largest tensor the
models take) before passing the very same bytes on. Everything else (health, metadata, statistics) passes
through unchanged. gRPC goes to Triton directly: its payload must carry every byte its shape declares.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "content-length",
    "host",
}


@dataclass(frozen=True)
class GuardLimits:
    max_request_bytes: int  # the whole HTTP body
    max_elements: int  # the largest tensor any served model takes (max batch x 1 x size x size)


def request_problem(body: bytes, header_length: int | None, limits: GuardLimits) -> str | None:
    """Why an inference request must not reach Triton (None when it may)."""
    head = body if header_length is None else body[:header_length]
    if header_length is not None and not 0 < header_length <= len(body):
        return "Inference-Header-Content-Length does not fit the body"
    try:
        request = json.loads(head)
    except (ValueError, RecursionError):
        return "the request is not valid JSON"
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or not inputs:
        return "the request has no inputs"
    for item in inputs:
        shape = item.get("shape") if isinstance(item, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return "every input needs a shape of whole numbers"
        if math.prod(shape) > limits.max_elements:
            return (
                f"input {str(item.get('name'))[:40]!r} declares shape {shape[:6]}: more elements than any "
                f"model here takes ({limits.max_elements:,})"
            )
    return None


class GuardedFront:
    """``with GuardedFront(host, port, upstream_port, limits):`` serves until the block ends."""

    def __init__(self, host: str, port: int, upstream_port: int, limits: GuardLimits) -> None:
        handler = _handler(upstream_port, limits)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="cxr-http-front", daemon=True)

    def __enter__(self) -> GuardedFront:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(upstream_port: int, limits: GuardLimits) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # Triton logs requests; keep stderr quiet
            pass

        def _refuse(self, code: int, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0 or length > limits.max_request_bytes:
                self.close_connection = True
                return self._refuse(
                    413, f"request body of {length:,} bytes exceeds {limits.max_request_bytes:,}"
                )
            body = self.rfile.read(length) if length else b""
            if self.command == "POST" and INFER_PATH.match(self.path.split("?")[0]):
                header = self.headers.get("Inference-Header-Content-Length")
                problem = request_problem(body, int(header) if header and header.isdigit() else None, limits)
                if problem:
                    return self._refuse(400, problem)
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                reply = upstream.getresponse()
                payload = reply.read()
            except OSError as exc:
                return self._refuse(502, f"Triton did not answer ({exc})")
            finally:
                upstream.close()
            self.send_response(reply.status, reply.reason)
            for key, value in reply.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = _forward

    return Handler
