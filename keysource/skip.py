"""Cisco SKIP (Secure Key Integration Protocol, draft-cisco-skip) client behind ``KeySource``.

SKIP has the ETSI 014 shape with other names (docs/keysource.md §8 has the tables and the
draft sections it relies on):

- initiator (our ``enc_keys``): ``GET /key?remoteSystemID=<peer>[&size=<bits>]`` -> one key,
  ``{"keyId": "<hex>", "key": "<hex>"}``; ``number`` keys are ``number`` requests.
- responder (our ``dec_keys``): ``GET /key/{keyId}?remoteSystemID=<initiator>`` per key ID.
- ``GET /capabilities`` -> ``{"entropy", "key", "algorithm", "localSystemID",
  "remoteSystemID": [...]}`` (our ``status``); ``GET /entropy?minentropy=<bits>`` ->
  ``{"randomStr": "<hex>", "minentropy": <bits>}`` (:meth:`SkipClient.entropy`).

Key IDs: qgw carries a QKD key ID as 16 bytes on the wire (docs/protocol.md), so a SKIP
``keyId`` must be exactly 128 bits, 32 hex digits; it maps to the canonical UUID form of those
16 bytes (``QkdKey.key_id``) and back. A key provider with longer or shorter key IDs is refused
(``KmeBadAnswer``), never truncated.

Validation is as strict as the ETSI 014 client's: UTF-8 JSON object with no repeated member
names, required fields of the right types, strict hex, every key exactly the requested size,
the answer's ``keyId`` equal to the one asked for, no key ID or key twice within one call, no
key ID this client has already handed out (the last :data:`REMEMBERED_KEY_IDS`), answers at most
:data:`MAX_ANSWER_BYTES`. Transport, mutual TLS, retries, back-off and counters are those of
:class:`keysource.etsi014.Etsi014Client` (this class only changes paths, status mapping and
decoding); see :func:`classify`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

from gateway.errors import KeyExhausted, KeyNotFound, KmeBadAnswer, KmeUnauthorized, KmeUnavailable
from gateway.secret import SecretBytes
from keysource.base import KeyStatus, QkdKey, canonical_key_id, check_request
from keysource.etsi014 import Etsi014Client, _Attempt
from keysource.tls import client_context
from keysource.wire import parse_error_message

log = logging.getLogger("qgw.keysource.skip")

MAX_ANSWER_BYTES = 64 * 1024  # one key of at most 8192 bits is 2 KiB of hex
REMEMBERED_KEY_IDS = 65536  # IDs this client handed out; a KP that repeats one is refused
_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
_KEY_ID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


# --- key IDs -----------------------------------------------------------------------------------


def skip_key_id(key_id: str) -> str:
    """Our canonical UUID key ID -> the SKIP ``keyId`` (32 lowercase hex digits, same 16 bytes)."""
    canon = canonical_key_id(key_id)
    if canon is None:
        raise ValueError("not a canonical key ID")
    return canon.replace("-", "")


def key_id_from_skip(value: object) -> str | None:
    """A SKIP ``keyId`` -> canonical UUID form, or None unless it is exactly 32 hex digits."""
    if not isinstance(value, str) or not _KEY_ID_RE.match(value):
        return None
    v = value.lower()
    return f"{v[:8]}-{v[8:12]}-{v[12:16]}-{v[16:20]}-{v[20:]}"


# --- decoders (raise KmeBadAnswer and nothing else) --------------------------------------------


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise KmeBadAnswer(f"member {k!r} appears twice")
        out[k] = v
    return out


def load_object(body: bytes, what: str) -> dict[str, Any]:
    """A UTF-8 JSON object without repeated member names, at most MAX_ANSWER_BYTES."""
    if len(body) > MAX_ANSWER_BYTES:
        raise KmeBadAnswer(f"{what}: answer larger than {MAX_ANSWER_BYTES} bytes")
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_repeats)
    except KmeBadAnswer as exc:
        raise KmeBadAnswer(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise KmeBadAnswer(f"{what}: answer is not UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise KmeBadAnswer(f"{what}: answer is not a JSON object")
    return obj


def _hex_bytes(value: object, bits: int, what: str) -> bytes:
    if not isinstance(value, str):
        raise KmeBadAnswer(f"{what} is not a string")
    if not _HEX_RE.match(value) or len(value) % 2:
        raise KmeBadAnswer(f"{what} is not hexadecimal")
    if len(value) * 4 != bits:
        raise KmeBadAnswer(f"{what} is {len(value) * 4} bits, {bits} bits were requested")
    return bytes.fromhex(value)


def parse_key(body: bytes, size_bits: int, expected_id: str | None = None) -> QkdKey:
    """Decode a Get key answer ``{"keyId": hex128, "key": hex}``; ``expected_id``: the ID asked."""
    obj = load_object(body, "key")
    if "keyId" not in obj or "key" not in obj:
        raise KmeBadAnswer("key: answer lacks keyId or key")
    kid = key_id_from_skip(obj["keyId"])
    if kid is None:
        raise KmeBadAnswer("key: keyId is not a 128-bit hex identifier (32 hex digits)")
    if expected_id is not None and kid != expected_id:
        raise KmeBadAnswer("key: the answer's keyId is not the one requested")
    return QkdKey(kid, SecretBytes(_hex_bytes(obj["key"], size_bits, "key: key")))


@dataclass(frozen=True, slots=True)
class SkipCapabilities:
    """The Get capabilities answer (draft-cisco-skip, capabilities method)."""

    entropy: bool
    key: bool
    algorithm: str
    local_system_id: str
    remote_system_ids: tuple[str, ...]
    extension: dict[str, Any] | None  # the simulator's "qgw_simulator" object, if any


def parse_capabilities(body: bytes) -> SkipCapabilities:
    obj = load_object(body, "capabilities")
    for f, t in (("entropy", bool), ("key", bool), ("algorithm", str), ("localSystemID", str)):
        if not isinstance(obj.get(f), t):
            raise KmeBadAnswer(f"capabilities: {f} is missing or not a {t.__name__}")
    remote = obj.get("remoteSystemID")
    if not isinstance(remote, list) or not all(isinstance(r, str) for r in remote):
        raise KmeBadAnswer("capabilities: remoteSystemID is missing or not a list of strings")
    ext = obj.get("qgw_simulator")
    if ext is not None and not isinstance(ext, dict):
        raise KmeBadAnswer("capabilities: qgw_simulator is not an object")
    return SkipCapabilities(
        obj["entropy"], obj["key"], obj["algorithm"], obj["localSystemID"], tuple(remote), ext
    )


def parse_entropy(body: bytes, min_bits: int) -> SecretBytes:
    obj = load_object(body, "entropy")
    bits = obj.get("minentropy")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits != min_bits:
        raise KmeBadAnswer("entropy: minentropy is missing or not the requested size")
    return SecretBytes(_hex_bytes(obj.get("randomStr"), min_bits, "entropy: randomStr"))


# --- status codes ------------------------------------------------------------------------------


def classify(op: str, status: int, body: bytes) -> _Attempt | None:
    """None for 200; otherwise the typed error and whether to retry (docs/keysource.md §SKIP).

    ``op``: ``enc_keys`` (GET /key), ``dec_keys`` (GET /key/{keyId}), ``status``, ``entropy``.
    Retried: 429, 5xx (503 on GET /key is "no key now": ``KeyExhausted``). Never retried:
    401/403, 400/404 (on GET /key/{keyId}: ``KeyNotFound``; elsewhere a request the KP will
    not serve), 405, anything else.
    """
    if status == 200:
        return None
    msg = parse_error_message(body)
    what = f"{op}: key provider answered {status}" + (f" ({msg})" if msg else "")
    if status in (401, 403):
        return _Attempt(KmeUnauthorized(f"{op}: the key provider refused our identity"), False)
    if status in (400, 404):
        if op == "dec_keys":
            return _Attempt(KeyNotFound(what), False)
        return _Attempt(KmeBadAnswer(what), False)
    if status == 503 and op == "enc_keys":
        return _Attempt(KeyExhausted(what), True)
    if status in (429, 500, 502, 503, 504):
        return _Attempt(KmeUnavailable(what), True)
    return _Attempt(KmeBadAnswer(what), False)


# --- the client --------------------------------------------------------------------------------


class SkipClient(Etsi014Client):
    """KeySource over SKIP (see module docstring). ``sae_id``: our system's name (status only);
    the peer ID passed to enc_keys/dec_keys is the SKIP ``remoteSystemID``."""

    _classify = staticmethod(classify)
    _max_answer_bytes = MAX_ANSWER_BYTES

    def __init__(self, kme_url: str, sae_id: str, *args: Any, **kwargs: Any) -> None:
        if not kme_url.startswith("https://"):
            raise ValueError("kme_url must be an https:// URL (SKIP runs over TLS)")
        super().__init__(kme_url, sae_id, *args, **kwargs)
        self._handed_out: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_settings(cls, qkd: Any) -> SkipClient:
        """From a ``gateway.config.QkdSection`` (source = skip)."""
        if qkd.cert is None or qkd.key is None or qkd.ca is None:
            raise ValueError("qkd.cert, qkd.key and qkd.ca are required for skip")
        return cls(
            qkd.kme_url,
            qkd.sae_id,
            client_context(qkd.cert, qkd.key, qkd.ca),
            key_size_bits=qkd.key_size_bits,
            timeout_seconds=qkd.timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"SkipClient({self.base_url!r}, system={self.sae_id!r})"

    def _skip_url(self, path: str, **query: str | int) -> str:
        return f"{self.base_url}{path}" + (f"?{urlencode(query)}" if query else "")

    def _remember(self, keys: Sequence[QkdKey]) -> None:
        for k in keys:
            self._handed_out[k.key_id] = None
        self._trim()

    def _trim(self) -> None:
        while len(self._handed_out) > REMEMBERED_KEY_IDS:
            self._handed_out.popitem(last=False)

    def _fail(self, err: KmeBadAnswer | KeyNotFound) -> NoReturn:
        self.counters.count_error(err)
        if isinstance(err, KmeBadAnswer):
            log.warning("malformed key provider answer: %s", err)
        raise err

    async def enc_keys(
        self, slave_sae_id: str, number: int = 1, size_bits: int | None = None
    ) -> list[QkdKey]:
        """``number`` GETs of ``/key`` (SKIP hands out one key per request). Not all-or-nothing:
        if request i fails, the keys of requests before it are consumed and dropped here."""
        size = self.key_size_bits if size_bits is None else size_bits
        check_request(number, size)
        url = self._skip_url("/key", remoteSystemID=slave_sae_id, size=size)
        keys: list[QkdKey] = []
        for _ in range(number):
            data = await self._call("enc_keys", "GET", url, None)
            k = self._validated(partial(parse_key, data, size))
            # Checked and remembered before the next await: concurrent calls see it too.
            if k.key_id in self._handed_out:
                self._fail(KmeBadAnswer("key: the key provider repeated a key ID"))
            self._remember([k])
            if any(k.key == o.key for o in keys):
                self._fail(KmeBadAnswer("key: the key provider repeated a key"))
            keys.append(k)
        self.counters.count_keys(keys)
        return keys

    async def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        """One GET of ``/key/{keyId}`` per ID, in order. Not all-or-nothing as in ETSI 014: if
        one ID fails, the keys fetched before it in this call are consumed and dropped here."""
        if not key_ids:
            raise ValueError("dec_keys needs at least one key ID")
        canon = [canonical_key_id(k) for k in key_ids]
        ids = [c for c in canon if c is not None]
        if len(ids) != len(canon) or len(set(ids)) != len(ids):
            self._fail(KeyNotFound("dec_keys: a requested key ID is not a UUID or is repeated"))
        if any(i in self._handed_out for i in ids):
            self._fail(KeyNotFound("dec_keys: a requested key ID was already delivered here"))
        for i in ids:  # in flight: a concurrent call for the same ID is refused
            self._handed_out[i] = None
        keys: list[QkdKey] = []
        for n, kid in enumerate(ids):
            path = f"/key/{quote(skip_key_id(kid), safe='')}"
            url = self._skip_url(path, remoteSystemID=master_sae_id)
            try:
                data = await self._call("dec_keys", "GET", url, None)
            except BaseException:
                for later in ids[n:]:  # not delivered: a later call may ask for them again
                    self._handed_out.pop(later, None)
                raise
            try:
                keys.append(self._validated(partial(parse_key, data, self.key_size_bits, kid)))
            except KmeBadAnswer:
                for later in ids[n + 1 :]:  # `kid` was answered with 200: it stays spent
                    self._handed_out.pop(later, None)
                raise
        self._trim()
        self.counters.count_keys(keys)
        return keys

    async def capabilities(self) -> SkipCapabilities:
        data = await self._call("status", "GET", self._skip_url("/capabilities"), None)
        return self._validated(lambda: parse_capabilities(data))

    async def status(self, peer_sae_id: str) -> KeyStatus:
        """SKIP has no status method: the capabilities, mapped onto ETSI 014 Table 9.

        ``stored_key_count`` is known only from a simulator's ``qgw_simulator`` extension
        (``status_extension["stored_key_count_known"]`` says which); SKIP serves one key of the
        configured size per request.
        """
        caps = await self.capabilities()
        ext = caps.extension or {}
        count = ext.get("stored_key_count")
        known = isinstance(count, int) and not isinstance(count, bool) and count >= 0
        size = self.key_size_bits
        return KeyStatus(
            source_KME_ID=caps.local_system_id,
            target_KME_ID=peer_sae_id,
            master_SAE_ID=self.sae_id,
            slave_SAE_ID=peer_sae_id,
            key_size=size,
            stored_key_count=count if known and isinstance(count, int) else 0,
            max_key_count=0,
            max_key_per_request=1,
            max_key_size=size,
            min_key_size=size,
            max_SAE_ID_count=0,
            status_extension={
                "skip": {
                    "entropy": caps.entropy,
                    "key": caps.key,
                    "algorithm": caps.algorithm,
                    "localSystemID": caps.local_system_id,
                    "remoteSystemID": list(caps.remote_system_ids),
                    "peer_listed": peer_sae_id in caps.remote_system_ids,
                },
                "stored_key_count_known": known,
                **({"qgw_simulator": caps.extension} if caps.extension is not None else {}),
            },
        )

    async def entropy(self, min_bits: int = 256) -> SecretBytes:
        """``GET /entropy?minentropy=`` (random bytes from the key provider, not a shared key)."""
        check_request(1, min_bits)
        url = self._skip_url("/entropy", minentropy=min_bits)
        data = await self._call("entropy", "GET", url, None)
        return self._validated(lambda: parse_entropy(data, min_bits))
