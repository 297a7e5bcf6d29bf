"""The SKIP client against a scripted fake key provider over real mutual TLS: paths and query
strings, status mapping and back-off, strict answer validation (typed errors and counters),
forged and reused key IDs, capabilities and entropy."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import KeyExhausted, KeyNotFound, KmeBadAnswer, KmeUnauthorized, KmeUnavailable
from keysource.etsi014 import RetryPolicy
from keysource.skip import (
    MAX_ANSWER_BYTES,
    SkipClient,
    key_id_from_skip,
    parse_capabilities,
    parse_entropy,
    parse_key,
    skip_key_id,
)
from keysource.tls import client_context, server_context
from tests.support.kme import KmeSetup, write_kme_setup

pytestmark = pytest.mark.timeout(60)

KEY = bytes(range(32))  # 256 bits
KID = "0123456789abcdef0123456789abcdef"
KID_UUID = "01234567-89ab-cdef-0123-456789abcdef"


@dataclass
class Script:
    """Answers the fake key provider gives, one per request (the last one repeats)."""

    answers: list[tuple[int, bytes]] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Fake:
    script: Script
    url: str
    setup: KmeSetup
    sleeps: list[float]

    def client(self) -> SkipClient:
        cert, key = self.setup.sae("sae-a")

        async def sleep(d: float) -> None:
            self.sleeps.append(d)

        policy = RetryPolicy(
            base_seconds=0.01, cap_seconds=0.05, deadline_seconds=5, max_attempts=4
        )
        return SkipClient(
            self.url, "sae-a", client_context(cert, key, self.setup.ca), retry=policy, sleep=sleep
        )


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Fake]:
    setup = write_kme_setup(tmp_path, zero_ports=True)
    script = Script()

    async def handler(request: web.Request) -> web.Response:
        script.seen.append((request.method, request.raw_path))
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


def key_body(kid: str = KID, key: bytes = KEY, **extra: Any) -> bytes:
    return json.dumps({"keyId": kid, "key": key.hex(), **extra}).encode()


ERR = json.dumps({"message": "no key"}).encode()


async def test_initiator_get_key_path_query_and_id_mapping(fake: Fake) -> None:
    fake.script.answers = [(200, key_body())]
    c = fake.client()
    try:
        keys = await c.enc_keys("sae b&x=1", size_bits=256)
    finally:
        await c.aclose()
    assert [(k.key_id, k.key.expose_secret_bytes()) for k in keys] == [(KID_UUID, KEY)]
    assert fake.script.seen == [("GET", "/key?remoteSystemID=sae+b%26x%3D1&size=256")]
    assert c.counters.keys_delivered == 1
    assert c.counters.bits_delivered == 256


async def test_responder_get_key_by_id(fake: Fake) -> None:
    fake.script.answers = [(200, key_body())]
    c = fake.client()
    try:
        keys = await c.dec_keys("sae-b", [KID_UUID.upper()])
    finally:
        await c.aclose()
    assert keys[0].key_id == KID_UUID
    assert keys[0].key.expose_secret_bytes() == KEY
    assert fake.script.seen == [("GET", f"/key/{KID}?remoteSystemID=sae-b")]


async def test_number_n_is_n_requests(fake: Fake) -> None:
    fake.script.answers = [(200, key_body(uuid.uuid4().hex, bytes([i]) * 32)) for i in range(3)]
    c = fake.client()
    try:
        keys = await c.enc_keys("sae-b", number=3)
    finally:
        await c.aclose()
    assert len(keys) == 3
    assert len(fake.script.seen) == 3


BAD_KEY_ANSWERS = {
    "short key": key_body(key=KEY[:31]),
    "long key": key_body(key=KEY + b"\x00"),
    "odd hex digits": json.dumps({"keyId": KID, "key": KEY.hex()[:-1]}).encode(),
    "key not hex": json.dumps({"keyId": KID, "key": "zz" * 32}).encode(),
    "key base64": json.dumps(
        {"keyId": KID, "key": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}
    ).encode(),
    "key not a string": json.dumps({"keyId": KID, "key": 5}).encode(),
    "no keyId": json.dumps({"key": KEY.hex()}).encode(),
    "no key": json.dumps({"keyId": KID}).encode(),
    "keyId with dashes": key_body(kid=KID_UUID),
    "keyId 192 bits": key_body(kid=KID + "0123456789abcdef"),
    "keyId 64 bits": key_body(kid=KID[:16]),
    "keyId not a string": json.dumps({"keyId": 7, "key": KEY.hex()}).encode(),
    "repeated member": b'{"keyId": "%s", "key": "%s", "key": "%s"}'
    % (KID.encode(), KEY.hex().encode(), KEY.hex().encode()),
    "not an object": json.dumps([{"keyId": KID, "key": KEY.hex()}]).encode(),
    "not JSON": b"<html>hello</html>",
    "not UTF-8": b'{"keyId": "\xff\xfe", "key": "00"}',
    "empty": b"",
    "oversize": b'{"keyId": "' + KID.encode() + b'", "pad": "' + b"a" * MAX_ANSWER_BYTES + b'"}',
}


@pytest.mark.parametrize("case", sorted(BAD_KEY_ANSWERS))
async def test_bad_answer_is_a_typed_error_counted_and_not_retried(fake: Fake, case: str) -> None:
    fake.script.answers = [(200, BAD_KEY_ANSWERS[case])]
    c = fake.client()
    try:
        with pytest.raises(KmeBadAnswer) as err:
            await c.enc_keys("sae-b")
    finally:
        await c.aclose()
    assert c.counters.errors_bad_answer == 1
    assert c.counters.attempts == 1
    assert c.counters.keys_delivered == 0
    assert KEY.hex() not in str(err.value)


async def test_responder_answer_with_another_key_id_is_refused(fake: Fake) -> None:
    fake.script.answers = [(200, key_body(kid=uuid.uuid4().hex))]
    c = fake.client()
    try:
        with pytest.raises(KmeBadAnswer, match="not the one requested"):
            await c.dec_keys("sae-b", [KID_UUID])
    finally:
        await c.aclose()
    assert c.counters.errors_bad_answer == 1


async def test_key_provider_repeating_a_key_id_or_a_key_is_refused(fake: Fake) -> None:
    c = fake.client()
    try:
        fake.script.answers = [(200, key_body())]
        await c.enc_keys("sae-b")
        with pytest.raises(KmeBadAnswer, match="repeated a key ID"):  # same ID, a later call
            await c.enc_keys("sae-b")
        fake.script.seen.clear()
        fake.script.answers = [
            (200, key_body(uuid.uuid4().hex, b"\x01" * 32)),
            (200, key_body(uuid.uuid4().hex, b"\x01" * 32)),
        ]
        with pytest.raises(KmeBadAnswer, match="repeated a key"):  # same bytes, one call
            await c.enc_keys("sae-b", number=2)
    finally:
        await c.aclose()
    assert c.counters.errors_bad_answer == 2


async def test_forged_key_id_is_not_found_and_not_retried(fake: Fake) -> None:
    fake.script.answers = [(404, ERR)]
    c = fake.client()
    try:
        with pytest.raises(KeyNotFound):
            await c.dec_keys("sae-b", [str(uuid.uuid4())])
    finally:
        await c.aclose()
    assert c.counters.attempts == 1
    assert c.counters.errors_not_found == 1


async def test_reused_key_id_is_refused_without_asking(fake: Fake) -> None:
    fake.script.answers = [(200, key_body())]
    c = fake.client()
    try:
        await c.dec_keys("sae-b", [KID_UUID])
        with pytest.raises(KeyNotFound, match="already delivered"):
            await c.dec_keys("sae-b", [KID_UUID])
        with pytest.raises(KeyNotFound):  # not a key ID at all
            await c.dec_keys("sae-b", ["../capabilities"])
        with pytest.raises(KeyNotFound):  # repeated within one call
            await c.dec_keys("sae-b", [str(uuid.UUID(int=5))] * 2)
    finally:
        await c.aclose()
    assert len(fake.script.seen) == 1
    assert c.counters.errors_not_found == 3


async def test_a_key_id_refused_by_the_provider_may_be_asked_again(fake: Fake) -> None:
    fake.script.answers = [(503, ERR), (200, key_body())]
    c = fake.client()
    c.retry = RetryPolicy(max_attempts=1)
    try:
        with pytest.raises(KmeUnavailable):
            await c.dec_keys("sae-b", [KID_UUID])
        assert (await c.dec_keys("sae-b", [KID_UUID]))[0].key_id == KID_UUID
    finally:
        await c.aclose()


async def test_503_on_get_key_is_exhaustion_retried_with_backoff(fake: Fake) -> None:
    fake.script.answers = [(503, ERR), (503, ERR), (200, key_body())]
    c = fake.client()
    try:
        keys = await c.enc_keys("sae-b")
    finally:
        await c.aclose()
    assert keys[0].key_id == KID_UUID
    assert c.counters.retries == 2
    assert len(fake.sleeps) == 2
    assert all(0 <= d <= 0.05 for d in fake.sleeps)
    fake.script.seen.clear()
    fake.script.answers = [(503, ERR)]
    c = fake.client()
    try:
        with pytest.raises(KeyExhausted):
            await c.enc_keys("sae-b")
    finally:
        await c.aclose()
    assert c.counters.attempts == 4  # max_attempts
    assert c.counters.errors_exhausted == 1


@pytest.mark.parametrize(
    ("op", "status", "error", "attempts"),
    [
        ("enc", 401, KmeUnauthorized, 1),
        ("enc", 403, KmeUnauthorized, 1),
        ("enc", 400, KmeBadAnswer, 1),
        ("enc", 500, KmeUnavailable, 4),
        ("enc", 418, KmeBadAnswer, 1),
        ("dec", 400, KeyNotFound, 1),
        ("dec", 404, KeyNotFound, 1),
        ("dec", 401, KmeUnauthorized, 1),
        ("dec", 503, KmeUnavailable, 4),
    ],
)
async def test_status_codes_map_to_typed_errors(
    fake: Fake, op: str, status: int, error: type[Exception], attempts: int
) -> None:
    fake.script.answers = [(status, ERR)]
    c = fake.client()
    try:
        call = c.enc_keys("sae-b") if op == "enc" else c.dec_keys("sae-b", [KID_UUID])
        with pytest.raises(error):
            await call
    finally:
        await c.aclose()
    assert c.counters.attempts == attempts


CAPS = {
    "entropy": True,
    "key": True,
    "algorithm": "qkd",
    "localSystemID": "sae-a",
    "remoteSystemID": ["sae-b"],
}


async def test_status_is_the_capabilities_mapped_onto_table_9(fake: Fake) -> None:
    fake.script.answers = [(200, json.dumps(CAPS).encode())]
    c = fake.client()
    try:
        st = await c.status("sae-b")
    finally:
        await c.aclose()
    assert fake.script.seen == [("GET", "/capabilities")]
    assert (st.master_SAE_ID, st.slave_SAE_ID, st.source_KME_ID) == ("sae-a", "sae-b", "sae-a")
    assert st.max_key_per_request == 1
    assert st.stored_key_count == 0
    assert st.status_extension is not None
    assert st.status_extension["stored_key_count_known"] is False
    assert st.status_extension["skip"]["peer_listed"] is True


@pytest.mark.parametrize(
    "caps",
    [
        {**CAPS, "entropy": "yes"},
        {**CAPS, "remoteSystemID": "sae-b"},
        {**CAPS, "remoteSystemID": [1]},
        {k: v for k, v in CAPS.items() if k != "localSystemID"},
        {**CAPS, "qgw_simulator": []},
    ],
)
async def test_malformed_capabilities_are_refused(fake: Fake, caps: dict[str, Any]) -> None:
    fake.script.answers = [(200, json.dumps(caps).encode())]
    c = fake.client()
    try:
        with pytest.raises(KmeBadAnswer):
            await c.status("sae-b")
    finally:
        await c.aclose()
    assert c.counters.errors_bad_answer == 1


async def test_entropy(fake: Fake) -> None:
    rnd = bytes(range(64))
    fake.script.answers = [(200, json.dumps({"randomStr": rnd.hex(), "minentropy": 512}).encode())]
    c = fake.client()
    try:
        got = await c.entropy(512)
        assert got.expose_secret_bytes() == rnd
        assert fake.script.seen == [("GET", "/entropy?minentropy=512")]
        with pytest.raises(KmeBadAnswer):  # fewer bits than asked
            await c.entropy(1024)
    finally:
        await c.aclose()


def test_key_id_mapping_round_trip_and_refusals() -> None:
    u = str(uuid.uuid4())
    assert key_id_from_skip(skip_key_id(u)) == u
    assert key_id_from_skip(KID.upper()) == KID_UUID
    for bad in (KID_UUID, KID[:-1], KID + "0", "g" * 32, None, 5, " " + KID[1:]):
        assert key_id_from_skip(bad) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_raise_only_the_typed_error(body: bytes) -> None:
    for parse in (
        lambda: parse_key(body, 256),
        lambda: parse_key(body, 256, KID_UUID),
        lambda: parse_capabilities(body),
        lambda: parse_entropy(body, 256),
    ):
        with contextlib.suppress(KmeBadAnswer):
            parse()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["keyId", "key", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=70), st.lists(st.integers())),
    )
)
def test_key_decoder_on_json_objects(obj: dict[str, Any]) -> None:
    with contextlib.suppress(KmeBadAnswer):
        parse_key(json.dumps(obj).encode(), 256)
