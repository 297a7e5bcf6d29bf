"""The asyncio shell of tunnel mode: local TCP sockets around the stream multiplexer.

:class:`TunnelService` owns one :class:`~gateway.tunnel.mux.Multiplexer`, a listening server per
``listen`` tunnel and the connections it dials for ``connect`` tunnels. Payloads from the peer
come in through :meth:`TunnelService.on_payload` (called by the runtime's kind router, in
order, never awaited); payloads for the peer go out in order through ``send_nowait``
(``PeerLink.send_nowait``) at once while the link can take them, and through the ``send``
coroutine from one sender task when they must wait (the link's write buffer is full, or the
record budget is used up until the rekey), so the link's read path never waits on a socket.

Sockets are :class:`asyncio.BufferedProtocol` objects: the kernel copies stream bytes straight
into a per-stream buffer that already holds the DATA header, so a chunk of up to one record
(61435 bytes) costs one ``recv`` and one copy into the payload. Back-pressure:

- a stream's socket is read only while the peer has granted it credit (TS11), while the stream
  has less than :data:`STREAM_QUEUE_MAX` bytes waiting for the link (so the one FIFO towards the
  link interleaves the streams: fair), and while the whole queue is below
  :data:`SEND_QUEUE_HIGH_WATER` (a safety bound for very many streams);
- a local socket whose write buffer is above :data:`WRITE_HIGH_WATER` pauses the grants for
  its stream (TS12), so the peer's gateway stops reading the other end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.config import TunnelSection, split_address
from gateway.errors import GatewayError, LocalProtocolError, PeerUnavailable
from gateway.metrics import TunnelReport, TunnelSample
from gateway.tunnel import messages as m
from gateway.tunnel import mux as x

log = logging.getLogger("qgw.tunnel")

#: A local socket's write buffer above this pauses the stream's grants (TS12); below the low
#: mark they resume. With the 1 MiB window this bounds a stream at about 1.25 MiB in the gateway.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
#: DATA bytes one stream may have waiting for the peer link before its socket is paused: two
#: records. Each stream thus holds at most two places in the FIFO towards the link, which
#: makes the streams take turns (a global-only limit starved the streams that epoll lists last).
STREAM_QUEUE_MAX = 2 * (m.HEADER + m.MAX_DATA)
#: Payloads waiting for the peer link above this pause reading every local socket (only
#: reached with more than ~130 busy streams; below it the per-stream limit keeps the order fair).
SEND_QUEUE_HIGH_WATER = 16 << 20
SEND_QUEUE_LOW_WATER = 8 << 20
#: REFUSED answers waiting for the peer link above this are dropped and counted: a peer that
#: floods OPENs without reading our answers cannot grow the queue (TS9).
MAX_QUEUED_REFUSALS = 1024
CONNECT_TIMEOUT_SECONDS = 10.0
STOP_FLUSH_SECONDS = 1.0
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class _Stream(asyncio.BufferedProtocol):
    """One local TCP connection of one stream (a client of ``listen``, or our ``connect``)."""

    def __init__(self, svc: TunnelService, name: str) -> None:
        self.svc = svc
        self.name = name
        self.sid = -1
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(m.HEADER + m.MAX_DATA)
        self.view = memoryview(self.buf)
        self.reading = True
        self.queued = 0  # DATA bytes of this stream waiting for the peer link
        self.eof = False  # local end of file seen (FIN to send)
        self.gone = False

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.set_reading(False)  # nothing is read before the stream is open and has credit
        self.svc._local_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        n = min(self.svc.mux.credit(self.sid), m.MAX_DATA)
        return self.view[m.HEADER : m.HEADER + max(n, 1)]

    def buffer_updated(self, nbytes: int) -> None:
        self.svc._local_data(self, nbytes)

    def eof_received(self) -> bool:
        self.eof = True
        self.svc._local_eof(self)
        return True  # keep the write side open: TCP half-close (TS10)

    def connection_lost(self, exc: Exception | None) -> None:
        self.svc._local_lost(self)

    def pause_writing(self) -> None:
        self.svc.mux.writer_paused(self.sid)

    def resume_writing(self) -> None:
        self.svc.mux.writer_resumed(self.sid)
        self.svc._flush()

    # -- helpers --

    def bind(self, sid: int) -> None:
        self.sid = sid
        self.buf[: m.HEADER] = m.data_header(sid)

    def set_reading(self, on: bool) -> None:
        t = self.transport
        if t is None or on == self.reading or t.is_closing():
            return
        self.reading = on
        if on:
            t.resume_reading()
        else:
            t.pause_reading()

    def buffered(self) -> int:
        t = self.transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def abort(self) -> None:
        """Close with a TCP RST, so the local application sees a failure, never a clean EOF."""
        self.gone = True
        t = self.transport
        if t is not None:
            sock = t.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            t.abort()


class TunnelService:
    """Every tunnel of one gateway: listeners, connectors, the multiplexer and its sender."""

    def __init__(
        self,
        tunnels: Sequence[TunnelSection],
        *,
        initiator: bool,
        send: Callable[[bytes, object | None], Awaitable[None]],
        send_nowait: Callable[[bytes, object | None], None],
        can_send_now: Callable[[], bool],
        is_up: Callable[[], bool],
        window: int = x.DEFAULT_WINDOW,
        max_streams: int = x.DEFAULT_MAX_STREAMS,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        self.tunnels = list(tunnels)
        self._listen = [t for t in self.tunnels if t.listen is not None]
        self._connect = {
            t.name: split_address(t.connect) for t in self.tunnels if t.connect is not None
        }
        self.mux = x.Multiplexer(
            initiator=initiator,
            connect_names=self._connect,
            listen_names=[t.name for t in self._listen],
            window=window,
            max_streams=max_streams,
        )
        self._send = send
        self._send_nowait = send_nowait
        self._can_send_now = can_send_now
        self._sender_busy = False  # the sender task holds the queue (waiting for the link)
        self._queued_refusals = 0
        self.refusals_dropped = 0
        self._is_up = is_up
        self._connect_timeout = connect_timeout
        self._streams: dict[int, _Stream] = {}
        self._servers: dict[str, asyncio.Server] = {}
        self._queue: collections.deque[tuple[int, bytes, _Stream | None]] = collections.deque()
        self.send_queue_bytes = 0
        self._generation = 0  # bumped on link loss: queued payloads of older streams are dropped
        self._queue_paused = False
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.send_failures = 0

    # --- lifecycle ---

    async def start(self) -> None:
        """Open the ``listen`` servers and start the sender (raises OSError if a bind fails)."""
        loop = asyncio.get_running_loop()
        self._sender = asyncio.ensure_future(self._send_loop())
        for t in self._listen:
            assert t.listen is not None
            host, port = split_address(t.listen)
            name = t.name
            server = await loop.create_server(
                functools.partial(_Stream, self, name),
                host,
                port,
                reuse_address=True,
            )
            self._servers[name] = server
            log.info("tunnel %s: accepting local clients on %s:%d", name, host, self.port(name))

    def port(self, name: str) -> int:
        """The bound port of a ``listen`` tunnel (useful with port 0)."""
        sockets = self._servers[name].sockets
        return int(sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close the listeners, reset every stream (going away) and send what can be sent."""
        self._stopping = True
        for server in self._servers.values():
            server.close()
        for sid in list(self.mux.streams):
            self.mux.reset(sid, m.ResetReason.GOING_AWAY)
        for st in list(self._streams.values()):
            st.abort()
        self._streams.clear()
        self._flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), STOP_FLUSH_SECONDS)
        for t in list(self._tasks):
            t.cancel()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        for server in self._servers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _drained(self) -> None:
        while self._queue:
            await asyncio.sleep(0.01)

    # --- from the peer (via the runtime's kind router) ---

    def on_payload(self, payload: bytes, via: object = None) -> None:
        """One tunnel payload from the peer (kinds 0x10-0x1F)."""
        self.mux.receive(payload)
        self._flush()

    def link_down(self) -> None:
        """The qgw connection is gone: every stream is reset (TS14)."""
        self._generation += 1
        self._queue.clear()
        self.send_queue_bytes = 0
        self._queued_refusals = 0
        self.mux.link_down()
        self._flush()

    # --- status ---

    def buffered_bytes(self) -> dict[str, int]:
        """Bytes held for local sockets (their write buffers), per tunnel name."""
        out = dict.fromkeys((t.name for t in self.tunnels), 0)
        for st in self._streams.values():
            out[st.name] = out.get(st.name, 0) + st.buffered()
        return out

    def active_streams(self) -> dict[str, int]:
        out = dict.fromkeys((t.name for t in self.tunnels), 0)
        for s in self.mux.streams.values():
            out[s.name] = out.get(s.name, 0) + 1
        return out

    # --- local sockets ---

    def _local_connected(self, st: _Stream) -> None:
        if st.sid >= 0:  # a connection we dialled: bound by _dial
            return
        # A local client of a `listen` tunnel.
        if self._stopping or not self._is_up():
            self.mux.count_local_refusal(st.name, "link_down")
            log.debug("tunnel %s: local client refused, the peer link is down", st.name)
            st.abort()
            return
        try:
            sid = self.mux.open(st.name)
        except LocalProtocolError:
            self.mux.count_local_refusal(st.name, "too_many_streams")
            st.abort()
            return
        st.bind(sid)
        self._streams[sid] = st
        self._flush()

    def _local_data(self, st: _Stream, nbytes: int) -> None:
        if st.gone or nbytes <= 0:
            return
        try:
            left = self.mux.send_payload(st.sid, bytes(st.view[: m.HEADER + nbytes]))
            if left == 0:
                st.set_reading(False)  # the peer's window is used up: back-pressure (TS11)
        except LocalProtocolError:
            # Read beyond the credit (cannot happen while reading is paused at zero credit)
            # or the stream is gone: this stream cannot go on.
            self.mux.reset(st.sid, m.ResetReason.INTERNAL_ERROR)
            st.abort()
            self._streams.pop(st.sid, None)
        self._flush()
        if st.queued >= STREAM_QUEUE_MAX:
            st.set_reading(False)  # its turn again once the link took its queued records

    def _local_eof(self, st: _Stream) -> None:
        s = self.mux.streams.get(st.sid)
        if s is not None and s.state is x.StreamState.OPEN:
            self.mux.send_fin(st.sid)
            self._flush()
        # Not open yet: the FIN goes out when OPEN_OK arrives (see _apply Opened).

    def _local_lost(self, st: _Stream) -> None:
        st.gone = True
        if self._streams.get(st.sid) is st:
            del self._streams[st.sid]
            self.mux.reset(st.sid, m.ResetReason.ABORTED)  # no-op if the stream finished
            self._flush()

    def _update_reading(self, st: _Stream) -> None:
        st.set_reading(
            not st.gone
            and not st.eof
            and not self._queue_paused
            and st.queued < STREAM_QUEUE_MAX
            and self.mux.credit(st.sid) > 0
        )

    # --- events from the multiplexer, payloads to the peer ---

    def _flush(self) -> None:
        mux = self.mux
        while (ev := mux.next_event()) is not None:
            self._apply(ev)
        out = mux.payloads_to_send()
        if out:
            gen = self._generation
            for p in out:
                st = None
                kind = p[0]
                if kind == m.Kind.DATA:  # count it against its stream (fair turns)
                    st = self._streams.get(int.from_bytes(p[1 : m.HEADER]))
                    if st is not None:
                        st.queued += len(p)
                elif kind == m.Kind.REFUSED:
                    if self._queued_refusals >= MAX_QUEUED_REFUSALS:
                        self.refusals_dropped += 1  # an OPEN flood the peer does not read
                        continue
                    self._queued_refusals += 1
                self._queue.append((gen, p, st))
                self.send_queue_bytes += len(p)
            if self.send_queue_bytes > SEND_QUEUE_HIGH_WATER and not self._queue_paused:
                self._queue_paused = True
                for st in self._streams.values():
                    st.set_reading(False)
            self._pump()

    def _pump(self) -> None:
        """Hand queued payloads to the link now, while it can take them without waiting (no
        task, no await per record); what must wait (write buffer full, record budget used up
        until the rekey) goes to the sender task, which keeps the order."""
        q = self._queue
        if not self._sender_busy:
            send_nowait, can_send_now = self._send_nowait, self._can_send_now
            while q and can_send_now():
                gen, payload, st = q.popleft()
                self._taken(payload, st)
                if gen != self._generation:
                    continue  # belongs to streams of a lost connection
                try:
                    send_nowait(payload, None)
                except GatewayError as exc:
                    self._send_failed(exc)
            self._resume_queue()
        if q:
            self._wake.set()

    def _send_failed(self, exc: GatewayError) -> None:
        """Count a payload the link did not take. PeerUnavailable needs no log line: the link
        is going down, and its on_down resets the streams (TS14)."""
        self.send_failures += 1
        if not isinstance(exc, PeerUnavailable):
            log.warning("tunnel payload not sent: %s", exc)

    def _taken(self, payload: bytes, st: _Stream | None) -> None:
        """``payload`` left the queue (sent, or dropped as stale)."""
        self.send_queue_bytes -= len(payload)
        if payload[0] == m.Kind.REFUSED:
            self._queued_refusals -= 1
        if st is not None:
            st.queued -= len(payload)
            if not st.reading and st.queued < STREAM_QUEUE_MAX:
                self._update_reading(st)

    def _resume_queue(self) -> None:
        if self._queue_paused and self.send_queue_bytes < SEND_QUEUE_LOW_WATER:
            self._queue_paused = False
            for st in list(self._streams.values()):
                self._update_reading(st)

    def _apply(self, ev: x.Event) -> None:
        if isinstance(ev, x.Received):
            st = self._streams.get(ev.sid)
            if st is not None and st.transport is not None and not st.transport.is_closing():
                st.transport.write(ev.data)
            return
        if isinstance(ev, x.CreditAvailable):
            if (st := self._streams.get(ev.sid)) is not None:
                self._update_reading(st)
        elif isinstance(ev, x.OpenRequested):
            self._spawn(self._dial(ev.sid, ev.name))
        elif isinstance(ev, x.Opened):
            if (st := self._streams.get(ev.sid)) is not None:
                if st.eof:
                    self.mux.send_fin(ev.sid)
                self._update_reading(st)
        elif isinstance(ev, x.OpenRefused):
            if (st := self._streams.pop(ev.sid, None)) is not None:
                log.info("tunnel %s: the peer refused the stream (reason %d)", st.name, ev.reason)
                st.abort()
        elif isinstance(ev, x.EndOfStream):
            st = self._streams.get(ev.sid)
            if st is not None and st.transport is not None and st.transport.can_write_eof():
                with contextlib.suppress(OSError):
                    st.transport.write_eof()
        elif isinstance(ev, x.Finished):
            if (st := self._streams.pop(ev.sid, None)) is not None:
                st.gone = True
                if st.transport is not None:
                    st.transport.close()  # after the write buffer drains
        elif isinstance(ev, x.StreamReset) and (st := self._streams.pop(ev.sid, None)) is not None:
            st.abort()

    async def _dial(self, sid: int, name: str) -> None:
        """Connect to the local destination of ``connect`` tunnel ``name`` for the peer's OPEN."""
        host, port = self._connect[name]
        loop = asyncio.get_running_loop()
        st = _Stream(self, name)
        st.bind(sid)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: st, host, port), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            log.info(
                "tunnel %s: connect to %s:%d failed (%s)", name, host, port, type(exc).__name__
            )
            s = self.mux.streams.get(sid)
            if s is not None and s.state is x.StreamState.EXPECT_CONNECT:
                self.mux.refuse(sid, m.RefuseReason.CONNECT_FAILED)
            self._flush()
            return
        s = self.mux.streams.get(sid)
        if s is None or s.state is not x.StreamState.EXPECT_CONNECT or self._stopping:
            st.abort()  # the opener reset the stream, or the link went, while we connected
            return
        self._streams[sid] = st
        self.mux.accept(sid)
        self._update_reading(st)
        self._flush()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_loop(self) -> None:
        """The one task that hands tunnel payloads to the peer link, in order."""
        q = self._queue
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._sender_busy = True
            try:
                while q:
                    if self._can_send_now():
                        break  # the link has room again: the direct path goes on
                    gen, payload, st = q.popleft()
                    self._taken(payload, st)
                    if gen != self._generation:
                        continue  # belongs to streams of a lost connection
                    try:
                        await self._send(payload, None)  # waits for the write buffer or rekey
                    except GatewayError as exc:
                        self._send_failed(exc)
                    self._resume_queue()
            finally:
                self._sender_busy = False
            self._pump()

    def status(self) -> list[dict[str, Any]]:
        """One entry per configured tunnel, for ``qgw status`` (``/status``)."""
        active = self.active_streams()
        out: list[dict[str, Any]] = []
        for t in self.tunnels:
            c = self.mux.counters.get(t.name, x.TunnelCounters())
            out.append(
                {
                    "name": t.name,
                    "end": "listen" if t.listen is not None else "connect",
                    "address": t.listen if t.listen is not None else t.connect,
                    "streams_active": active.get(t.name, 0),
                    "streams_opened": c.streams_opened,
                    "bytes_sent": c.bytes_sent,
                    "bytes_received": c.bytes_received,
                    "window_stalls": c.window_stalls,
                    "refusals": sum(c.refusals.values()),
                    "resets": sum(c.resets.values()),
                }
            )
        return out

    def report(self) -> TunnelReport:
        """What the metrics (and status lines) show, read at scrape time."""
        buffered, active = self.buffered_bytes(), self.active_streams()
        return TunnelReport(
            tunnels={
                name: TunnelSample(
                    streams_opened=c.streams_opened,
                    streams_closed=c.streams_closed,
                    streams_active=active.get(name, 0),
                    bytes_sent=c.bytes_sent,
                    bytes_received=c.bytes_received,
                    window_stalls=c.window_stalls,
                    refusals=dict(c.refusals),
                    resets=dict(c.resets),
                    buffered_bytes=buffered.get(name, 0),
                )
                for name, c in self.mux.counters.items()
            },
            send_queue_bytes=self.send_queue_bytes,
            errors={
                "decode": self.mux.decode_errors,
                "protocol": self.mux.protocol_errors,
                "stale": self.mux.stale_messages,
                "send": self.send_failures,
                "refusals_dropped": self.refusals_dropped,
            },
        )
