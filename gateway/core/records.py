"""Record layer (docs/protocol.md §6): AES-256-GCM, one key and IV per direction and epoch.

``nonce = IV XOR (0^32 || u64 seq)``; the 17-byte record header (frame length, type, epoch,
seq) is the AAD; the sequence is strict (the next record must carry exactly the next number).
"""

from __future__ import annotations

import struct

from gateway.core.labels import RECORD_HEADER_LEN, ContentType, FrameType
from gateway.crypto import AEAD_TAG_LEN, Aead
from gateway.errors import AuthenticationError, LocalProtocolError, ReplayError

_HEADER = struct.Struct(">IBIQ")
_RECORD = int(FrameType.RECORD)
#: content-type byte -> ContentType (a tuple lookup: cheaper than the enum call per record)
_CONTENT_TYPES: tuple[ContentType | None, ...] = tuple(
    ContentType(b) if b in ContentType._value2member_map_ else None for b in range(256)
)
_CTYPE_BYTES = {c: bytes([c]) for c in ContentType}


def record_nonce(iv: bytes, seq: int) -> bytes:
    """``IV XOR (0^32 || u64 seq)`` (REC1)."""
    return (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")


def record_header(epoch: int, seq: int, ciphertext_len: int) -> bytes:
    return _HEADER.pack(1 + 4 + 8 + ciphertext_len, _RECORD, epoch, seq)


class _DirectionState:
    """Key, IV, sequence and budget of one direction in one epoch."""

    __slots__ = ("_aead", "_iv", "bytes", "epoch", "max_bytes", "max_records", "seq")

    def __init__(self, epoch: int, key: bytes, iv: bytes, max_records: int, max_bytes: int) -> None:
        self.epoch = epoch
        self._aead = Aead(key)
        self._iv = int.from_bytes(iv, "big")  # the nonce is this XOR seq (REC1)
        self.seq = 0
        self.bytes = 0
        self.max_records = max_records
        self.max_bytes = max_bytes

    def _nonce(self, seq: int) -> bytes:
        return (self._iv ^ seq).to_bytes(12, "big")  # record_nonce, with the IV kept as an int

    def wipe(self) -> None:
        self._aead.wipe()
        self._iv = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(epoch={self.epoch}, seq={self.seq}, key=<secret>)"


class SendState(_DirectionState):
    """Sealing state of one direction in one epoch."""

    __slots__ = ()

    def room(self, plaintext_len: int) -> bool:
        return self.seq < self.max_records and self.bytes + plaintext_len <= self.max_bytes

    def seal(self, ctype: ContentType, data: bytes) -> bytes:
        """REC1: seal one record and return the whole frame."""
        if not self.room(len(data)):
            raise LocalProtocolError("record budget of this epoch is exhausted; rekey first")
        seq = self.seq
        plaintext = _CTYPE_BYTES[ctype] + data
        header = record_header(self.epoch, seq, len(plaintext) + AEAD_TAG_LEN)
        ct = self._aead.seal(self._nonce(seq), plaintext, header)
        self.seq = seq + 1
        self.bytes += len(data)
        return header + ct


class RecvState(_DirectionState):
    """Opening state of one direction in one epoch."""

    __slots__ = ()

    def open(self, seq: int, ciphertext: bytes) -> tuple[ContentType, bytes]:
        """REC2: open the next record; any failure is fatal to the session."""
        if seq != self.seq:
            raise ReplayError(f"record sequence {seq} where {self.seq} was expected")
        if self.seq >= self.max_records:
            raise AuthenticationError("peer exceeded the record budget of this epoch")
        header = record_header(self.epoch, seq, len(ciphertext))
        plaintext = self._aead.open(self._nonce(seq), ciphertext, header)
        self.seq += 1
        if not plaintext:
            raise AuthenticationError("empty record plaintext")
        ctype = _CONTENT_TYPES[plaintext[0]]
        if ctype is None:
            raise AuthenticationError("unknown record content type")
        self.bytes += len(plaintext) - 1
        if self.bytes > self.max_bytes:
            raise AuthenticationError("peer exceeded the byte budget of this epoch")
        return ctype, plaintext[1:]


RECORD_OVERHEAD = RECORD_HEADER_LEN + 1 + AEAD_TAG_LEN
