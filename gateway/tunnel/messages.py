"""Tunnel stream messages (labels TS1-TS7 of docs/protocol.md, "Tunnel streams").

Each message is one application payload inside a DATA record (or a reassembled FIRST/MORE/LAST
message); its first byte is the *kind*, 0x10-0x1F (kinds 0x01-0x0F belong to the MQTT bridge).
All integers are big-endian. ``sid`` is the stream id chosen by the opener: even when the
opener is the qgw session initiator, odd when it is the responder, so the two gateways never
pick the same id.

::

    TS1 OPEN     0x10 || u32 sid || u32 window || u8 len || name      open by tunnel name
    TS2 OPEN_OK  0x11 || u32 sid || u32 window                        the far end connected
    TS3 REFUSED  0x12 || u32 sid || u8 reason                         the far end did not
    TS4 DATA     0x13 || u32 sid || bytes (1 .. MAX_DATA)             stream bytes
    TS5 FIN      0x14 || u32 sid                                      no more bytes this way
    TS6 RESET    0x15 || u32 sid || u8 reason                         abort both directions
    TS7 WINDOW   0x16 || u32 sid || u32 increment (>= 1)              more receive window

:func:`decode` raises :class:`gateway.errors.DecodeError` for any input that is not exactly
one of these (never ``struct.error`` or ``IndexError``).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from gateway.core.labels import MAX_RECORD_PLAINTEXT
from gateway.errors import DecodeError

KIND_MIN = 0x10  # kinds 0x10-0x1F belong to tunnel streams (shared decision)
KIND_MAX = 0x1F


class Kind(IntEnum):
    OPEN = 0x10
    OPEN_OK = 0x11
    REFUSED = 0x12
    DATA = 0x13
    FIN = 0x14
    RESET = 0x15
    WINDOW = 0x16


class RefuseReason(IntEnum):
    UNKNOWN_TUNNEL = 1  # no `connect` entry of that name at the far end
    CONNECT_FAILED = 2  # the far end's destination refused or did not answer
    TOO_MANY_STREAMS = 3  # the far end's stream limit is reached
    GOING_AWAY = 4  # the far end is stopping


class ResetReason(IntEnum):
    ABORTED = 0  # the local socket was reset or failed
    PROTOCOL_ERROR = 1  # the peer broke the stream rules (window overrun, data after FIN, ...)
    GOING_AWAY = 2  # the gateway is stopping
    INTERNAL_ERROR = 3


HEADER = 5  # kind + u32 sid
#: Largest DATA chunk: one record's plaintext (60 KiB) minus the 5-byte header.
MAX_DATA = MAX_RECORD_PLAINTEXT - HEADER
MAX_WINDOW = (1 << 31) - 1  # a send credit above this is a protocol error (as HTTP/2)
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")

_SID = struct.Struct(">BI")
_SID_U32 = struct.Struct(">BII")
_SID_U8 = struct.Struct(">BIB")


@dataclass(frozen=True, slots=True)
class Open:
    sid: int
    window: int
    name: str


@dataclass(frozen=True, slots=True)
class OpenOk:
    sid: int
    window: int


@dataclass(frozen=True, slots=True)
class Refused:
    sid: int
    reason: int  # a RefuseReason value; unknown values are kept, not rejected


@dataclass(frozen=True, slots=True)
class Data:
    sid: int
    data: bytes = field(repr=False)  # tunnelled bytes may be confidential: never printed


@dataclass(frozen=True, slots=True)
class Fin:
    sid: int


@dataclass(frozen=True, slots=True)
class Reset:
    sid: int
    reason: int  # a ResetReason value; unknown values are kept


@dataclass(frozen=True, slots=True)
class Window:
    sid: int
    increment: int


Message = Open | OpenOk | Refused | Data | Fin | Reset | Window


def is_tunnel_payload(payload: bytes) -> bool:
    """True if this application payload belongs to tunnel streams (kind 0x10-0x1F)."""
    return bool(payload) and KIND_MIN <= payload[0] <= KIND_MAX


# --- encoders (TS1..TS7) ---


def encode_open(sid: int, window: int, name: str) -> bytes:
    raw = name.encode("ascii")
    return _SID_U32.pack(Kind.OPEN, sid, window) + bytes((len(raw),)) + raw  # TS1


def encode_open_ok(sid: int, window: int) -> bytes:
    return _SID_U32.pack(Kind.OPEN_OK, sid, window)  # TS2


def encode_refused(sid: int, reason: int) -> bytes:
    return _SID_U8.pack(Kind.REFUSED, sid, reason)  # TS3


def data_header(sid: int) -> bytes:
    """The 5 bytes before the stream bytes of a DATA message (TS4)."""
    return _SID.pack(Kind.DATA, sid)


def encode_data(sid: int, data: bytes) -> bytes:
    return _SID.pack(Kind.DATA, sid) + data  # TS4


def encode_fin(sid: int) -> bytes:
    return _SID.pack(Kind.FIN, sid)  # TS5


def encode_reset(sid: int, reason: int) -> bytes:
    return _SID_U8.pack(Kind.RESET, sid, reason)  # TS6


def encode_window(sid: int, increment: int) -> bytes:
    return _SID_U32.pack(Kind.WINDOW, sid, increment)  # TS7


def encode(msg: Message) -> bytes:
    """Any message to its bytes (the encoders above, by type)."""
    if isinstance(msg, Open):
        return encode_open(msg.sid, msg.window, msg.name)
    if isinstance(msg, OpenOk):
        return encode_open_ok(msg.sid, msg.window)
    if isinstance(msg, Refused):
        return encode_refused(msg.sid, msg.reason)
    if isinstance(msg, Data):
        return encode_data(msg.sid, msg.data)
    if isinstance(msg, Fin):
        return encode_fin(msg.sid)
    if isinstance(msg, Reset):
        return encode_reset(msg.sid, msg.reason)
    return encode_window(msg.sid, msg.increment)


# --- decoder ---


def decode(payload: bytes) -> Message:
    """One tunnel payload to its message; DecodeError for anything else."""
    n = len(payload)
    if n < HEADER:
        raise DecodeError(f"tunnel message of {n} bytes is shorter than its 5-byte header")
    kind, sid = _SID.unpack_from(payload)
    if kind == Kind.DATA:
        if n == HEADER:
            raise DecodeError("tunnel DATA without data")
        if n - HEADER > MAX_DATA:
            raise DecodeError(f"tunnel DATA of {n - HEADER} bytes is over {MAX_DATA}")
        return Data(sid, payload[HEADER:])
    if kind == Kind.WINDOW:
        _exact(payload, 9, "WINDOW")
        inc = _window(_SID_U32.unpack(payload)[2], "WINDOW")
        if inc == 0:
            raise DecodeError("tunnel WINDOW with a zero increment")
        return Window(sid, inc)
    if kind == Kind.OPEN:
        if n < 10:
            raise DecodeError("tunnel OPEN shorter than 10 bytes")
        window = _window(_SID_U32.unpack_from(payload)[2], "OPEN")
        ln = payload[9]
        _exact(payload, 10 + ln, "OPEN")
        raw = payload[10:]
        name = raw.decode("ascii", "replace")
        if NAME_RE.fullmatch(name) is None:
            raise DecodeError("tunnel OPEN with a malformed tunnel name")
        return Open(sid, window, name)
    if kind == Kind.OPEN_OK:
        _exact(payload, 9, "OPEN_OK")
        return OpenOk(sid, _window(_SID_U32.unpack(payload)[2], "OPEN_OK"))
    if kind == Kind.REFUSED:
        _exact(payload, 6, "REFUSED")
        return Refused(sid, payload[5])
    if kind == Kind.FIN:
        _exact(payload, 5, "FIN")
        return Fin(sid)
    if kind == Kind.RESET:
        _exact(payload, 6, "RESET")
        return Reset(sid, payload[5])
    raise DecodeError(f"unknown tunnel message kind 0x{kind:02x}")


def _exact(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise DecodeError(f"tunnel {what} of {len(payload)} bytes, expected {size}")


def _window(value: int, what: str) -> int:
    if value > MAX_WINDOW:
        raise DecodeError(f"tunnel {what} window {value} is over 2^31-1")
    return value
