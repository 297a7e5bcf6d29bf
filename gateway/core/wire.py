"""Wire format: frames and handshake messages (docs/protocol.md §3).

Every frame is ``u32 length || u8 type || body`` (length counts type + body, big-endian).
Decoders raise :class:`gateway.errors.DecodeError` for any malformed input and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gateway.core.labels import (
    ADMISSION_LEN,
    ADMISSION_PROOF_LEN,
    COOKIE_LEN,
    FINISHED_LEN,
    FRAME_HEADER_LEN,
    HELLO_NONCE_LEN,
    KEY_ID_LEN,
    MAX_FRAME_LEN,
    MAX_NAME_LEN,
    NONCE_LEN,
    REKEY_MAC_LEN,
    REKEY_QKD_KEYS,
    VERSION,
    WC_TAG_LEN,
    Alert,
    FrameType,
    HelloKind,
)
from gateway.errors import DecodeError

X25519_LEN = 32
MAX_KEM_FIELD = 16384  # FrodoKEM-976: 15,632-byte key, 15,792-byte ciphertext (suite 0x03)
MAX_AUTH_FIELD = 8192
MAX_CERTS = 4
MAX_CERT_LEN = 32 * 1024


class Reader:
    """Bounds-checked reader; every failure is a DecodeError."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes) -> None:
        self._buf = buf
        self._pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._buf):
            raise DecodeError("message truncated")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u24(self) -> int:
        b = self.take(3)
        return (b[0] << 16) | (b[1] << 8) | b[2]

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def vec8(self, limit: int = 255) -> bytes:
        n = self.u8()
        if n > limit:
            raise DecodeError("field too long")
        return self.take(n)

    def vec16(self, limit: int) -> bytes:
        n = self.u16()
        if n > limit:
            raise DecodeError("field too long")
        return self.take(n)

    def rest(self) -> bytes:
        out = self._buf[self._pos :]
        self._pos = len(self._buf)
        return out

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise DecodeError("trailing bytes after message")


def vec8(b: bytes) -> bytes:
    if len(b) > 255:
        raise ValueError("vec8 too long")
    return bytes([len(b)]) + b


def vec16(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _name(r: Reader) -> str:
    raw = r.vec8(MAX_NAME_LEN)
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError("identity is not ASCII") from exc
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise DecodeError("identity has invalid characters")
    return name


def _flag(r: Reader) -> bool:
    v = r.u8()
    if v > 1:
        raise DecodeError("flag must be 0 or 1")
    return v == 1


def encode_certs(chain: tuple[bytes, ...]) -> bytes:
    out = bytes([len(chain)])
    for der in chain:
        out += len(der).to_bytes(3, "big") + der
    return out


def _certs(r: Reader) -> tuple[bytes, ...]:
    n = r.u8()
    if n > MAX_CERTS:
        raise DecodeError("too many certificates")
    out = []
    for _ in range(n):
        ln = r.u24()
        if ln > MAX_CERT_LEN:
            raise DecodeError("certificate too long")
        out.append(r.take(ln))
    return tuple(out)


# --- frames -----------------------------------------------------------------------------


def frame(ftype: FrameType, body: bytes) -> bytes:
    if len(body) + 1 > MAX_FRAME_LEN:
        raise ValueError("frame too large")
    return struct.pack(">IB", len(body) + 1, ftype) + body


_U32 = struct.Struct(">I")
#: frame-type byte -> FrameType (a tuple lookup per frame instead of an enum call)
_FRAME_TYPES: tuple[FrameType | None, ...] = tuple(
    FrameType(b) if b in FrameType._value2member_map_ else None for b in range(256)
)


class FrameBuffer:
    """Splits a byte stream into frames. Raises DecodeError on an oversize or unknown frame.

    Consumed bytes are dropped in one step once they are more than half the buffer, not per
    frame, so a read of many small frames costs no repeated moves of the rest."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> tuple[FrameType, bytes, bytes] | None:
        """Return (type, body, whole frame bytes) or None if incomplete."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < FRAME_HEADER_LEN:
            return None
        (length,) = _U32.unpack_from(buf, pos)
        if length < 1 or length > MAX_FRAME_LEN:
            raise DecodeError("frame length out of range")
        end = pos + 4 + length
        if len(buf) < end:
            return None
        ftype = _FRAME_TYPES[buf[pos + 4]]
        if ftype is None:
            raise DecodeError("unknown frame type")
        raw = bytes(buf[pos:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return ftype, raw[5:], raw

    @property
    def pending(self) -> int:
        return len(self._buf) - self._pos


# --- handshake messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Init:
    """INIT (I -> R), docs/protocol.md §3.1."""

    suite: int
    auth_mode: int
    qkd_policy: int
    qkd_offered: bool
    qkd_key_id: bytes  # 16 bytes; zeros when not offered
    nonce: bytes
    initiator: str
    responder: str
    kem_public: bytes
    x25519_public: bytes
    admission: bytes

    def core(self) -> bytes:
        """Everything the admission MAC covers (all fields before it)."""
        return (
            bytes([VERSION, self.suite, self.auth_mode, self.qkd_policy, int(self.qkd_offered)])
            + self.qkd_key_id
            + self.nonce
            + vec8(self.initiator.encode())
            + vec8(self.responder.encode())
            + vec16(self.kem_public)
            + self.x25519_public
        )

    def encode(self) -> bytes:
        return frame(FrameType.INIT, self.core() + self.admission)

    @staticmethod
    def decode(body: bytes) -> Init:
        r = Reader(body)
        if r.u8() != VERSION:
            raise DecodeError("unsupported protocol version")
        suite, auth, policy = r.u8(), r.u8(), r.u8()
        offered = _flag(r)
        m = Init(
            suite=suite,
            auth_mode=auth,
            qkd_policy=policy,
            qkd_offered=offered,
            qkd_key_id=r.take(KEY_ID_LEN),
            nonce=r.take(NONCE_LEN),
            initiator=_name(r),
            responder=_name(r),
            kem_public=r.vec16(MAX_KEM_FIELD),
            x25519_public=r.take(X25519_LEN),
            admission=r.take(ADMISSION_LEN),
        )
        r.end()
        return m


@dataclass(frozen=True, slots=True)
class Resp:
    """RESP (R -> I), docs/protocol.md §3.2."""

    nonce: bytes
    qkd_used: bool
    kem_ciphertext: bytes
    x25519_public: bytes
    certs: tuple[bytes, ...]
    auth: bytes  # ML-DSA signature (pki) or PSK MAC (psk) over TH2
    finished: bytes

    def core(self) -> bytes:
        return (
            self.nonce
            + bytes([int(self.qkd_used)])
            + vec16(self.kem_ciphertext)
            + self.x25519_public
            + encode_certs(self.certs)
        )

    def encode(self) -> bytes:
        return frame(FrameType.RESP, self.core() + vec16(self.auth) + self.finished)

    @staticmethod
    def decode(body: bytes) -> Resp:
        r = Reader(body)
        m = Resp(
            nonce=r.take(NONCE_LEN),
            qkd_used=_flag(r),
            kem_ciphertext=r.vec16(MAX_KEM_FIELD),
            x25519_public=r.take(X25519_LEN),
            certs=_certs(r),
            auth=r.vec16(MAX_AUTH_FIELD),
            finished=r.take(FINISHED_LEN),
        )
        r.end()
        return m


@dataclass(frozen=True, slots=True)
class Confirm:
    """CONFIRM (I -> R), docs/protocol.md §3.3."""

    certs: tuple[bytes, ...]
    auth: bytes
    finished: bytes

    def core(self) -> bytes:
        return encode_certs(self.certs)

    def encode(self) -> bytes:
        return frame(FrameType.CONFIRM, self.core() + vec16(self.auth) + self.finished)

    @staticmethod
    def decode(body: bytes) -> Confirm:
        r = Reader(body)
        m = Confirm(certs=_certs(r), auth=r.vec16(MAX_AUTH_FIELD), finished=r.take(FINISHED_LEN))
        r.end()
        return m


@dataclass(frozen=True, slots=True)
class RekeyInit:
    """REKEY_INIT (I -> R), docs/protocol.md §5."""

    epoch: int
    nonce: bytes
    qkd_offered: bool
    key_ids: tuple[bytes, ...]  # REKEY_QKD_KEYS x 16 bytes (zeros when not offered)
    kem_public: bytes
    x25519_public: bytes
    wc_tag: bytes
    mac: bytes

    def auth_input(self) -> bytes:
        return (
            bytes([FrameType.REKEY_INIT])
            + struct.pack(">I", self.epoch)
            + self.nonce
            + bytes([int(self.qkd_offered)])
            + b"".join(self.key_ids)
            + vec16(self.kem_public)
            + self.x25519_public
        )

    def encode(self) -> bytes:
        return frame(FrameType.REKEY_INIT, self.auth_input()[1:] + self.wc_tag + self.mac)

    @staticmethod
    def decode(body: bytes) -> RekeyInit:
        r = Reader(body)
        m = RekeyInit(
            epoch=r.u32(),
            nonce=r.take(NONCE_LEN),
            qkd_offered=_flag(r),
            key_ids=tuple(r.take(KEY_ID_LEN) for _ in range(REKEY_QKD_KEYS)),
            kem_public=r.vec16(MAX_KEM_FIELD),
            x25519_public=r.take(X25519_LEN),
            wc_tag=r.take(WC_TAG_LEN),
            mac=r.take(REKEY_MAC_LEN),
        )
        r.end()
        return m


@dataclass(frozen=True, slots=True)
class RekeyResp:
    """REKEY_RESP (R -> I), docs/protocol.md §5."""

    epoch: int
    nonce: bytes
    qkd_used: bool
    kem_ciphertext: bytes
    x25519_public: bytes
    wc_tag: bytes
    mac: bytes

    def auth_input(self) -> bytes:
        return (
            bytes([FrameType.REKEY_RESP])
            + struct.pack(">I", self.epoch)
            + self.nonce
            + bytes([int(self.qkd_used)])
            + vec16(self.kem_ciphertext)
            + self.x25519_public
        )

    def encode(self) -> bytes:
        return frame(FrameType.REKEY_RESP, self.auth_input()[1:] + self.wc_tag + self.mac)

    @staticmethod
    def decode(body: bytes) -> RekeyResp:
        r = Reader(body)
        m = RekeyResp(
            epoch=r.u32(),
            nonce=r.take(NONCE_LEN),
            qkd_used=_flag(r),
            kem_ciphertext=r.vec16(MAX_KEM_FIELD),
            x25519_public=r.take(X25519_LEN),
            wc_tag=r.take(WC_TAG_LEN),
            mac=r.take(REKEY_MAC_LEN),
        )
        r.end()
        return m


# --- pre-handshake admission (docs/protocol.md §3.5) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    """CHALLENGE (R -> I), the first frame on every connection (AD1): version || cookie."""

    cookie: bytes

    def encode(self) -> bytes:
        return frame(FrameType.CHALLENGE, bytes([VERSION]) + self.cookie)

    @staticmethod
    def decode(body: bytes) -> Challenge:
        r = Reader(body)
        if r.u8() != VERSION:
            raise DecodeError("unsupported protocol version")
        m = Challenge(cookie=r.take(COOKIE_LEN))
        r.end()
        return m


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO (I -> R), AD2: what the initiator wants, and a proof bound to the cookie."""

    suite: int
    auth_mode: int
    qkd_policy: int
    kind: HelloKind
    epoch: int  # resume: the epoch whose chain key the proof uses; bootstrap: 0
    initiator: str
    responder: str
    nonce: bytes  # n_hello: fresh per connection, so a recorded ADMIT never fits a new HELLO
    proof: bytes

    def core(self) -> bytes:
        """HELLO_core: the body from version through n_hello (the proof covers it and the cookie)."""
        return (
            bytes([VERSION, self.suite, self.auth_mode, self.qkd_policy, self.kind])
            + struct.pack(">I", self.epoch)
            + vec8(self.initiator.encode())
            + vec8(self.responder.encode())
            + self.nonce
        )

    def encode(self) -> bytes:
        return frame(FrameType.HELLO, self.core() + self.proof)

    @staticmethod
    def decode(body: bytes) -> Hello:
        r = Reader(body)
        if r.u8() != VERSION:
            raise DecodeError("unsupported protocol version")
        suite, auth, policy = r.u8(), r.u8(), r.u8()
        try:
            kind = HelloKind(r.u8())
        except ValueError as exc:
            raise DecodeError("unknown HELLO kind") from exc
        epoch = r.u32()
        if kind is HelloKind.BOOTSTRAP and epoch != 0:
            raise DecodeError("bootstrap HELLO with an epoch")
        m = Hello(
            suite=suite,
            auth_mode=auth,
            qkd_policy=policy,
            kind=kind,
            epoch=epoch,
            initiator=_name(r),
            responder=_name(r),
            nonce=r.take(HELLO_NONCE_LEN),
            proof=r.take(ADMISSION_PROOF_LEN),
        )
        r.end()
        return m


@dataclass(frozen=True, slots=True)
class Admit:
    """ADMIT (R -> I), AD4: kind || epoch || proof (the responder's MAC over the exchange)."""

    kind: HelloKind
    epoch: int
    proof: bytes

    def core(self) -> bytes:
        return bytes([self.kind]) + struct.pack(">I", self.epoch)

    def encode(self) -> bytes:
        return frame(FrameType.ADMIT, self.core() + self.proof)

    @staticmethod
    def decode(body: bytes) -> Admit:
        r = Reader(body)
        try:
            kind = HelloKind(r.u8())
        except ValueError as exc:
            raise DecodeError("unknown ADMIT kind") from exc
        m = Admit(kind=kind, epoch=r.u32(), proof=r.take(ADMISSION_PROOF_LEN))
        r.end()
        return m


@dataclass(frozen=True, slots=True)
class AlertMsg:
    """ALERT: unauthenticated; only ever closes a connection, never changes security state."""

    code: int
    reason: str

    def encode(self) -> bytes:
        return frame(
            FrameType.ALERT, bytes([self.code]) + vec8(self.reason.encode("ascii", "replace")[:64])
        )

    @staticmethod
    def decode(body: bytes) -> AlertMsg:
        r = Reader(body)
        code = r.u8()
        reason = r.vec8(64).decode("ascii", "replace")
        r.end()
        try:
            Alert(code)
        except ValueError as exc:
            raise DecodeError("unknown alert code") from exc
        return AlertMsg(code, reason)


_RECORD_HEAD = struct.Struct(">IQ")


def decode_record_header(body: bytes) -> tuple[int, int, bytes]:
    """RECORD body -> (epoch, seq, ciphertext)."""
    if len(body) < 4 + 8 + 17:  # epoch, seq, 1 content-type byte + 16-byte tag at least
        raise DecodeError("record too short" if len(body) >= 12 else "message truncated")
    epoch, seq = _RECORD_HEAD.unpack_from(body)
    return epoch, seq, body[12:]


DECODERS = {
    FrameType.INIT: Init.decode,
    FrameType.RESP: Resp.decode,
    FrameType.CONFIRM: Confirm.decode,
    FrameType.REKEY_INIT: RekeyInit.decode,
    FrameType.REKEY_RESP: RekeyResp.decode,
    FrameType.CHALLENGE: Challenge.decode,
    FrameType.HELLO: Hello.decode,
    FrameType.ADMIT: Admit.decode,
    FrameType.ALERT: AlertMsg.decode,
}
