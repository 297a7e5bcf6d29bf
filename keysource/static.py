"""A static key source: both sites derive the same keys from one shared seed (tests and labs).

It gives no security beyond the secrecy of the seed file; it exists so that the gateway can be
tested without a KME. File format (TOML, mode 0600)::

    # qgw static QKD key seed
    seed = "<64 or more hex digits>"

Derivation (SHAKE-256, all fields length-prefixed): the key ID of key number ``i`` from
``master`` to ``slave`` with ``n`` bytes is a UUID whose bytes are
``tag[0:10] || n (u16) || i (u32)`` with the version-4 and variant bits set, where ``tag`` is
SHAKE-256("qgw static id", seed, master, slave, n, i); the key is
SHAKE-256("qgw static key", seed, master, slave, n, i) truncated to n bytes. The slave reads
``n`` and ``i`` from the ID and checks the tag, so forged or misdirected IDs are not found.

Each key is delivered once per side *within one process* (the master counts up from a random
start; the slave remembers what it delivered).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path

from gateway.errors import KeyNotFound, KeySourceError
from gateway.secret import SecretBytes
from keysource.base import KeySourceCounters, KeyStatus, QkdKey, canonical_key_id, check_request

MIN_SEED_BYTES = 32
MAX_KEY_BYTES = 65535


def _shake(label: bytes, *parts: bytes, n: int) -> bytes:
    h = hashlib.shake_256(label)
    for p in parts:
        h.update(struct.pack(">I", len(p)) + p)
    return h.digest(n)


def load_seed(path: Path) -> bytes:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
        seed = bytes.fromhex(data["seed"])
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise KeySourceError(f"cannot read static key seed from {path}") from exc
    except ValueError as exc:
        raise KeySourceError(f"{path}: seed is not hex") from exc
    if len(seed) < MIN_SEED_BYTES:
        raise KeySourceError(f"{path}: seed must be at least {MIN_SEED_BYTES} bytes")
    return seed


def write_seed_file(path: Path, seed: bytes | None = None) -> None:
    """Write a new seed file (mode 0600)."""
    seed = seed if seed is not None else secrets.token_bytes(32)
    text = f'# qgw static QKD key seed (tests and labs only)\nseed = "{seed.hex()}"\n'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class StaticKeySource:
    """KeySource from a shared seed (see the module docstring)."""

    def __init__(
        self,
        seed: bytes,
        sae_id: str,
        key_size_bits: int = 256,
        start_index: int | None = None,
    ) -> None:
        if len(seed) < MIN_SEED_BYTES:
            raise ValueError(f"seed must be at least {MIN_SEED_BYTES} bytes")
        check_request(1, key_size_bits)
        self._seed = SecretBytes(seed)
        self.sae_id = sae_id
        self.key_size_bits = key_size_bits
        self._next: dict[str, int] = {}
        self._start = secrets.randbelow(2**31) if start_index is None else start_index
        self._delivered: set[tuple[str, int, int]] = set()
        self.counters = KeySourceCounters()

    @classmethod
    def from_file(cls, path: Path, sae_id: str, key_size_bits: int = 256) -> StaticKeySource:
        return cls(load_seed(path), sae_id, key_size_bits)

    def __repr__(self) -> str:
        return f"StaticKeySource(sae_id={self.sae_id!r}, seed=<secret>)"

    def _parts(self, master: str, slave: str, n: int, i: int) -> tuple[bytes, ...]:
        return (
            self._seed.expose_secret_bytes(),
            master.encode(),
            slave.encode(),
            struct.pack(">HI", n, i),
        )

    def _key_id(self, master: str, slave: str, n: int, i: int) -> str:
        tag = _shake(b"qgw static id", *self._parts(master, slave, n, i), n=10)
        return str(uuid.UUID(bytes=tag + struct.pack(">HI", n, i), version=4))

    def _key(self, master: str, slave: str, n: int, i: int) -> SecretBytes:
        return SecretBytes(_shake(b"qgw static key", *self._parts(master, slave, n, i), n=n))

    async def enc_keys(
        self, slave_sae_id: str, number: int = 1, size_bits: int | None = None
    ) -> list[QkdKey]:
        size = self.key_size_bits if size_bits is None else size_bits
        check_request(number, size)
        n = size // 8
        if n > MAX_KEY_BYTES:
            raise ValueError("size_bits too large")
        self.counters.requests += 1
        self.counters.attempts += 1
        i0 = self._next.get(slave_sae_id, self._start)
        if i0 + number > 2**32:
            err = KeyNotFound("static source: key index space exhausted")
            self.counters.count_error(err)
            raise err
        self._next[slave_sae_id] = i0 + number
        keys = [
            QkdKey(
                self._key_id(self.sae_id, slave_sae_id, n, i),
                self._key(self.sae_id, slave_sae_id, n, i),
            )
            for i in range(i0, i0 + number)
        ]
        self.counters.count_keys(keys)
        return keys

    def _locate(self, master: str, key_id: str) -> tuple[int, int] | None:
        canon = canonical_key_id(key_id)
        if canon is None:
            return None
        raw = uuid.UUID(canon).bytes
        n, i = struct.unpack(">HI", raw[10:])
        if n == 0 or not hmac.compare_digest(self._key_id(master, self.sae_id, n, i), canon):
            return None
        return n, i

    async def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        if not key_ids:
            raise ValueError("dec_keys needs at least one key ID")
        self.counters.requests += 1
        self.counters.attempts += 1
        found: list[tuple[int, int]] = []
        for kid in key_ids:
            loc = self._locate(master_sae_id, kid)
            if loc is None or (master_sae_id, *loc) in self._delivered or loc in found:
                err = KeyNotFound("dec_keys: One or more keys specified are not found on KME")
                self.counters.count_error(err)
                raise err
            found.append(loc)
        keys = []
        for n, i in found:
            self._delivered.add((master_sae_id, n, i))
            keys.append(
                QkdKey(
                    self._key_id(master_sae_id, self.sae_id, n, i),
                    self._key(master_sae_id, self.sae_id, n, i),
                )
            )
        self.counters.count_keys(keys)
        return keys

    async def status(self, peer_sae_id: str) -> KeyStatus:
        self.counters.requests += 1
        return KeyStatus(
            source_KME_ID="static",
            target_KME_ID="static",
            master_SAE_ID=self.sae_id,
            slave_SAE_ID=peer_sae_id,
            key_size=self.key_size_bits,
            stored_key_count=2**31,
            max_key_count=2**31,
            max_key_per_request=1024,
            max_key_size=MAX_KEY_BYTES * 8,
            min_key_size=8,
            max_SAE_ID_count=0,
            status_extension={"qgw_static": True},
        )

    async def aclose(self) -> None:
        self._seed.wipe()
