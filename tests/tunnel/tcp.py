"""Small blocking TCP servers and clients for the tunnel tests (threads; every wait has a timeout)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

IO_TIMEOUT_SECONDS = 30.0


def blob(n: int, seed: int) -> bytes:
    """``n`` pseudo-random bytes (deterministic per seed) that compress badly."""
    out = bytearray()
    h = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h * 64
    return bytes(out[:n])


def recv_all(sock: socket.socket, limit: int | None = None) -> bytes:
    """Read until EOF (or ``limit`` bytes)."""
    buf = bytearray()
    while limit is None or len(buf) < limit:
        chunk = sock.recv(1 << 16 if limit is None else min(1 << 16, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


@dataclass
class Server:
    """A loopback TCP server running ``handler(conn)`` per connection in a thread."""

    handler: Callable[[socket.socket], None]
    sock: socket.socket = field(init=False)
    port: int = field(init=False)
    accepted: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _conns: list[socket.socket] = field(default_factory=list)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.sock.getsockname()[1]
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.settimeout(IO_TIMEOUT_SECONDS)
            self._conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        for t in self._threads:
            t.join(5)


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close our side."""
    while chunk := conn.recv(1 << 16):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_SECONDS)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` (a writer thread), half-close, and read everything back until EOF."""
    with connect(port) as s:

        def write() -> None:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)

        w = threading.Thread(target=write, daemon=True)
        w.start()
        got = recv_all(s)
        w.join(IO_TIMEOUT_SECONDS)
        return got


def send_and_read(port: int, data: bytes) -> bytes:
    """Connect, send ``data`` and read until EOF (raises what the socket raises)."""
    with connect(port) as s:
        s.sendall(data)
        return recv_all(s)


def keep_talking(s: socket.socket, rounds: int = 1000) -> None:
    """Send and read back (echo) until the socket fails; a clean EOF is an error."""
    for _ in range(rounds):
        s.sendall(b"x" * 65536)
        if not s.recv(65536):
            raise AssertionError("a clean end of file, not a reset")
    raise AssertionError(f"no reset within {rounds} rounds")
