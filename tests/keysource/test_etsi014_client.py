"""The ETSI 014 client against a scripted fake KME over real mutual TLS: status mapping,
bounded back-off, answer validation at the client boundary, URL encoding, connection reuse."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.errors import KeyExhausted, KeyNotFound, KmeBadAnswer, KmeUnauthorized, KmeUnavailable
from keysource.etsi014 import Etsi014Client, RetryPolicy, classify
from keysource.tls import client_context, server_context
from tests.support.kme import KmeSetup, write_kme_setup

pytestmark = pytest.mark.timeout(60)


@dataclass
class Script:
    """Answers the fake KME gives, one per request (the last one repeats)."""

    answers: list[tuple[int, bytes]] = field(default_factory=list)
    seen: list[tuple[str, str, Any]] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)


@dataclass
class Fake:
    script: Script
    url: str
    setup: KmeSetup
    sleeps: list[float]

    def client(self, policy: RetryPolicy | None = None, **kw: Any) -> Etsi014Client:
        cert, key = self.setup.sae("sae-a")

        async def sleep(d: float) -> None:
            self.sleeps.append(d)

        return Etsi014Client(
            self.url,
            "sae-a",
            client_context(cert, key, self.setup.ca),
            retry=policy
            or RetryPolicy(base_seconds=0.01, cap_seconds=0.05, deadline_seconds=5, max_attempts=5),
            sleep=sleep,
            **kw,
        )


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Fake]:
    setup = write_kme_setup(tmp_path, zero_ports=True)
    script = Script()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        script.seen.append((request.method, request.raw_path, json.loads(body) if body else None))
        script.peers.add(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        i = min(len(script.seen) - 1, len(script.answers) - 1)
        status, data = script.answers[i]
        return web.Response(status=status, body=data, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sec = setup.config.kme_a
    site = web.TCPSite(
        runner, "127.0.0.1", 0, ssl_context=server_context(sec.cert, sec.key, sec.ca)
    )
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Fake(script, f"https://127.0.0.1:{port}", setup, [])
    finally:
        await runner.cleanup()


def keys_body(*ids: str, nbytes: int = 32) -> bytes:
    return json.dumps(
        {"keys": [{"key_ID": i, "key": base64.b64encode(b"\x07" * nbytes).decode()} for i in ids]}
    ).encode()


ERR = json.dumps({"message": "keys are exhausted"}).encode()


async def test_enc_keys_post_body_and_url_encoding(fake: Fake) -> None:
    kid = str(uuid.uuid4())
    fake.script.answers = [(200, keys_body(kid))]
    c = fake.client()
    try:
        keys = await c.enc_keys("sae b/../x?", number=1, size_bits=256)
    finally:
        await c.aclose()
    assert keys[0].key_id == kid
    method, path, body = fake.script.seen[0]
    assert (method, path) == ("POST", "/api/v1/keys/sae%20b%2F..%2Fx%3F/enc_keys")
    assert body == {"number": 1, "size": 256}


async def test_503_is_retried_with_bounded_jittered_backoff_then_succeeds(fake: Fake) -> None:
    kid = str(uuid.uuid4())
    fake.script.answers = [(503, ERR), (503, ERR), (200, keys_body(kid))]
    c = fake.client()
    try:
        keys = await c.enc_keys("sae-b")
    finally:
        await c.aclose()
    assert [k.key_id for k in keys] == [kid]
    assert c.counters.attempts == 3
    assert c.counters.retries == 2
    assert len(fake.sleeps) == 2
    assert all(0 <= d <= 0.05 for d in fake.sleeps)
    assert len(fake.script.peers) == 1  # one kept-alive connection for all attempts


async def test_retries_stop_at_max_attempts_with_the_last_error(fake: Fake) -> None:
    fake.script.answers = [(503, ERR)]
    c = fake.client()
    try:
        with pytest.raises(KeyExhausted, match="keys are exhausted"):
            await c.enc_keys("sae-b")
        with pytest.raises(KmeUnavailable, match="503"):
            await c.status("sae-b")
    finally:
        await c.aclose()
    assert len(fake.script.seen) == 10  # 5 attempts each
    assert c.counters.errors_exhausted == 1
    assert c.counters.errors_unavailable == 1


async def test_retries_stop_at_the_deadline(fake: Fake) -> None:
    fake.script.answers = [(500, b"")]
    t = [0.0]

    def clock() -> float:
        t[0] += 0.4  # every look at the clock costs 0.4 s of fake time
        return t[0]

    c = fake.client(
        RetryPolicy(base_seconds=0.01, cap_seconds=0.05, deadline_seconds=2.0, max_attempts=100),
        clock=clock,
        rand=lambda: 1.0,
    )
    try:
        with pytest.raises(KmeUnavailable):
            await c.status("sae-b")
    finally:
        await c.aclose()
    assert 1 <= len(fake.script.seen) <= 3


@pytest.mark.parametrize(
    ("op", "status", "error"),
    [
        ("dec_keys", 400, KeyNotFound),
        ("dec_keys", 404, KeyNotFound),
        ("enc_keys", 401, KmeUnauthorized),
        ("dec_keys", 401, KmeUnauthorized),
        ("enc_keys", 422, KmeBadAnswer),
        ("enc_keys", 302, KmeBadAnswer),
        ("status", 400, KmeBadAnswer),
    ],
)
async def test_never_retried(fake: Fake, op: str, status: int, error: type[Exception]) -> None:
    fake.script.answers = [(status, b"" if status == 401 else ERR)]
    c = fake.client()
    calls = {
        "enc_keys": lambda: c.enc_keys("sae-b"),
        "dec_keys": lambda: c.dec_keys("sae-b", [str(uuid.uuid4())]),
        "status": lambda: c.status("sae-b"),
    }
    try:
        with pytest.raises(error):
            await calls[op]()
    finally:
        await c.aclose()
    assert len(fake.script.seen) == 1
    assert c.counters.retries == 0


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"not json", "not UTF-8 JSON"),
        (json.dumps({"keys": [{"key_ID": "x", "key": "AAAA"}]}).encode(), "not a UUID"),
        (keys_body(str(uuid.uuid4()), nbytes=16), "128 bits, 256 bits"),
        (json.dumps({"keys": [{"key_ID": str(uuid.uuid4()), "key": "!!"}]}).encode(), "base64"),
        (keys_body(str(uuid.uuid4()), str(uuid.uuid4())), "2 keys, 1 were requested"),
        (json.dumps({"kees": []}).encode(), "'keys' is missing"),
    ],
)
async def test_bad_enc_answers_are_bad_answer_not_retried(
    fake: Fake, answer: bytes, match: str
) -> None:
    fake.script.answers = [(200, answer)]
    c = fake.client()
    try:
        with pytest.raises(KmeBadAnswer, match=match):
            await c.enc_keys("sae-b")
    finally:
        await c.aclose()
    assert len(fake.script.seen) == 1
    assert c.counters.errors_bad_answer == 1


async def test_dec_answer_with_other_ids_is_bad_answer(fake: Fake) -> None:
    asked, other = str(uuid.uuid4()), str(uuid.uuid4())
    fake.script.answers = [(200, keys_body(other)), (200, keys_body(asked, other))]
    c = fake.client()
    try:
        with pytest.raises(KmeBadAnswer, match="IDs differ"):
            await c.dec_keys("sae-b", [asked])
        with pytest.raises(KmeBadAnswer, match="IDs differ"):
            await c.dec_keys("sae-b", [asked])
    finally:
        await c.aclose()
    assert fake.script.seen[0][2] == {"key_IDs": [{"key_ID": asked}]}


async def test_status_answer_missing_a_field_is_bad_answer(fake: Fake) -> None:
    fake.script.answers = [(200, json.dumps({"source_KME_ID": "A"}).encode())]
    c = fake.client()
    try:
        with pytest.raises(KmeBadAnswer, match="missing field"):
            await c.status("sae-b")
    finally:
        await c.aclose()


async def test_unreachable_kme_is_unavailable_after_bounded_retries(fake: Fake) -> None:
    from gateway.initdemo import free_ports

    cert, key = fake.setup.sae("sae-a")
    c = Etsi014Client(
        f"https://127.0.0.1:{free_ports(1)[0]}",
        "sae-a",
        client_context(cert, key, fake.setup.ca),
        retry=RetryPolicy(
            base_seconds=0.001, cap_seconds=0.002, deadline_seconds=2, max_attempts=3
        ),
    )
    try:
        with pytest.raises(KmeUnavailable, match="unreachable"):
            await c.enc_keys("sae-b")
    finally:
        await c.aclose()
    assert c.counters.attempts == 3


def test_backoff_delay_is_bounded_and_grows() -> None:
    p = RetryPolicy(base_seconds=0.05, cap_seconds=1.0)
    top = [p.delay(n, lambda: 1.0) for n in range(200)]
    assert top[:3] == [0.05, 0.1, 0.2]
    assert max(top) == 1.0
    assert all(p.delay(n, lambda: 0.0) == 0.0 for n in range(5))


def test_classify_table() -> None:
    assert classify("enc_keys", 200, b"") is None
    r = classify("enc_keys", 400, b'{"message":"no keys"}')
    assert r is not None
    assert r.retry
    assert isinstance(r.error, KeyExhausted)
    assert "no keys" in str(r.error)
    r = classify("dec_keys", 503, b"")
    assert r is not None
    assert r.retry
    assert isinstance(r.error, KmeUnavailable)


def test_only_https_urls() -> None:
    import ssl

    with pytest.raises(ValueError, match="https"):
        Etsi014Client("http://127.0.0.1:1", "sae-a", ssl.create_default_context())
