"""ETSI GS QKD 014 v1.1.1 client (aiohttp, mutual TLS).

- One ``aiohttp.ClientSession`` (one connector, keep-alive) per client, made on first use.
- TLS: our SAE certificate and key, only the configured CA trusted, TLS >= 1.2, host name of
  ``kme_url`` checked against the KME certificate (keysource.tls.client_context).
- Requests: ``POST /api/v1/keys/{slave}/enc_keys`` with ``{"number", "size"}``,
  ``POST /api/v1/keys/{master}/dec_keys`` with ``{"key_IDs": [...]}``, ``GET .../status``. SAE
  IDs are percent-encoded as one path segment.
- Every answer is validated (keysource.wire): JSON object, required fields, UUID key IDs,
  strict base64, key length = requested size, exactly the requested number or IDs.
- Retries: transient conditions (timeouts, connection errors, 5xx, 429, and on enc_keys also
  400/404 because the standard assigns no code to exhaustion) are retried with full-jitter
  exponential back-off, bounded by ``RetryPolicy.max_attempts`` and ``deadline_seconds``.
  Never retried: 401, dec_keys 400/404 (``KeyNotFound``), 422, malformed answers, TLS
  verification failures.
- Key bytes are never logged; only method, path, status and latency at debug level.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp

from gateway.errors import (
    KeyExhausted,
    KeyNotFound,
    KeySourceError,
    KmeBadAnswer,
    KmeUnauthorized,
    KmeUnavailable,
)
from keysource import wire
from keysource.base import KeySourceCounters, KeyStatus, QkdKey, canonical_key_id, check_request
from keysource.tls import client_context

log = logging.getLogger("qgw.keysource.etsi014")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential back-off with full jitter (AWS architecture blog, 2015)."""

    base_seconds: float = 0.05
    cap_seconds: float = 1.0
    deadline_seconds: float = 10.0  # total for one call, retries included
    max_attempts: int = 8

    def delay(self, retry_index: int, rand: Callable[[], float]) -> float:
        """Sleep before retry number ``retry_index`` (0-based): uniform in [0, min(cap, base*2^n)]."""
        return float(rand()) * min(
            self.cap_seconds, self.base_seconds * 2.0 ** min(retry_index, 30)
        )


class _Attempt:
    """The outcome of one attempt that failed: the error and whether to try again."""

    __slots__ = ("error", "retry")

    def __init__(self, error: KeySourceError, retry: bool) -> None:
        self.error = error
        self.retry = retry


def classify(op: str, status: int, body: bytes) -> _Attempt | None:
    """None for 200; otherwise the typed error and whether it is worth retrying."""
    if status == 200:
        return None
    msg = wire.parse_error_message(body)
    what = f"{op}: KME answered {status}" + (f" ({msg})" if msg else "")
    if status == 401:
        return _Attempt(KmeUnauthorized(f"{op}: the KME refused our SAE identity (401)"), False)
    if status in (400, 404):
        if op == "dec_keys":
            return _Attempt(KeyNotFound(what), False)
        if op == "enc_keys":
            return _Attempt(KeyExhausted(what), True)
        return _Attempt(KmeBadAnswer(what), False)
    if status == 422:
        return _Attempt(KmeBadAnswer(what), False)
    if status == 503 and op == "enc_keys":
        return _Attempt(KeyExhausted(what), True)
    if status in (429, 500, 502, 503, 504):
        return _Attempt(KmeUnavailable(what), True)
    return _Attempt(KmeBadAnswer(what), False)


class Etsi014Client:
    """KeySource over ETSI GS QKD 014 (see module docstring)."""

    #: status code -> typed error and retry decision; the SKIP client (keysource.skip) swaps it.
    _classify = staticmethod(classify)
    #: largest answer body read; a longer one is KmeBadAnswer, and reading stops there
    _max_answer_bytes = wire.MAX_ANSWER_BYTES

    def __init__(
        self,
        kme_url: str,
        sae_id: str,
        ssl_context: ssl.SSLContext,
        *,
        key_size_bits: int = 256,
        timeout_seconds: float = 5.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(kme_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("kme_url must be an https:// URL (ETSI GS QKD 014 requires TLS)")
        check_request(1, key_size_bits)
        self.base_url = kme_url.rstrip("/")
        self.sae_id = sae_id
        self.key_size_bits = key_size_bits
        self.timeout_seconds = timeout_seconds
        self.retry = retry or RetryPolicy(deadline_seconds=3 * timeout_seconds)
        self.counters = KeySourceCounters()
        self._ssl = ssl_context
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, qkd: Any) -> Etsi014Client:
        """From a ``gateway.config.QkdSection`` (source = etsi014)."""
        if qkd.cert is None or qkd.key is None or qkd.ca is None:
            raise ValueError("qkd.cert, qkd.key and qkd.ca are required for etsi014")
        ctx = client_context(qkd.cert, qkd.key, qkd.ca)
        return cls(
            qkd.kme_url,
            qkd.sae_id,
            ctx,
            key_size_bits=qkd.key_size_bits,
            timeout_seconds=qkd.timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"Etsi014Client({self.base_url!r}, sae_id={self.sae_id!r})"

    # --- transport ----------------------------------------------------------------------------

    def _sess(self) -> aiohttp.ClientSession:
        if self._closed:
            raise KmeUnavailable("the KME client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32, keepalive_timeout=30),
                headers={"Accept": "application/json"},
            )
        return self._session

    def _url(self, sae: str, op: str) -> str:
        return f"{self.base_url}/api/v1/keys/{quote(sae, safe='')}/{op}"

    async def _once(
        self, method: str, url: str, body: Any, timeout: float
    ) -> tuple[int, bytes] | _Attempt:
        try:
            async with self._sess().request(
                method, url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                declared = resp.content_length
                limit = self._max_answer_bytes
                if declared is not None and declared > limit:
                    return _Attempt(KmeBadAnswer("answer too large"), False)
                data = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    data += chunk
                    if len(data) > limit:
                        return _Attempt(KmeBadAnswer("answer too large"), False)
                return resp.status, bytes(data)
        except aiohttp.ClientConnectorCertificateError as exc:
            log.debug("KME certificate verification failed: %s", exc.certificate_error)
            err = KmeUnavailable("TLS: the KME's certificate did not verify against qkd.ca")
            return _Attempt(err, False)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return _Attempt(KmeUnavailable(f"KME timed out after {timeout:.1f} s"), True)
        except (aiohttp.ClientError, OSError) as exc:
            return _Attempt(KmeUnavailable(f"KME unreachable ({type(exc).__name__})"), True)

    async def _call(self, op: str, method: str, url: str, body: Any) -> bytes:
        """One logical call with bounded retries; returns the 200 body or raises."""
        self.counters.requests += 1
        policy = self.retry
        start = self._clock()
        retries = 0
        last: KeySourceError = KmeUnavailable(f"{op}: deadline reached before any attempt")
        while True:
            remaining = policy.deadline_seconds - (self._clock() - start)
            if remaining <= 0:
                break
            self.counters.attempts += 1
            t0 = self._clock()
            out = await self._once(method, url, body, min(self.timeout_seconds, remaining))
            self.counters.last_latency_seconds = self._clock() - t0
            if isinstance(out, tuple):
                status, data = out
                log.debug("%s %s -> %d", method, url.removeprefix(self.base_url), status)
                failed = self._classify(op, status, data)
                if failed is None:
                    return data
            else:
                failed = out
                log.debug("%s %s failed: %s", method, url.removeprefix(self.base_url), out.error)
            last = failed.error
            if not failed.retry or retries + 1 >= policy.max_attempts:
                break
            delay = policy.delay(retries, self._rand)
            if (self._clock() - start) + delay >= policy.deadline_seconds:
                break
            retries += 1
            self.counters.retries += 1
            await self._sleep(delay)
        self.counters.count_error(last)
        raise last

    # --- KeySource ----------------------------------------------------------------------------

    async def enc_keys(
        self, slave_sae_id: str, number: int = 1, size_bits: int | None = None
    ) -> list[QkdKey]:
        size = self.key_size_bits if size_bits is None else size_bits
        check_request(number, size)
        body = {"number": number, "size": size}
        data = await self._call("enc_keys", "POST", self._url(slave_sae_id, "enc_keys"), body)
        keys = self._validated(lambda: wire.parse_key_container(data, size, number=number))
        self.counters.count_keys(keys)
        return keys

    async def dec_keys(self, master_sae_id: str, key_ids: Sequence[str]) -> list[QkdKey]:
        if not key_ids:
            raise ValueError("dec_keys needs at least one key ID")
        canon = [canonical_key_id(k) for k in key_ids]
        if any(c is None for c in canon) or len(set(canon)) != len(canon):
            err = KeyNotFound("dec_keys: a requested key ID is not a UUID or is repeated")
            self.counters.count_error(err)
            raise err
        ids = [c for c in canon if c is not None]
        body = {"key_IDs": [{"key_ID": k} for k in ids]}
        data = await self._call("dec_keys", "POST", self._url(master_sae_id, "dec_keys"), body)
        keys = self._validated(
            lambda: wire.parse_key_container(data, self.key_size_bits, expected_ids=ids)
        )
        self.counters.count_keys(keys)
        return keys

    async def status(self, peer_sae_id: str) -> KeyStatus:
        data = await self._call("status", "GET", self._url(peer_sae_id, "status"), None)
        return self._validated(lambda: wire.parse_status(data))

    def _validated(self, parse: Callable[[], _T]) -> _T:
        try:
            return parse()
        except KmeBadAnswer as exc:
            self.counters.count_error(exc)
            log.warning("malformed KME answer: %s", exc)
            raise

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
