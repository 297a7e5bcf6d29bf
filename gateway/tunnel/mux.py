"""The tunnel stream multiplexer: a sans-I/O state machine (docs/protocol.md "Tunnel streams").

No sockets, no clock, no asyncio: payloads from the peer go in with :meth:`Multiplexer.receive`,
what the local side does goes in with the verbs below (``open``, ``accept``, ``refuse``,
``send_data``, ``send_fin``, ``reset``, ``writer_paused`` / ``writer_resumed``), and out come
events (:meth:`next_event`) and payloads for the peer (:meth:`payloads_to_send`).

Per stream (labels TS8-TS13 of the protocol section)::

    opener:   open() --OPEN--> EXPECT_OPEN_OK --OPEN_OK--> OPEN      --REFUSED--> gone
    acceptor: OPEN --> OpenRequested --> EXPECT_CONNECT --accept()--> OPEN
                                                        --refuse()--> gone
    OPEN: DATA / WINDOW / FIN both ways; gone after FIN both ways (Finished) or RESET either way

Flow control (TS11, TS12): each side grants the other a receive window in OPEN / OPEN_OK and
more with WINDOW. A sender never has more than its credit in flight; a receiver that gets more
resets the stream (protocol error). The receiver re-grants the bytes it handed to the local
writer, but only while that writer is not paused (its buffer is below the high-water mark):
a slow local reader stops the grants and so stops the peer, and the gateway holds at most
``window`` bytes plus the writer's high-water mark per stream.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from gateway.errors import DecodeError, LocalProtocolError
from gateway.tunnel import messages as m

#: Receive window granted per stream (TS11). 1 MiB keeps a loopback or LAN stream busy; the
#: memory bound per stream is this plus the socket writer's high-water mark.
DEFAULT_WINDOW = 1 << 20
#: Streams at once per gateway (both directions); more are refused with reason 3 (TS9).
DEFAULT_MAX_STREAMS = 1024
#: Unknown tunnel names are counted under this label (peer-chosen names never become labels).
UNKNOWN_NAME = "-unknown-"


class StreamState(Enum):
    EXPECT_OPEN_OK = "expect_open_ok"  # we sent OPEN
    EXPECT_CONNECT = "expect_connect"  # the peer sent OPEN; our local connect is under way
    OPEN = "open"


@dataclass(slots=True)
class Stream:
    sid: int
    name: str
    state: StreamState
    local_opened: bool
    send_credit: int = 0  # bytes we may still send (granted by the peer)
    recv_credit: int = 0  # bytes the peer may still send (granted by us)
    ungranted: int = 0  # bytes received and handed to the writer, not yet granted again
    writer_paused: bool = False
    fin_sent: bool = False
    fin_received: bool = False


# --- events (instructions to the socket adapter) ---


@dataclass(frozen=True, slots=True)
class OpenRequested:
    """The peer opened a stream to our ``connect`` tunnel ``name``: connect, then accept/refuse."""

    sid: int
    name: str


@dataclass(frozen=True, slots=True)
class Opened:
    """Our OPEN was accepted: the stream may carry data (resume reading the local socket)."""

    sid: int


@dataclass(frozen=True, slots=True)
class OpenRefused:
    """Our OPEN was refused (a RefuseReason value): close the local socket."""

    sid: int
    reason: int


@dataclass(frozen=True, slots=True)
class Received:
    """Stream bytes for the local socket."""

    sid: int
    data: bytes | memoryview = field(repr=False)  # tunnelled bytes are never printed


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer sent FIN: shut down the local socket's write side."""

    sid: int


@dataclass(frozen=True, slots=True)
class CreditAvailable:
    """The peer granted window to a stream that had none: resume reading its socket."""

    sid: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone abnormally (peer RESET, protocol error, link down): abort the socket.
    ``by_peer`` is False when this side decided it (then a RESET was sent, if possible)."""

    sid: int
    reason: int
    by_peer: bool


@dataclass(frozen=True, slots=True)
class Finished:
    """FIN went both ways: the stream is gone; close the local socket once its buffer drains."""

    sid: int


Event = (
    OpenRequested | Opened | OpenRefused | Received | EndOfStream | CreditAvailable | StreamReset
) | Finished


@dataclass
class TunnelCounters:
    """Cumulative counters of one tunnel name (copied into Prometheus by the runtime)."""

    streams_opened: int = 0  # streams that reached OPEN
    streams_closed: int = 0  # streams gone (finished, refused or reset)
    bytes_sent: int = 0  # stream bytes sent to the peer
    bytes_received: int = 0  # stream bytes received from the peer
    window_stalls: int = 0  # times a stream's send credit reached 0 (the peer stopped us)
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    resets: collections.Counter[str] = field(default_factory=collections.Counter)


REFUSE_LABELS = {
    m.RefuseReason.UNKNOWN_TUNNEL: "unknown_tunnel",
    m.RefuseReason.CONNECT_FAILED: "connect_failed",
    m.RefuseReason.TOO_MANY_STREAMS: "too_many_streams",
    m.RefuseReason.GOING_AWAY: "going_away",
}
RESET_LABELS = {
    m.ResetReason.ABORTED: "aborted",
    m.ResetReason.PROTOCOL_ERROR: "protocol_error",
    m.ResetReason.GOING_AWAY: "going_away",
    m.ResetReason.INTERNAL_ERROR: "internal_error",
}


class Multiplexer:
    """All tunnel streams of one gateway over one qgw session.

    ``initiator``: this gateway is the qgw session initiator (its stream ids are even, TS8).
    ``connect_names``: the tunnel names this gateway dials for the peer (its ``connect``
    entries); an OPEN for any other name is refused with reason 1.
    ``listen_names``: names this gateway opens streams for (used only to label counters).
    """

    def __init__(
        self,
        *,
        initiator: bool,
        connect_names: Iterable[str] = (),
        listen_names: Iterable[str] = (),
        window: int = DEFAULT_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if not 1 <= window <= m.MAX_WINDOW:
            raise ValueError("window must be 1 .. 2^31-1")
        self.initiator = initiator
        self.connect_names = frozenset(connect_names)
        self.window = window
        self.max_streams = max_streams
        self.streams: dict[int, Stream] = {}
        self._next_sid = 0 if initiator else 1
        self._out: list[bytes] = []
        self._events: collections.deque[Event] = collections.deque()
        self._grant_at = max(1, window // 4)  # re-grant in batches of a quarter window
        self.counters: dict[str, TunnelCounters] = {
            n: TunnelCounters() for n in (*self.connect_names, *listen_names)
        }
        self.decode_errors = 0
        self.protocol_errors = 0
        self.stale_messages = 0  # messages for streams that are already gone (races with RESET)

    # --- output ---

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def payloads_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def has_output(self) -> bool:
        return bool(self._out)

    def _counter(self, name: str) -> TunnelCounters:
        c = self.counters.get(name)
        if c is None:
            c = self.counters.setdefault(UNKNOWN_NAME, TunnelCounters())
        return c

    # --- local verbs ---

    def open(self, name: str) -> int:
        """Open a stream to the peer's tunnel ``name``; returns its id (TS1, TS8)."""
        if m.NAME_RE.fullmatch(name) is None:
            raise LocalProtocolError("malformed tunnel name")
        if len(self.streams) >= self.max_streams:
            raise LocalProtocolError("too many streams")
        sid = self._next_sid
        if sid > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids of this session are used up")
        self._next_sid += 2
        self.streams[sid] = Stream(
            sid, name, StreamState.EXPECT_OPEN_OK, True, recv_credit=self.window
        )
        self._out.append(m.encode_open(sid, self.window, name))
        return sid

    def accept(self, sid: int) -> None:
        """Our local connect for the peer's OPEN succeeded (TS2)."""
        s = self._expect(sid, StreamState.EXPECT_CONNECT)
        s.state = StreamState.OPEN
        s.recv_credit = self.window
        self._counter(s.name).streams_opened += 1
        self._out.append(m.encode_open_ok(sid, self.window))

    def refuse(self, sid: int, reason: int = m.RefuseReason.CONNECT_FAILED) -> None:
        """Our local connect for the peer's OPEN failed (TS3)."""
        s = self._expect(sid, StreamState.EXPECT_CONNECT)
        self._gone(s)
        self._counter(s.name).refusals[_label(REFUSE_LABELS, reason)] += 1
        self._out.append(m.encode_refused(sid, reason))

    def credit(self, sid: int) -> int:
        """Bytes this stream may send now (0 for a stream that is not open or is gone)."""
        s = self.streams.get(sid)
        if s is None or s.state is not StreamState.OPEN or s.fin_sent:
            return 0
        return s.send_credit

    def send_data(self, sid: int, data: bytes) -> int:
        """Send stream bytes (at most :meth:`credit`, at most MAX_DATA); returns the credit left."""
        return self.send_payload(sid, m.encode_data(sid, data))

    def send_payload(self, sid: int, payload: bytes) -> int:
        """Like :meth:`send_data` for a DATA payload the caller built (header from
        :func:`messages.data_header` followed by the bytes): saves one copy per chunk."""
        n = len(payload) - m.HEADER
        s = self.streams.get(sid)
        if s is None or s.state is not StreamState.OPEN or s.fin_sent:
            raise LocalProtocolError("stream cannot send")
        if not 1 <= n <= min(s.send_credit, m.MAX_DATA):
            raise LocalProtocolError("DATA over the stream's credit or the record size")
        s.send_credit -= n
        c = self._counter(s.name)
        c.bytes_sent += n
        if s.send_credit == 0:
            c.window_stalls += 1
        self._out.append(payload)
        return s.send_credit

    def send_fin(self, sid: int) -> None:
        """The local socket reached end of file (TS5)."""
        s = self.streams.get(sid)
        if s is None or s.fin_sent:
            return
        if s.state is not StreamState.OPEN:
            raise LocalProtocolError("FIN before the stream is open")
        s.fin_sent = True
        self._out.append(m.encode_fin(sid))
        if s.fin_received:
            self._finish(s)

    def reset(self, sid: int, reason: int = m.ResetReason.ABORTED) -> None:
        """Abort a stream from this side (TS6); a no-op for a stream that is gone."""
        s = self.streams.get(sid)
        if s is None:
            return
        if s.state is StreamState.EXPECT_CONNECT:
            self.refuse(sid, m.RefuseReason.GOING_AWAY)
            return
        self._gone(s)
        self._counter(s.name).resets[_label(RESET_LABELS, reason)] += 1
        self._out.append(m.encode_reset(sid, reason))

    def writer_paused(self, sid: int) -> None:
        """The local socket's write buffer went above its high-water mark: stop granting."""
        s = self.streams.get(sid)
        if s is not None:
            s.writer_paused = True

    def writer_resumed(self, sid: int) -> None:
        """The write buffer drained below the low-water mark: grant what was withheld (TS12)."""
        s = self.streams.get(sid)
        if s is not None:
            s.writer_paused = False
            if s.ungranted and not s.fin_received:
                self._grant(s)

    def count_local_refusal(self, name: str, reason: str) -> None:
        """A local client of ``listen`` tunnel ``name`` was turned away before any OPEN
        (``link_down``: no session; ``too_many_streams``: the stream limit)."""
        self._counter(name).refusals[reason] += 1

    def link_down(self) -> None:
        """The qgw session is gone: every stream is reset locally (nothing can be sent)."""
        self._out.clear()
        for s in list(self.streams.values()):
            self._gone(s)
            self._counter(s.name).resets["link_down"] += 1
            self._events.append(StreamReset(s.sid, m.ResetReason.GOING_AWAY, by_peer=False))

    # --- peer input ---

    def receive(self, payload: bytes) -> None:
        """One tunnel payload (kind 0x10-0x1F) from the peer. Never raises for bad input."""
        if len(payload) > m.HEADER and payload[0] == m.Kind.DATA:
            self._on_data(int.from_bytes(payload[1:5]), payload)  # the hot path: no copy
            return
        try:
            msg = m.decode(payload)
        except DecodeError:
            self.decode_errors += 1
            if len(payload) >= m.HEADER:  # a stream we know: it cannot go on
                sid = int.from_bytes(payload[1:5])
                if sid in self.streams:
                    self._protocol_error(self.streams[sid])
            return
        if isinstance(msg, m.Open):
            self._on_open(msg)
            return
        s = self.streams.get(msg.sid)
        if s is None:
            self.stale_messages += 1
            return
        if isinstance(msg, m.OpenOk):
            if s.state is not StreamState.EXPECT_OPEN_OK:
                self._protocol_error(s)
                return
            s.state = StreamState.OPEN
            s.send_credit = msg.window
            self._counter(s.name).streams_opened += 1
            self._events.append(Opened(s.sid))
        elif isinstance(msg, m.Refused):
            if s.state is not StreamState.EXPECT_OPEN_OK:
                self._protocol_error(s)
                return
            self._gone(s)
            self._counter(s.name).refusals[_label(REFUSE_LABELS, msg.reason)] += 1
            self._events.append(OpenRefused(s.sid, msg.reason))
        elif isinstance(msg, m.Fin):
            if s.state is not StreamState.OPEN or s.fin_received:
                self._protocol_error(s)
                return
            s.fin_received = True
            self._events.append(EndOfStream(s.sid))
            if s.fin_sent:
                self._finish(s)
        elif isinstance(msg, m.Reset):
            self._gone(s)
            self._counter(s.name).resets[_label(RESET_LABELS, msg.reason)] += 1
            self._events.append(StreamReset(s.sid, msg.reason, by_peer=True))
        elif isinstance(msg, m.Window):
            if s.state is not StreamState.OPEN:
                self._protocol_error(s)
                return
            was = s.send_credit
            s.send_credit += msg.increment
            if s.send_credit > m.MAX_WINDOW:
                self._protocol_error(s)
                return
            if was == 0 and not s.fin_sent:
                self._events.append(CreditAvailable(s.sid))

    def _on_open(self, msg: m.Open) -> None:
        sid = msg.sid
        if (sid % 2 == 0) == self.initiator or sid in self.streams:
            # The peer used our parity, or an id that is live: a peer bug, never a new stream.
            self.protocol_errors += 1
            if sid in self.streams:
                self._protocol_error(self.streams[sid])
            else:
                self._out.append(m.encode_reset(sid, m.ResetReason.PROTOCOL_ERROR))
            return
        if msg.name not in self.connect_names:
            self._counter(msg.name).refusals["unknown_tunnel"] += 1  # under UNKNOWN_NAME
            self._out.append(m.encode_refused(sid, m.RefuseReason.UNKNOWN_TUNNEL))
            return
        if len(self.streams) >= self.max_streams:
            self._counter(msg.name).refusals["too_many_streams"] += 1
            self._out.append(m.encode_refused(sid, m.RefuseReason.TOO_MANY_STREAMS))
            return
        self.streams[sid] = Stream(
            sid, msg.name, StreamState.EXPECT_CONNECT, False, send_credit=msg.window
        )
        self._events.append(OpenRequested(sid, msg.name))

    def _on_data(self, sid: int, payload: bytes) -> None:
        n = len(payload) - m.HEADER
        s = self.streams.get(sid)
        if s is None:
            if n > m.MAX_DATA:
                self.decode_errors += 1
            else:
                self.stale_messages += 1
            return
        if s.state is not StreamState.OPEN or s.fin_received or n > s.recv_credit:
            self._protocol_error(s)  # data before open, after FIN, or over the window (TS11)
            return
        s.recv_credit -= n
        s.ungranted += n
        self._counter(s.name).bytes_received += n
        self._events.append(Received(sid, memoryview(payload)[m.HEADER :]))
        if not s.writer_paused and s.ungranted >= self._grant_at:
            self._grant(s)

    # --- helpers ---

    def _grant(self, s: Stream) -> None:
        inc = s.ungranted
        s.ungranted = 0
        s.recv_credit += inc
        self._out.append(m.encode_window(s.sid, inc))

    def _expect(self, sid: int, state: StreamState) -> Stream:
        s = self.streams.get(sid)
        if s is None or s.state is not state:
            raise LocalProtocolError(f"stream is not in state {state.value}")
        return s

    def _protocol_error(self, s: Stream) -> None:
        self.protocol_errors += 1
        self._gone(s)
        self._counter(s.name).resets["protocol_error"] += 1
        self._out.append(m.encode_reset(s.sid, m.ResetReason.PROTOCOL_ERROR))
        self._events.append(StreamReset(s.sid, m.ResetReason.PROTOCOL_ERROR, by_peer=False))

    def _finish(self, s: Stream) -> None:
        self._gone(s)
        self._events.append(Finished(s.sid))

    def _gone(self, s: Stream) -> None:
        del self.streams[s.sid]
        self._counter(s.name).streams_closed += 1


def _label(labels: dict[m.RefuseReason, str] | dict[m.ResetReason, str], reason: int) -> str:
    for k, v in labels.items():
        if int(k) == reason:
            return v
    return "other"
