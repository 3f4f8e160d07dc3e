"""The HTTP front of ``cxr-run serve``: the only reader of the bytes users send; Triton sees what it rebuilt.

Triton's HTTP endpoint listens on loopback only. Its JSON reader and ours disagreed (it keeps a repeated key's
first value, Python's json the last; it routes an absolute-form target that a path check let through), and a
request it misread could make it allocate a terabyte and abort. So this front reads every request once,
strictly, with h11 (a small, strict HTTP/1.1 state machine: one Content-Length or chunked framing, no bare CR
or LF, bounded heads), passes on only exact known targets, and for inference builds a fresh request from what
``cxr.runtime.serve_requests`` checked. It stays bounded under load and abuse (``cxr.runtime.serve_bounds``):
a real listen backlog, read deadlines, a connection cap where idle connections give way, and a memory budget
for the bodies being parsed at once. Its own refusals are 4xx/5xx with one JSON line and a counted log line.
gRPC goes to Triton directly: its payload must carry every byte its shape declares.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import NoReturn

import h11
from cxr.runtime.serve_bounds import (
    BUSY,
    HEAD,
    WAITING,
    Budget,
    Connections,
    GuardLimits,
    RefusalLog,
    Slot,
    body_cost,
)
from cxr.runtime.serve_requests import ModelSpec, Refused, Route, bad, read_infer, routes, shown

log = logging.getLogger(__name__)

__all__ = ["GuardLimits", "GuardedFront"]

RAW_LENGTHS = re.compile(rb"(?im)^content-length[ \t]*:([^\r\n]*)")
DIGITS = re.compile(rb"[0-9]{1,15}")
BLANK_LINE = re.compile(rb"\n\r?\n")
LINGER_S, LINGER_BYTES = 2.0, 64 << 20  # after refusing a body unread: let the client finish sending
RECV_BYTES = 1 << 16
COALESCE_BYTES = 1 << 20  # a reply up to this size leaves in one write (no Nagle stall between its pieces)


class _Gone(Exception):
    """The client closed, was evicted, or broke the protocol beyond an answer: end the connection quietly."""


class _Cut(Exception):
    """A refusal outside a request cycle (a head never whole, a stalled or malformed body): answered with a
    canned reply once every reservation is given back, then the connection closes."""

    def __init__(self, refusal: Refused) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class GuardedFront:
    """``with GuardedFront(host, port, upstream_port, models):`` serves until the block ends."""

    def __init__(
        self,
        host: str,
        port: int,
        upstream_port: int,
        models: tuple[ModelSpec, ...],
        limits: GuardLimits | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.limits = limits or GuardLimits.for_models(models)
        self.routes = routes(models)
        self.budget = Budget(self.limits.memory_budget)
        self.connections = Connections(self.limits.max_connections)
        self.refusals = RefusalLog()
        self.listener = socket.create_server((host, port), backlog=self.limits.backlog)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, name="cxr-http-front", daemon=True)

    def __enter__(self) -> GuardedFront:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.listener.close()
        self.connections.close_all()
        log.info(self.refusals.summary())

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not selector.select(0.2):
                    continue
                try:
                    sock, address = self.listener.accept()
                except OSError:  # out of file descriptors, or the client left: breathe, then go on
                    time.sleep(0.05)
                    continue
                self._admit(sock, f"{address[0]}:{address[1]}")

    def _admit(self, sock: socket.socket, peer: str) -> None:
        slot = self.connections.admit(sock, peer)
        if slot is not None:
            try:
                thread = threading.Thread(target=ClientConnection(self, slot).serve, name="cxr-http-client")
                thread.daemon = True
                thread.start()
                return
            except RuntimeError:  # no thread to be had: as busy as at the cap
                self.connections.release(slot)
        message = f"all {self.limits.max_connections} connections are busy; retry shortly"
        self.refusals.refused(503, "connections", peer, message)
        sock.setblocking(False)
        try:
            sock.send(canned(503, message))
        except OSError:
            pass
        sock.close()


def reply_headers(
    status: int, length: int, close: bool, extra: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    headers = [*extra, ("Content-Length", str(length))]
    if status == 503:
        headers.append(("Retry-After", "1"))
    if close:
        headers.append(("Connection", "close"))
    return headers


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def canned(status: int, message: str) -> bytes:
    """A whole refusal for a connection outside a request cycle (no request head read), then closed."""
    body = error_body(message)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json"]
    head += [f"{name}: {value}" for name, value in reply_headers(status, len(body), True, [])]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class ClientConnection:
    """One client connection on its own thread: read a request, answer it; until close, timeout, eviction."""

    def __init__(self, front: GuardedFront, slot: Slot) -> None:
        self.front, self.slot, self.sock = front, slot, slot.sock
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.limits = front.limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        self.upstream = Upstream(front.upstream_port, self.limits)
        self.head = bytearray()  # this request's bytes as they came, until its head is complete

    def serve(self) -> None:
        try:
            while self._one_request():
                pass
        except _Gone:
            pass
        except _Cut as cut:
            self._refused(cut.refusal)
            self._write_canned(cut.refusal)
        except OSError:
            pass  # the client went away while we wrote
        except Exception:  # a fault of the front: this connection ends, the front serves on
            log.warning(f"front: connection from {self.slot.peer} ended by an internal error", exc_info=True)
        finally:
            self.upstream.close()
            self.front.connections.release(self.slot)
            self.sock.close()

    def _refused(self, refusal: Refused) -> None:
        self.front.refusals.refused(refusal.status, refusal.kind, self.slot.peer, refusal.message)

    def _one_request(self) -> bool:
        request = self._read_head()
        if request is None:
            return False
        extra: list[tuple[str, str]] = []
        try:
            reply = self._answer(request, extra)
        except Refused as refusal:
            self._refused(refusal)
            reply = Reply(
                refusal.status, [("Content-Type", "application/json"), *extra], error_body(refusal.message)
            )
        return self._send(reply)

    def _read_head(self) -> h11.Request | None:
        """The next request's head, with the idle deadline before its first byte and the head deadline after.
        None: the client closed between requests, or idled past the keep-alive time."""
        pending = self.h11.trailing_data[0]
        self.head = bytearray(pending)
        phase, deadline = self._phase(HEAD if pending else WAITING)
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._close_with(exc.error_status_hint, "bad HTTP", f"malformed request ({str(exc)[:120]})")
            if isinstance(event, h11.Request):
                return event if self.front.connections.enter(self.slot, BUSY) else None
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is not h11.NEED_DATA:
                raise _Gone
            data = self._recv(deadline, phase)
            if not data:
                raise _Gone  # the client closed (or was evicted) before a whole request
            if phase == WAITING:
                phase, deadline = self._phase(HEAD)
            if len(self.head) <= self.limits.max_head_bytes:
                self.head += data
            self.h11.receive_data(data)

    def _phase(self, phase: str) -> tuple[str, float]:
        if not self.front.connections.enter(self.slot, phase):
            raise _Gone
        timeout = self.limits.idle_timeout_s if phase == WAITING else self.limits.head_timeout_s
        return phase, time.monotonic() + timeout

    def _recv(self, deadline: float, phase: str) -> bytes:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            return self.sock.recv(RECV_BYTES)
        except TimeoutError:
            if phase == WAITING:
                raise _Gone from None  # an idle keep-alive connection: closed without a word, as is usual
            what = "request head" if phase == HEAD else "request body"
            self._close_with(408, "timeout", f"the {what} did not arrive in time")
        except OSError:
            raise _Gone from None

    def _close_with(self, status: int, kind: str, message: str) -> NoReturn:
        raise _Cut(Refused(status, kind, message))

    def _write_canned(self, refusal: Refused) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(canned(refusal.status, refusal.message))
        except OSError:
            pass

    def _answer(self, request: h11.Request, extra: list[tuple[str, str]]) -> Reply:
        head = bytes(self.head[: head_end(self.head)])
        if len(head) > self.limits.max_head_bytes:  # h11 bounds only heads that arrive in pieces
            raise Refused(
                431, "head too large", f"request line and headers exceed {self.limits.max_head_bytes:,} bytes"
            )
        target = request.target.decode("ascii", "replace")
        route = self.front.routes.get(target)
        if route is None:
            raise Refused(404, "unknown target", f"no such path here: {shown(target)}")
        if request.method.decode("ascii", "replace") != route.method:
            extra.append(("Allow", route.method))
            raise Refused(405, "method", f"{shown(request.method.decode('ascii', 'replace'))} on {target}")
        length, header_length = framing(request, head)
        if route.method == "GET":
            if length != 0:
                raise bad("GET with a body", "a GET request carries no body")
            self._read_body(0, None)
            return self.upstream.request("GET", target)
        return self._infer(route, target, length, header_length)

    def _infer(self, route: Route, target: str, length: int | None, header_length: int | None) -> Reply:
        limits = self.limits
        json_length = header_length if header_length is not None else (length or 0)
        if length is not None and length > limits.max_body_bytes:
            raise Refused(413, "too large", f"a body of {length:,} bytes exceeds {limits.max_body_bytes:,}")
        if json_length > limits.max_json_bytes:
            raise Refused(
                413,
                "too large",
                f"a JSON part of {json_length:,} bytes exceeds {limits.max_json_bytes:,}; send the tensors "
                "in binary (Inference-Header-Content-Length)",
            )
        body, reserved = self._read_body(length, header_length)
        try:
            infer = read_infer(body, header_length, route.model)
            header, parts = infer.to_triton()
            del body
            return self.upstream.request("POST", target, header, parts)
        finally:
            self.front.budget.release(reserved)

    def _reserve(self, amount: int, reserved: int) -> int:
        if not self.front.budget.reserve(amount):
            self.front.budget.release(reserved)
            raise Refused(503, "busy", "the server is reading as many request bytes as it may; retry shortly")
        return reserved + amount

    def _read_body(self, length: int | None, header_length: int | None) -> tuple[bytearray, int]:
        """The whole body (Content-Length or chunked) and the budget it reserved; every byte is reserved
        before it is read, and the body must keep coming at ``min_body_rate`` after ``head_timeout_s``."""
        limits = self.limits
        json_length = header_length if header_length is not None else limits.max_body_bytes
        reserved = self._reserve(body_cost(length, json_length), 0) if length else 0
        if self.h11.they_are_waiting_for_100_continue:
            self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        body, started = bytearray(), time.monotonic()
        try:
            while True:
                event = self._next_body_event(
                    started + limits.head_timeout_s + len(body) / limits.min_body_rate
                )
                if isinstance(event, h11.EndOfMessage):
                    return body, reserved
                if length is None:  # chunked: reserve as it comes, within the same caps
                    new = len(body) + len(event.data)
                    if new > limits.max_body_bytes or (header_length is None and new > limits.max_json_bytes):
                        raise Refused(
                            413,
                            "too large",
                            f"a chunked body passed {min(new, limits.max_body_bytes):,} bytes",
                        )
                    cost = body_cost(new, json_length) - body_cost(len(body), json_length)
                    reserved = self._reserve(cost, reserved)
                body += event.data
        except BaseException:
            self.front.budget.release(reserved)
            raise

    def _next_body_event(self, deadline: float) -> h11.Data | h11.EndOfMessage:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._close_with(exc.error_status_hint, "bad HTTP", f"malformed body ({str(exc)[:120]})")
            if isinstance(event, (h11.Data, h11.EndOfMessage)):
                return event
            if event is not h11.NEED_DATA:
                raise _Gone
            data = self._recv(deadline, BUSY)
            if not data:
                raise _Gone  # the client hung up mid-body
            self.h11.receive_data(data)

    def _send(self, reply: Reply) -> bool:
        """Answer; True when the connection may carry another request."""
        close = not self._request_done()
        headers = reply_headers(reply.status, len(reply.body), close, reply.headers)
        response = h11.Response(status_code=reply.status, headers=headers, reason=phrase(reply.status))
        pieces = [
            self.h11.send(event) or b"" for event in (response, h11.Data(data=reply.body), h11.EndOfMessage())
        ]
        for piece in [b"".join(pieces)] if len(reply.body) <= COALESCE_BYTES else pieces:
            self._write(piece)
        if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
            self._linger()
            return False
        self.h11.start_next_cycle()
        return True

    def _request_done(self) -> bool:
        """Whether the client's request is wholly read: a refusal before its body leaves it unread, unless it
        had none (h11 still holds its end)."""
        try:
            while self.h11.their_state is h11.SEND_BODY:
                if not isinstance(self.h11.next_event(), h11.EndOfMessage):
                    return False
        except h11.RemoteProtocolError:
            return False
        return self.h11.their_state is h11.DONE

    def _write(self, data: bytes | None) -> None:
        if data:
            self.sock.settimeout(self.limits.send_timeout_s)
            self.sock.sendall(data)

    def _linger(self) -> None:
        """Close after a refusal that left the body unread: stop writing, then discard what the client still
        sends for a moment, so it reads the answer instead of a reset."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline, drained = time.monotonic() + LINGER_S, 0
            while drained < LINGER_BYTES and time.monotonic() < deadline:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(RECV_BYTES)
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass


def phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def head_end(data: bytes | bytearray) -> int:
    """Where the request head ends (its blank line, as h11 finds it); past the data when it is not there."""
    end = BLANK_LINE.search(data)
    return end.start() if end else len(data) + 1


def framing(request: h11.Request, head: bytes) -> tuple[int | None, int | None]:
    """The body's length (None: chunked) and the binary extension's JSON length (None: all JSON).

    h11 has already refused conflicting lengths and any transfer coding but chunked; stricter here: one
    Content-Length line of digits only, never beside Transfer-Encoding, no content coding. ``head``: the
    request's raw head, where a repeated Content-Length is still visible."""
    raw = RAW_LENGTHS.findall(head)
    values = {name: value for name, value in request.headers}
    if len(raw) > 1 or (raw and not DIGITS.fullmatch(raw[0].strip(b" \t"))):
        raise bad("content-length", "Content-Length must be given once, as digits")
    if (raw or b"content-length" in values) and b"transfer-encoding" in values:
        raise bad("transfer-encoding", "Transfer-Encoding and Content-Length together")
    if values.get(b"content-encoding", b"identity").lower() != b"identity":
        raise Refused(415, "content-encoding", "compressed request bodies are not accepted")
    header_length = None
    if b"inference-header-content-length" in values:
        text = values[b"inference-header-content-length"].strip()
        if sum(
            name == b"inference-header-content-length" for name, _ in request.headers
        ) > 1 or not DIGITS.fullmatch(text):
            raise bad("binary size", "Inference-Header-Content-Length must be given once, as digits")
        header_length = int(text)
    if b"transfer-encoding" in values:
        return None, header_length
    return int(values.get(b"content-length", b"0")), header_length


class Upstream:
    """A kept-alive HTTP/1.1 connection to Triton on loopback, one per client connection."""

    def __init__(self, port: int, limits: GuardLimits) -> None:
        self.port, self.limits = port, limits
        self.connection: http.client.HTTPConnection | None = None

    def request(
        self, method: str, target: str, header: bytes | None = None, parts: list | None = None
    ) -> Reply:
        """Triton's status, content headers and body; a 502 when it does not answer. A kept-alive connection
        Triton closed meanwhile is retried once on a fresh one (nothing was processed on it)."""
        stale = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
        reused = self.connection is not None
        try:
            try:
                return self._exchange(method, target, header, parts or [])
            except stale:
                self.close()
                if not reused:
                    raise
            return self._exchange(method, target, header, parts or [])
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Refused(502, "triton", f"Triton did not answer ({type(exc).__name__})") from None

    def _exchange(self, method: str, target: str, header: bytes | None, parts: list) -> Reply:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(
                "127.0.0.1", self.port, timeout=self.limits.reply_timeout_s
            )
            self.connection.connect()
            self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = self.connection
        connection.putrequest(method, target, skip_accept_encoding=True)
        body = ([header] if header is not None else []) + parts
        if header is not None:
            connection.putheader("Content-Type", "application/octet-stream")
            connection.putheader("Inference-Header-Content-Length", str(len(header)))
            connection.putheader("Content-Length", str(sum(len(p) for p in body)))
        small = sum(len(p) for p in body) <= COALESCE_BYTES
        connection.endheaders(b"".join(body) if small and body else None)
        for part in [] if small else body:
            connection.send(part)
        reply = connection.getresponse()
        if reply.length is not None and reply.length > self.limits.max_reply_bytes:
            raise http.client.HTTPException("reply too large")
        content = reply.read(self.limits.max_reply_bytes + 1)
        if len(content) > self.limits.max_reply_bytes or not reply.isclosed():
            raise http.client.HTTPException("reply too large")
        if reply.will_close:
            self.close()
        headers = [("Content-Type", reply.getheader("Content-Type") or "application/json")]
        binary = reply.getheader("Inference-Header-Content-Length")
        if binary is not None and DIGITS.fullmatch(binary.encode()):
            headers.append(("Inference-Header-Content-Length", binary))
        return Reply(reply.status, headers, content)

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
