"""The one interface every QKD key source implements, and its value types.

ETSI GS QKD 014 terms: the *master* SAE asks its KME for new keys for a *slave* SAE
(``enc_keys``) and sends the key IDs to the slave; the slave asks its own KME for the keys with
those IDs (``dec_keys``). Each key is delivered once on each side.

Errors (from :mod:`gateway.errors`, all ``KeySourceError``):

- ``KmeUnavailable``  KME unreachable, timed out, 5xx, link down (after bounded retries)
- ``KeyExhausted``    no key now (the pool is empty or the QKD link aborted)
- ``KeyNotFound``     the KME does not know (or already delivered) a requested key ID
- ``KmeBadAnswer``    the answer is malformed or not what was asked
- ``KmeUnauthorized`` the KME refused our SAE identity (401)
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from gateway.errors import KeyExhausted, KeyNotFound, KmeBadAnswer, KmeUnauthorized, KmeUnavailable
from gateway.secret import SecretBytes

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def canonical_key_id(value: object) -> str | None:
    """The canonical lowercase 8-4-4-4-12 form of a UUID string, or None if it is not one."""
    if not isinstance(value, str) or not _UUID_RE.match(value):
        return None
    return str(uuid.UUID(value))


@dataclass(frozen=True, slots=True)
class QkdKey:
    """One QKD key: its ID (canonical lowercase UUID) and its bytes (never printed)."""

    key_id: str
    key: SecretBytes

    @property
    def size_bits(self) -> int:
        return len(self.key) * 8


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """ETSI GS QKD 014 Table 9 (Status data format), field names as in the standard.

    ``max_SAE_ID_count`` is the number of additional slave SAEs supported (0: none).
    """

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int  # default key size, bits
    stored_key_count: int  # keys of key_size available now
    max_key_count: int
    max_key_per_request: int
    max_key_size: int  # bits
    min_key_size: int  # bits
    max_SAE_ID_count: int
    status_extension: dict[str, Any] | None = None


@dataclass(slots=True)
class KeySourceCounters:
    """Plain counters a metrics layer can read (monotonic except ``last_latency_seconds``)."""

    requests: int = 0  # calls to enc_keys / dec_keys / status
    attempts: int = 0  # HTTP attempts including retries (client); equals requests elsewhere
    retries: int = 0
    keys_delivered: int = 0
    bits_delivered: int = 0
    errors_unavailable: int = 0
    errors_exhausted: int = 0
    errors_not_found: int = 0
    errors_bad_answer: int = 0
    errors_unauthorized: int = 0
    last_latency_seconds: float = 0.0

    def count_error(self, exc: BaseException) -> None:
        if isinstance(exc, KmeUnavailable):
            self.errors_unavailable += 1
        elif isinstance(exc, KeyExhausted):
            self.errors_exhausted += 1
        elif isinstance(exc, KeyNotFound):
            self.errors_not_found += 1
        elif isinstance(exc, KmeBadAnswer):
            self.errors_bad_answer += 1
        elif isinstance(exc, KmeUnauthorized):
            self.errors_unauthorized += 1

    def count_keys(self, keys: Sequence[QkdKey]) -> None:
        self.keys_delivered += len(keys)
        self.bits_delivered += sum(k.size_bits for k in keys)


@runtime_checkable
class KeySource(Protocol):
    """Where the gateway gets QKD keys. All implementations pass tests/keysource/test_conformance."""

    counters: KeySourceCounters

    async def enc_keys(
        self, slave_sae_id: str, number: int = 1, size_bits: int | None = None
    ) -> list[QkdKey]:
        """Master side: ``number`` new keys shared with ``slave_sae_id`` (size default: configured)."""
        ...

    async def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        """Slave side: the keys with these IDs, made by ``master_sae_id`` for us, in that order."""
        ...

    async def status(self, peer_sae_id: str) -> KeyStatus:
        """The KME's status for the link to ``peer_sae_id`` (ETSI 014 Table 9)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the source is unusable afterwards."""
        ...


def check_request(number: int, size_bits: int) -> None:
    """Caller mistakes are ValueError in every KeySource (not a KME condition)."""
    if number < 1:
        raise ValueError("number must be >= 1")
    if size_bits < 8 or size_bits % 8:
        raise ValueError("size_bits must be a positive multiple of 8")
