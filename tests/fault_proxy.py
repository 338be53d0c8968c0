"""A small threaded HTTP/1.1 proxy on 127.0.0.1 that injects faults in front of the moto server.

Every connection carries exactly one request: the proxy forwards it with ``Connection: close`` and
answers with ``Connection: close``, so "the next N connections" and "the next N requests" are the same
thing and no fault hides in a pooled keep-alive connection.

    with FaultProxy("127.0.0.1", moto_port) as proxy:
        proxy.reset_next(3)          # RST the next 3 connections after reading their request
        proxy.fail_next(3, 503)      # answer the next 3 requests with an S3-style 503
        proxy.drop_responses(1)      # forward the next request, then RST instead of answering
        proxy.cut_responses(1, keep=4096, stall=0.0)  # answer, but hang up after 4 KiB of the body
        proxy.delay_responses(2.0, count=1)  # hold the next response back 2 s
        proxy.skew_clock(3600)       # every response's Date header says the server's clock is 1 h ahead
        proxy.down(); proxy.up()     # refuse connections (listener closed), then listen again
"""
from __future__ import annotations

import email.utils
import logging
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO

logger = logging.getLogger(__name__)

_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 429: "Too Many Requests"}
_CODES = {500: "InternalError", 503: "ServiceUnavailable", 429: "SlowDown"}


@dataclass
class ProxyStats:
    """What the proxy saw and did, for assertions."""

    connections: int = 0
    requests: int = 0
    resets: int = 0
    failures: int = 0
    dropped: int = 0
    cut: int = 0
    delayed: int = 0
    response_bytes: int = 0  # bytes of response bodies relayed (what a client downloaded)
    methods: list[str] = field(default_factory=list)


@dataclass
class _Faults:
    """Pending faults: for each kind, [how many, how many requests to let through first]."""

    counts: dict[str, list[int]] = field(default_factory=lambda: {"reset": [0, 0], "fail": [0, 0],
                                                                  "drop": [0, 0], "cut": [0, 0]})
    fail_status: int = 503
    cut_keep: int = 0
    cut_stall: float = 0.0
    delay: float = 0.0
    delay_count: int | None = 0  # None: every response
    skew: float = 0.0  # seconds added to the Date header of every response


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``target``, injecting the faults it is told to."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = port
        self.stats = ProxyStats()
        self._faults = _Faults()
        self._lock = threading.Condition()
        self._want_up = True
        self._listener: socket.socket | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._listener = self._bind()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def down(self) -> None:
        """Close the listening socket: new connections are refused until `up`."""
        self._set_up(False)

    def up(self) -> None:
        """Listen again on the same port."""
        self._set_up(True)

    def _set_up(self, want: bool) -> None:
        with self._lock:
            self._want_up = want
            ok = self._lock.wait_for(lambda: (self._listener is not None) == want, timeout=5)
        if not ok:
            raise RuntimeError(f"fault proxy did not go {'up' if want else 'down'}")

    # -- fault controls ------------------------------------------------------------------------

    def reset_next(self, n: int, *, after: int = 0) -> None:
        """Read the next ``n`` requests, then reset their connections (RST) without forwarding.

        ``after``: let that many requests through untouched first (same for the other faults).
        """
        with self._lock:
            self._faults.counts["reset"] = [n, after]

    def fail_next(self, n: int, status: int = 503, *, after: int = 0) -> None:
        """Answer the next ``n`` requests with ``status`` and an S3-style XML error body."""
        with self._lock:
            self._faults.counts["fail"] = [n, after]
            self._faults.fail_status = status

    def drop_responses(self, n: int, *, after: int = 0) -> None:
        """Forward the next ``n`` requests (so they take effect), then reset instead of answering."""
        with self._lock:
            self._faults.counts["drop"] = [n, after]

    def cut_responses(self, n: int, *, keep: int = 0, stall: float = 0.0, after: int = 0) -> None:
        """Answer the next ``n`` requests with the response head and the first ``keep`` bytes of the
        body, go silent for ``stall`` seconds, then hang up: a stream that breaks (or stalls) mid-body."""
        with self._lock:
            self._faults.counts["cut"] = [n, after]
            self._faults.cut_keep, self._faults.cut_stall = keep, stall

    def delay_responses(self, seconds: float, count: int | None = None) -> None:
        """Hold back the next ``count`` responses (all of them if None) by ``seconds``."""
        with self._lock:
            self._faults.delay, self._faults.delay_count = seconds, count

    def skew_clock(self, seconds: float) -> None:
        """Make the server's clock look ``seconds`` ahead (negative: behind) of ours: the ``Date`` header
        of every response is rewritten (what a client compares its clock with)."""
        with self._lock:
            self._faults.skew = seconds

    def clear(self) -> None:
        """Stop injecting faults (does not bring a downed proxy up)."""
        with self._lock:
            self._faults = _Faults()

    def _take(self, name: str) -> bool:
        """Whether this request gets fault ``name`` (called once per request and kind)."""
        with self._lock:
            pending = self._faults.counts[name]
            if pending[0] <= 0:
                return False
            if pending[1] > 0:
                pending[1] -= 1
                return False
            pending[0] -= 1
            return True

    def _take_delay(self) -> float:
        with self._lock:
            faults = self._faults
            if faults.delay <= 0 or faults.delay_count == 0:
                return 0.0
            if faults.delay_count is not None:
                faults.delay_count -= 1
            return faults.delay

    # -- serving -------------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        return listener

    def _accept_loop(self) -> None:
        """Own the listener: open/close it as asked, accept, and hand each connection to a thread."""
        while not self._stopping:
            self._apply_state()
            listener = self._listener
            if listener is None:
                time.sleep(0.01)
                continue
            if not select.select([listener], [], [], 0.02)[0]:
                continue
            conn, _ = listener.accept()
            with self._lock:
                self.stats.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _apply_state(self) -> None:
        with self._lock:
            if self._want_up and self._listener is None:
                self._listener = self._bind()
            elif not self._want_up and self._listener is not None:
                self._listener.close()
                self._listener = None
            self._lock.notify_all()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as reader:
                self._serve_one(conn, reader)
        except OSError as err:  # the client gave up (timeout) or we reset it: nothing to do
            logger.debug("fault proxy connection ended: %s", err)

    def _serve_one(self, conn: socket.socket, reader: BinaryIO) -> None:
        request = _read_request(conn, reader)
        if request is None:
            return
        head, body = request
        with self._lock:
            self.stats.requests += 1
            self.stats.methods.append(head.split(b" ", 1)[0].decode())
        if self._take("reset"):
            self._count("resets")
            return _reset(conn)
        if self._take("fail"):
            self._count("failures")
            return conn.sendall(_error_response(self._faults.fail_status, head))
        response = self._forward(head, body)
        if self._take("drop"):
            self._count("dropped")
            return _reset(conn)
        if self._take("cut"):
            self._count("cut")
            head_end = response.index(b"\r\n\r\n") + 4
            conn.sendall(response[:head_end + self._faults.cut_keep])
            time.sleep(self._faults.cut_stall)
            return conn.shutdown(socket.SHUT_RDWR)  # a clean close: the client reads what was sent
        delay = self._take_delay()
        if delay:
            self._count("delayed")
            time.sleep(delay)
        conn.sendall(response)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send one request to the target with ``Connection: close``; return the rewritten response."""
        with socket.create_connection(self.target, timeout=30) as upstream:
            upstream.sendall(_with_header(head, b"Connection", b"close") + body)
            chunks = []
            while piece := upstream.recv(1 << 20):
                chunks.append(piece)
        response = b"".join(chunks)
        resp_head, sep, resp_body = response.partition(b"\r\n\r\n")
        head = _with_header(resp_head + sep, b"Connection", b"close")
        with self._lock:
            skew = self._faults.skew
            self.stats.response_bytes += len(resp_body)
        if skew:
            date = email.utils.formatdate(time.time() + skew, usegmt=True).encode()
            head = _with_header(head, b"Date", date)
        return head + resp_body


def _read_request(conn: socket.socket, reader: BinaryIO) -> tuple[bytes, bytes] | None:
    """Read one request head and body; answer ``Expect: 100-continue`` ourselves."""
    lines = []
    while True:
        line = reader.readline(65536)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    head = b"".join(lines)
    headers = _headers(head)
    if headers.get(b"expect", b"").lower() == b"100-continue":
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = _with_header(head, b"Expect", None)
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return head, _read_chunked(reader)
    return head, reader.read(int(headers.get(b"content-length", b"0")))


def _read_chunked(reader: BinaryIO) -> bytes:
    """The raw bytes of a chunked body, trailers included (forwarded as is)."""
    parts = []
    while True:
        size_line = reader.readline(65536)
        parts.append(size_line)
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        parts.append(reader.read(size + 2))
    while True:
        trailer = reader.readline(65536)
        parts.append(trailer)
        if trailer in (b"\r\n", b"\n", b""):
            return b"".join(parts)


def _headers(head: bytes) -> dict[bytes, bytes]:
    result = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            result[name.strip().lower()] = value.strip()
    return result


def _with_header(head: bytes, name: bytes, value: bytes | None) -> bytes:
    """``head`` (ending in a blank line) with header ``name`` replaced by ``value`` (or removed)."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() != name.lower()]
    if value is not None:
        kept.append(name + b": " + value)
    return b"\r\n".join(kept) + b"\r\n\r\n"


def _error_response(status: int, request_head: bytes) -> bytes:
    code = _CODES.get(status, str(status))
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>fault injected by the test proxy</Message></Error>").encode()
    if request_head.startswith(b"HEAD "):
        body = b""
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


def _reset(conn: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than a clean FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
