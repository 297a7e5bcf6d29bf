"""Secret byte holders that never print their contents."""

from __future__ import annotations

import hashlib
import hmac


class SecretBytes:
    """Holds key material. Prints as ``<secret>``; raw bytes only via a loud method.

    ``wipe()`` overwrites the buffer in place. Python cannot guarantee that no other copy
    exists (immutable ``bytes`` handed to a library may linger), so wiping is best effort and
    documented as such in docs/security.md.
    """

    __slots__ = ("_buf", "_wiped")

    def __init__(self, data: bytes | bytearray) -> None:
        self._buf = bytearray(data)
        self._wiped = False

    def expose_secret_bytes(self) -> bytes:
        if self._wiped:
            raise ValueError("secret was wiped")
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def wipe(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._wiped = True

    @property
    def wiped(self) -> bool:
        return self._wiped

    def fingerprint(self) -> str:
        """A short, non-reversible label (for correlating, not for identifying keys)."""
        return hashlib.sha256(b"qgw fingerprint" + bytes(self._buf)).hexdigest()[:8]

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretBytes):
            return NotImplemented
        return hmac.compare_digest(bytes(self._buf), bytes(other._buf))

    def __hash__(self) -> int:
        raise TypeError("SecretBytes is not hashable")

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("SecretBytes cannot be pickled")
