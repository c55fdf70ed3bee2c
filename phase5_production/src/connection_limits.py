"""HTTP limits: how long a client may take, how much it may send, how many connections and generations
run at once. What the server's request handler and server class inherit.

    DeadlineRequestHandler     a request's line and headers must arrive within header_timeout of its first
                               byte, its body (Content-Length, at most MAX_BODY_BYTES) within read_timeout;
                               an idle connection waits at most read_timeout; a client that left is noticed
    LimitedConnectionsServer   one thread per connection; idle connections hold no slot and are closed,
                               oldest first, when a new one needs room; at most max_connections requests
                               hold a generation slot; past every limit a connection gets 503 at once

So a silent, stalled or trickling (slow-loris) client cannot hold a thread, and idle or trickling
clients cannot lock out others.
"""

from __future__ import annotations

import io
import json
import queue
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from phase5_production.src.request_parsing import RequestError
from phase5_production.src.text_streaming import ClientGone

MAX_BODY_BYTES = 64 * 1024


class DeadlineReader(io.RawIOBase):
    """Reads from a socket; each read waits at most `idle_timeout`, and none past `deadline`."""

    def __init__(self, sock: socket.socket, idle_timeout: float):
        self.sock, self.idle_timeout = sock, idle_timeout
        self.deadline: float | None = None  # time.monotonic() by which the current request must be in

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout = self.idle_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the request did not arrive within the read timeout")
        self.sock.settimeout(timeout)
        return self.sock.recv_into(buffer)


class DeadlineRequestHandler(BaseHTTPRequestHandler):
    """Reads each request under deadlines (the server's read_timeout and header_timeout)."""

    protocol_version = "HTTP/1.1"  # keep-alive and chunked transfer encoding
    server: LimitedConnectionsServer

    def setup(self):
        self.timeout = self.server.read_timeout  # every read and write on this socket
        super().setup()
        self.rfile.close()  # replaced by a reader that also enforces a deadline for the whole request
        self._reader = DeadlineReader(self.connection, self.server.read_timeout)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
        """Wait (idle, holding no slot) for a request, then read and answer it under deadlines: the
        request line and headers within header_timeout of its first byte, the body within read_timeout
        after the headers. A client that trickles bytes (slow loris) cannot hold its thread longer."""
        if not self._wait_for_request():
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + self.server.header_timeout
        try:
            super().handle_one_request()
        except ClientGone:  # the client left before its answer: nothing to tell, nothing to log
            self.close_connection = True
        finally:
            self.server.release_slot(self)

    def _wait_for_request(self) -> bool:
        """Idle until the first byte of a request (at most read_timeout). An idle connection may be
        closed by the server to make room for a new one. False: closed, silent, or evicted."""
        self.server.mark_idle(self.connection)
        self._reader.deadline = time.monotonic() + self.server.read_timeout
        try:
            if not self.rfile.peek(1):
                return False
        except (TimeoutError, OSError):
            return False
        return self.server.mark_busy(self.connection)

    def parse_request(self) -> bool:
        """The request line and the headers are in (within header_timeout): the body gets read_timeout."""
        if not super().parse_request():
            return False
        self._reader.deadline = time.monotonic() + self.server.read_timeout
        return True

    def _request_arrived(self) -> None:
        """The request is read: no more deadline; writes get the full timeout."""
        self._reader.deadline = None
        self.connection.settimeout(self.server.read_timeout)

    def _client_gone(self) -> bool:
        """True once the client has closed its end: the socket reads as at its end (or was reset).
        Data waiting to be read (a pipelined next request) means the client is still there. A client
        that half-closes its sending side counts as gone: HTTP clients keep it open for the answer."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length header.")
        length = self.headers.get("Content-Length")
        try:
            length = int(length)
        except (TypeError, ValueError):
            self.close_connection = True
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED, "a Content-Length header (a number) is required."
            ) from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body must not be parsed as the next request
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}.",
            )
        chunks, received = [], 0
        try:
            while received < length:  # the reader raises TimeoutError past the request's deadline
                chunk = self.rfile.read1(length - received)
                if not chunk:
                    raise ClientGone
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the body announced {length} bytes but only {received} arrived within "
                f"{self.server.read_timeout} s; send the whole body at once, with a correct Content-Length.",
            ) from None
        self._request_arrived()
        return b"".join(chunks)


class LimitedConnectionsServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` generating at once (see the module docstring)."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients connecting at once is not dropped

    def __init__(
        self,
        address,
        handler_class: type[DeadlineRequestHandler],
        read_timeout: float = 10.0,
        max_connections: int = 32,
        header_timeout: float | None = None,
        max_idle_connections: int | None = None,
    ):
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}.")
        # A real client sends its request line and headers in one packet: a fifth of the body's
        # deadline (2 s by default) is plenty for it and short for an attacker.
        header_timeout = read_timeout / 5 if header_timeout is None else header_timeout
        max_idle_connections = 4 * max_connections if max_idle_connections is None else max_idle_connections
        if not 0 < header_timeout <= read_timeout or max_idle_connections < 1:
            raise ValueError(
                f"header_timeout must be in (0, read_timeout] and max_idle_connections >= 1, got "
                f"{header_timeout} and {max_idle_connections}."
            )
        super().__init__(address, handler_class)
        self.read_timeout, self.header_timeout = read_timeout, header_timeout
        self.max_connections, self.max_idle_connections = max_connections, max_idle_connections
        self.busy_message = (
            f"the server is generating for its limit of {max_connections} requests at once "
            "(--max-connections); retry shortly."
        )
        self._slots = threading.BoundedSemaphore(max_connections)  # requests that generate at once
        self._slot_holders: set = set()  # handlers holding a slot
        self._open: set[socket.socket] = set()  # connections with a thread
        self._idle: dict[socket.socket, None] = {}  # those waiting for a request, oldest first
        self._connections_lock = threading.Lock()
        self._refusals: queue.Queue = queue.Queue(maxsize=64)
        threading.Thread(target=self._refuse_connections, name="refuser", daemon=True).start()

    # Connections and slots. A connection costs a thread; an idle one (no request line yet, or
    # between keep-alive requests) holds no slot and is closed, oldest first, to make room for a new
    # connection. A slot is taken only by a generation request whose headers have arrived, so idle
    # or trickling clients cannot lock out others, and GET /health never needs one.

    def process_request(self, request, client_address):
        """Start a thread for the connection (closing the oldest idle one if there are too many);
        answer 503 and close only when every connection is busy with a request."""
        with self._connections_lock:
            if len(self._open) >= self.max_connections + self.max_idle_connections:
                if not self._idle:
                    self._refuse(request)
                    return
                self._evict(next(iter(self._idle)))
            self._open.add(request)
            self._idle[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request) -> None:
        with self._connections_lock:
            self._open.discard(request)
            self._idle.pop(request, None)

    def _evict(self, sock: socket.socket) -> None:
        """Close an idle connection (lock held): its thread's read ends at once and the thread exits."""
        self._open.discard(sock)
        self._idle.pop(sock, None)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @property
    def open_connections(self) -> int:
        with self._connections_lock:
            return len(self._open)

    @property
    def idle_connections(self) -> int:
        with self._connections_lock:
            return len(self._idle)

    def mark_idle(self, sock: socket.socket) -> None:
        with self._connections_lock:
            if sock in self._open:
                self._idle[sock] = None

    def mark_busy(self, sock: socket.socket) -> bool:
        """A request started on `sock`; False if the connection was evicted meanwhile."""
        with self._connections_lock:
            self._idle.pop(sock, None)
            return sock in self._open

    def take_slot(self, handler) -> bool:
        if not self._slots.acquire(blocking=False):
            return False
        self._slot_holders.add(handler)
        return True

    def release_slot(self, handler) -> None:
        if handler in self._slot_holders:
            self._slot_holders.discard(handler)
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """Hand the connection to the refuser thread (the accept loop must not wait on a client)."""
        try:
            self._refusals.put_nowait(request)
        except queue.Full:  # a flood: no answer at all
            self.shutdown_request(request)

    def _refuse_connections(self) -> None:
        """Answer 503, then read what the client sent until it hangs up (at most 1 s): closing with
        unread data would reset the connection and the client would never see the 503."""
        limit = self.max_connections + self.max_idle_connections
        message = f"the server has its limit of {limit} connections open, all busy; retry shortly."
        data = json.dumps({"error": message, "status": 503}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        while (request := self._refusals.get()) is not None:
            try:
                request.settimeout(1.0)
                request.sendall(head.encode("ascii") + data)
                request.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline and request.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                request.close()

    def server_close(self):
        super().server_close()
        self._refusals.put(None)
