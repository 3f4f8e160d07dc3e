"""What keeps the guarded front bounded whatever its clients do: its limits, a memory budget for the request
bodies being read and parsed at once, a capped registry of connections, and a counted log of refusals."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from cxr.runtime.serve_requests import ModelSpec, max_body_bytes, max_json_bytes

log = logging.getLogger(__name__)

# Bytes held per body byte while a request is read and parsed (measured with tracemalloc: a uint8 JSON list
# peaks at 3.9-4.3x its text for json.loads plus the text itself; a binary tensor is its receive buffer and
# the bytes joined from it).
JSON_COST = 6
BINARY_COST = 2
MIN_BUDGET = 256 << 20


@dataclass(frozen=True, kw_only=True)
class GuardLimits:
    """Every bound of the front. ``for_models`` sizes the body limits from the served models."""

    max_body_bytes: int  # the whole HTTP body (413 beyond)
    max_json_bytes: int  # its JSON part: the whole body, or Inference-Header-Content-Length (413 beyond)
    memory_budget: int  # bytes of bodies being read and parsed at once, at their parse cost (503 beyond)
    max_connections: int = 256  # beyond it an idle connection gives way, else a quick 503
    backlog: int = 512  # the listen queue: bursts wait here instead of being reset
    max_head_bytes: int = 16 << 10  # request line and headers (431 beyond)
    head_timeout_s: float = 10.0  # from a request's first byte to the end of its headers (408 beyond)
    idle_timeout_s: float = 30.0  # a kept-alive connection waiting for its next request is closed after
    min_body_rate: int = 1 << 20  # after head_timeout_s of grace a body must keep arriving at this rate
    reply_timeout_s: float = 300.0  # Triton's answer (a long queue on a slow machine)
    send_timeout_s: float = 30.0  # a client that does not read its reply
    max_reply_bytes: int = 256 << 20

    @classmethod
    def for_models(cls, models: tuple[ModelSpec, ...], **overrides: float) -> GuardLimits:
        body, json_part = max_body_bytes(models), max_json_bytes(models)
        budget = max(MIN_BUDGET, JSON_COST * json_part, BINARY_COST * body)
        limits = cls(max_body_bytes=body, max_json_bytes=json_part, memory_budget=budget)
        return dataclasses.replace(limits, **overrides)


def body_cost(length: int, json_length: int) -> int:
    """What a body of ``length`` bytes whose first ``json_length`` bytes are JSON holds while parsed."""
    json_part = min(length, json_length)
    return JSON_COST * json_part + BINARY_COST * (length - json_part)


class Budget:
    """Bytes reserved before a body is read and released once its request is answered. A reservation that
    does not fit fails at once (the caller answers 503): memory stays bounded whatever the concurrency."""

    def __init__(self, total: int) -> None:
        self.total, self.used, self.peak = total, 0, 0
        self._lock = threading.Lock()

    def reserve(self, amount: int) -> bool:
        with self._lock:
            if self.used + amount > self.total:
                return False
            self.used += amount
            self.peak = max(self.peak, self.used)
            return True

    def release(self, amount: int) -> None:
        with self._lock:
            self.used -= amount


WAITING, HEAD, BUSY = "waiting", "head", "busy"  # no byte of a request yet / reading its head / the rest


@dataclass(eq=False)
class Slot:
    """One admitted connection: what it is doing since when, and whether it was closed to make room."""

    sock: socket.socket
    peer: str
    phase: str = WAITING
    since: float = field(default_factory=time.monotonic)
    evicted: bool = False


class Connections:
    """At most ``cap`` connections. At the cap a new one takes the place of the connection that has waited
    longest without a whole request head (idle keep-alive first, then a slow head): idle or half-open
    connections cannot lock others out. When every connection is busy the newcomer is refused."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.active: set[Slot] = set()
        self.evictions = 0
        self._lock = threading.Lock()

    def admit(self, sock: socket.socket, peer: str) -> Slot | None:
        with self._lock:
            if len(self.active) >= self.cap:
                waiting = [s for s in self.active if s.phase != BUSY]
                if not waiting:
                    return None
                victim = min(waiting, key=lambda s: (s.phase != WAITING, s.since))
                victim.evicted = True
                self.active.discard(victim)
                self.evictions += 1
                _shut(victim.sock)
            slot = Slot(sock, peer)
            self.active.add(slot)
            return slot

    def enter(self, slot: Slot, phase: str) -> bool:
        """Move ``slot`` to ``phase``; False when it was evicted meanwhile (its socket is shut)."""
        with self._lock:
            if slot.evicted:
                return False
            slot.phase, slot.since = phase, time.monotonic()
            return True

    def release(self, slot: Slot) -> None:
        with self._lock:
            self.active.discard(slot)

    def close_all(self) -> None:
        with self._lock:
            for slot in self.active:
                _shut(slot.sock)
            self.active.clear()


def _shut(sock: socket.socket) -> None:
    """Wake the connection's thread from its read (it then sees the end of the stream and leaves)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class RefusalLog:
    """Every refusal counted by kind and logged as one line (status, kind, client, reason; never the body).
    A flood is not copied into the log: beyond ``lines`` per ``window_s`` refusals are only counted, and the
    next line says how many were not shown."""

    def __init__(self, lines: int = 50, window_s: float = 10.0) -> None:
        self.counts: Counter[str] = Counter()
        self.lines, self.window_s = lines, window_s
        self._window_start, self._shown, self._hidden = time.monotonic(), 0, 0
        self._lock = threading.Lock()

    def refused(self, status: int, kind: str, peer: str, message: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            now = time.monotonic()
            if now - self._window_start > self.window_s:
                if self._hidden:
                    log.warning(f"front: {self._hidden} more refusals in {self.window_s:.0f} s not logged")
                self._window_start, self._shown, self._hidden = now, 0, 0
            if self._shown >= self.lines:
                self._hidden += 1
                return
            self._shown += 1
        log.warning(f"front: refused {status} ({kind}) from {peer}: {message}")

    def summary(self) -> str:
        total = sum(self.counts.values())
        kinds = ", ".join(f"{kind} {count}" for kind, count in self.counts.most_common())
        return f"front: {total} requests refused" + (f" ({kinds})" if kinds else "")
