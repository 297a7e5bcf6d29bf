"""Binary encoding of a :class:`BridgeMessage` (carried inside the peer link's records).

Layout (version 1, all integers big-endian, strings UTF-8 without U+0000)::

    u8   version = 1
    u8   flags    bit0 retain, bit1 qos (0/1), bit2 content_type, bit3 response_topic,
                  bit4 correlation_data, bit5 message_expiry_interval,
                  bit6 payload_format_indicator, bit7 reserved (0)
    u8   origin length (1..255)        origin
    u16  topic length (1..65535)       topic (no '+' or '#')
    [u16 len, content_type]            if bit2
    [u16 len, response_topic]          if bit3 (a topic name: no wildcards)
    [u16 len, correlation_data]        if bit4
    [u32 message_expiry_interval]      if bit5
    [u8  payload_format_indicator]     if bit6 (0 or 1)
    u16  number of user properties (<= MAX_USER_PROPERTIES)
         each: u16 len, key; u16 len, value
    u32  payload length (<= max_payload)  payload
    (nothing after the payload)

The limits are MQTT's own (strings of at most 65535 bytes) plus a cap on the number of user
properties and the configured payload limit, so a decoder never allocates more than the
input it was given and a bounded amount on top.
"""

from __future__ import annotations

import struct

from gateway.bridge.transport import BridgeMessage, MessageProps
from gateway.errors import DecodeError, LocalProtocolError

VERSION = 1
MAX_STRING_BYTES = 65535  # MQTT UTF-8 string / binary data limit
MAX_ORIGIN_BYTES = 255
MAX_USER_PROPERTIES = 1024
MAX_PAYLOAD_BYTES = 256 << 20  # the configuration's upper bound for mqtt.max_payload_bytes

_RETAIN = 0x01
_QOS1 = 0x02
_CT = 0x04
_RT = 0x08
_CD = 0x10
_MEI = 0x20
_PFI = 0x40
_RESERVED = 0x80
_HEAD = struct.Struct("!BBB")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _check_text(value: str, what: str, *, topic: bool = False, empty_ok: bool = True) -> bytes:
    if "\x00" in value:
        raise ValueError(f"{what} contains U+0000")
    try:
        raw = value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not encodable as UTF-8") from exc
    if len(raw) > MAX_STRING_BYTES:
        raise ValueError(f"{what} longer than {MAX_STRING_BYTES} bytes")
    if not raw and not empty_ok:
        raise ValueError(f"{what} is empty")
    if topic and ("+" in value or "#" in value):
        raise ValueError(f"{what} contains a wildcard")
    return raw


def encode(msg: BridgeMessage, *, max_payload: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Bytes for ``msg``; raise LocalProtocolError if it breaks a limit."""
    try:
        return _encode(msg, max_payload)
    except (ValueError, TypeError, struct.error) as exc:
        raise LocalProtocolError(f"cannot encode bridge message: {exc}") from exc


_ORIGINS: dict[str, bytes] = {}  # origin -> checked bytes (one or two sites per process)


def _origin_bytes(origin: str) -> bytes:
    raw = _ORIGINS.get(origin)
    if raw is None:
        raw = _check_text(origin, "origin", empty_ok=False)
        if len(raw) > MAX_ORIGIN_BYTES:
            raise ValueError(f"origin longer than {MAX_ORIGIN_BYTES} bytes")
        if len(_ORIGINS) < 64:
            _ORIGINS[origin] = raw
    return raw


def _encode(msg: BridgeMessage, max_payload: int) -> bytes:
    p = msg.properties
    qos = msg.qos
    if qos not in (0, 1):
        raise ValueError("qos must be 0 or 1")
    flags = (_RETAIN if msg.retain else 0) | (_QOS1 if qos == 1 else 0)
    origin = _origin_bytes(msg.origin)
    topic = _check_text(msg.topic, "topic", topic=True, empty_ok=False)
    payload = msg.payload
    if len(payload) > min(max_payload, MAX_PAYLOAD_BYTES):
        raise ValueError(f"payload larger than {max_payload} bytes")
    users = p.user_properties
    if (
        not users
        and p.content_type is None
        and p.response_topic is None
        and p.correlation_data is None
        and p.message_expiry_interval is None
        and p.payload_format_indicator is None
    ):  # the common case: no properties
        return b"".join(
            (
                _HEAD.pack(VERSION, flags, len(origin)),
                origin,
                _U16.pack(len(topic)),
                topic,
                b"\x00\x00",  # no user properties
                _U32.pack(len(payload)),
                payload,
            )
        )
    opt = bytearray()
    if p.content_type is not None:
        flags |= _CT
        raw = _check_text(p.content_type, "content_type")
        opt += struct.pack("!H", len(raw)) + raw
    if p.response_topic is not None:
        flags |= _RT
        raw = _check_text(p.response_topic, "response_topic", topic=True, empty_ok=False)
        opt += struct.pack("!H", len(raw)) + raw
    if p.correlation_data is not None:
        flags |= _CD
        if len(p.correlation_data) > MAX_STRING_BYTES:
            raise ValueError("correlation_data too long")
        opt += struct.pack("!H", len(p.correlation_data)) + bytes(p.correlation_data)
    if p.message_expiry_interval is not None:
        flags |= _MEI
        opt += struct.pack("!I", p.message_expiry_interval)
    if p.payload_format_indicator is not None:
        flags |= _PFI
        if p.payload_format_indicator not in (0, 1):
            raise ValueError("payload_format_indicator must be 0 or 1")
        opt += struct.pack("!B", p.payload_format_indicator)
    if len(users) > MAX_USER_PROPERTIES:
        raise ValueError(f"more than {MAX_USER_PROPERTIES} user properties")
    opt += struct.pack("!H", len(users))
    for k, v in users:
        kr = _check_text(k, "user property name")
        vr = _check_text(v, "user property value")
        opt += struct.pack("!H", len(kr)) + kr + struct.pack("!H", len(vr)) + vr
    return b"".join(
        (
            _HEAD.pack(VERSION, flags, len(origin)),
            origin,
            _U16.pack(len(topic)),
            topic,
            opt,
            _U32.pack(len(payload)),
            payload,
        )
    )


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DecodeError(f"bridge message truncated in {what}")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def text(self, n: int, what: str, *, topic: bool = False, empty_ok: bool = True) -> str:
        raw = self.take(n, what)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{what} is not valid UTF-8") from exc
        if "\x00" in value:
            raise DecodeError(f"{what} contains U+0000")
        if not value and not empty_ok:
            raise DecodeError(f"{what} is empty")
        if topic and ("+" in value or "#" in value):
            raise DecodeError(f"{what} contains a wildcard")
        return value


_NO_PROPS = MessageProps()


def _decode_plain(data: bytes, max_payload: int) -> BridgeMessage | None:
    """The common case (no properties) in a few slices; None means "use the full parser",
    which also produces the error for anything malformed."""
    n = len(data)
    if n < 12 or data[0] != VERSION or data[1] & ~(_RETAIN | _QOS1):
        return None
    ol = data[2]
    p = 3 + ol
    if not ol or n < p + 8:
        return None
    (tl,) = _U16.unpack_from(data, p)
    q = p + 2 + tl
    if not tl or n < q + 6 or data[q] or data[q + 1]:
        return None
    (size,) = _U32.unpack_from(data, q + 2)
    if q + 6 + size != n or size > min(max_payload, MAX_PAYLOAD_BYTES):
        return None
    try:
        origin = data[3:p].decode()
        topic = data[p + 2 : q].decode()
    except UnicodeDecodeError:
        return None
    if "\x00" in origin or "\x00" in topic or "+" in topic or "#" in topic:
        return None
    flags = data[1]
    return BridgeMessage(
        topic, data[q + 6 :], 1 if flags & _QOS1 else 0, bool(flags & _RETAIN), _NO_PROPS, origin
    )


def decode(data: bytes, *, max_payload: int = MAX_PAYLOAD_BYTES) -> BridgeMessage:
    """Parse bytes from :func:`encode`; raise DecodeError for anything malformed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("bridge message must be bytes")
    data = bytes(data)
    fast = _decode_plain(data, max_payload)
    if fast is not None:
        return fast
    return _decode_full(data, max_payload)


def _decode_full(data: bytes, max_payload: int) -> BridgeMessage:
    r = _Reader(data)
    version = r.u8("version")
    if version != VERSION:
        raise DecodeError(f"unknown bridge message version {version}")
    flags = r.u8("flags")
    if flags & _RESERVED:
        raise DecodeError("reserved flag set")
    origin = r.text(r.u8("origin length"), "origin", empty_ok=False)
    topic = r.text(r.u16("topic length"), "topic", topic=True, empty_ok=False)
    content_type = r.text(r.u16("content_type length"), "content_type") if flags & _CT else None
    response_topic = (
        r.text(r.u16("response_topic length"), "response_topic", topic=True, empty_ok=False)
        if flags & _RT
        else None
    )
    correlation = (
        r.take(r.u16("correlation_data length"), "correlation_data") if flags & _CD else None
    )
    expiry = r.u32("message_expiry_interval") if flags & _MEI else None
    pfi = r.u8("payload_format_indicator") if flags & _PFI else None
    if pfi is not None and pfi not in (0, 1):
        raise DecodeError("payload_format_indicator must be 0 or 1")
    count = r.u16("user property count")
    if count > MAX_USER_PROPERTIES:
        raise DecodeError(f"more than {MAX_USER_PROPERTIES} user properties")
    users: list[tuple[str, str]] = []
    for _ in range(count):
        k = r.text(r.u16("user property name length"), "user property name")
        v = r.text(r.u16("user property value length"), "user property value")
        users.append((k, v))
    size = r.u32("payload length")
    if size > min(max_payload, MAX_PAYLOAD_BYTES):
        raise DecodeError(f"payload of {size} bytes exceeds the limit of {max_payload}")
    payload = r.take(size, "payload")
    if r.pos != len(r.data):
        raise DecodeError(f"{len(r.data) - r.pos} trailing bytes after bridge message")
    return BridgeMessage(
        topic=topic,
        payload=payload,
        qos=1 if flags & _QOS1 else 0,
        retain=bool(flags & _RETAIN),
        properties=MessageProps(
            user_properties=tuple(users),
            content_type=content_type,
            response_topic=response_topic,
            correlation_data=correlation,
            message_expiry_interval=expiry,
            payload_format_indicator=pfi,
        ),
        origin=origin,
    )
