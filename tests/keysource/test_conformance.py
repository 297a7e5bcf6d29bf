"""One conformance suite, run against every KeySource: static, simulator in process, and the
ETSI 014 and Cisco SKIP clients talking to the simulator over real mutual TLS on loopback."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import (
    KeyExhausted,
    KeyNotFound,
    KeySourceError,
    KmeUnauthorized,
    KmeUnavailable,
)
from keysource.base import KeySource, KeyStatus, QkdKey
from keysource.wire import STATUS_FIELDS
from tests.keysource.harness import (
    KEYS_PER_SECOND,
    LINK,
    Harness,
    etsi014_harness,
    simulator_harness,
    skip_harness,
    static_harness,
)

pytestmark = pytest.mark.timeout(60)


# The static source has no QKD link; only the ETSI 014 and SKIP clients talk TLS. Those tests
# run against the implementations they apply to (not generated, rather than skipped, for the rest).
WITH_LINK = pytest.mark.parametrize("h", ["simulator", "etsi014", "skip"], indirect=True)
OVER_TLS = pytest.mark.parametrize("h", ["etsi014", "skip"], indirect=True)


@pytest.fixture(params=["static", "simulator", "etsi014", "skip"])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "static":
        harness = static_harness()
    elif request.param == "simulator":
        harness = simulator_harness(tmp_path)
    elif request.param == "etsi014":
        harness = await etsi014_harness(tmp_path)
    else:
        harness = await skip_harness(tmp_path)
    try:
        yield harness
    finally:
        await harness.aclose()


def raw(k: QkdKey) -> bytes:
    return k.key.expose_secret_bytes()


async def drain(src: KeySource, peer: str) -> list[QkdKey]:
    """Take keys until the source says it has none; bounded."""
    got: list[QkdKey] = []
    for _ in range(100):
        try:
            got += await src.enc_keys(peer, number=4)
        except KeyExhausted:
            # The last partial chunk: take single keys until that fails too.
            while True:
                try:
                    got += await src.enc_keys(peer, number=1)
                except KeyExhausted:
                    return got
    raise AssertionError("the pool never ran dry")


async def test_same_key_on_both_sides_for_the_same_id(h: Harness) -> None:
    sent = await h.master.enc_keys("sae-b", number=3)
    assert len(sent) == 3
    assert all(k.size_bits == 256 for k in sent)
    assert all(k.key_id == str(uuid.UUID(k.key_id)) for k in sent)
    got = await h.slave.dec_keys("sae-a", [k.key_id for k in reversed(sent)])
    assert [k.key_id for k in got] == [k.key_id for k in reversed(sent)]
    assert [raw(k) for k in got] == [raw(k) for k in reversed(sent)]
    assert len({raw(k) for k in sent}) == 3


async def test_other_size_and_other_direction(h: Harness) -> None:
    sent = await h.master.enc_keys("sae-b", number=1, size_bits=512)
    assert sent[0].size_bits == 512
    back = await h.slave.enc_keys("sae-a", number=2)
    got = await h.master.dec_keys("sae-b", [k.key_id for k in back])
    assert [raw(k) for k in got] == [raw(k) for k in back]


async def test_a_key_is_delivered_once(h: Harness) -> None:
    sent = await h.master.enc_keys("sae-b", number=2)
    ids = [k.key_id for k in sent]
    await h.slave.dec_keys("sae-a", ids)
    with pytest.raises(KeyNotFound):
        await h.slave.dec_keys("sae-a", ids[:1])
    more = await h.master.enc_keys("sae-b", number=2)
    assert not {k.key_id for k in more} & set(ids)


async def test_16_concurrent_requests_never_share_a_key(h: Harness) -> None:
    results = await asyncio.gather(*(h.master.enc_keys("sae-b") for _ in range(16)))
    keys = [k for r in results for k in r]
    assert len(keys) == 16
    assert len({k.key_id for k in keys}) == 16
    assert len({raw(k) for k in keys}) == 16
    got = await asyncio.gather(*(h.slave.dec_keys("sae-a", [k.key_id]) for k in keys))
    assert [raw(g[0]) for g in got] == [raw(k) for k in keys]


@WITH_LINK
async def test_exhaustion_then_recovery_as_the_link_refills(h: Harness) -> None:
    assert h.has_link
    got = await drain(h.master, "sae-b")
    assert len(got) == LINK["initial_keys"]
    assert (await h.master.status("sae-b")).stored_key_count == 0
    with pytest.raises(KeyExhausted):
        await h.master.enc_keys("sae-b")
    h.advance(1.0)  # the link refills at KEYS_PER_SECOND
    assert (await h.master.status("sae-b")).stored_key_count == KEYS_PER_SECOND
    again = await h.master.enc_keys("sae-b", number=KEYS_PER_SECOND)
    assert len(again) == KEYS_PER_SECOND
    with pytest.raises(KeyExhausted):
        await h.master.enc_keys("sae-b")


async def test_wrong_sae_cannot_take_the_slaves_key(h: Harness) -> None:
    sent = await h.master.enc_keys("sae-b")
    with pytest.raises(h.wrong_sae_error):
        await h.intruder.dec_keys("sae-a", [sent[0].key_id])
    got = await h.slave.dec_keys("sae-a", [sent[0].key_id])  # still there for the right slave
    assert raw(got[0]) == raw(sent[0])


async def test_unknown_or_malformed_id_is_not_found(h: Harness) -> None:
    with pytest.raises(KeyNotFound):
        await h.slave.dec_keys("sae-a", [str(uuid.uuid4())])
    with pytest.raises(KeyNotFound):
        await h.slave.dec_keys("sae-a", ["not-a-uuid"])
    sent = await h.master.enc_keys("sae-b")
    # Right ID, wrong master: not found, and the key survives for the right request.
    with pytest.raises(KeyNotFound):
        await h.slave.dec_keys("sae-c", [sent[0].key_id])
    with pytest.raises(KeyNotFound):  # one unknown ID fails the whole request
        await h.slave.dec_keys("sae-a", [sent[0].key_id, str(uuid.uuid4())])
    if h.atomic_dec_keys:  # ETSI 014: all or nothing, the known key is still there
        assert raw((await h.slave.dec_keys("sae-a", [sent[0].key_id]))[0]) == raw(sent[0])
    else:  # SKIP: one GET per ID, the known key was taken by the failed call and is spent
        with pytest.raises(KeyNotFound):
            await h.slave.dec_keys("sae-a", [sent[0].key_id])


@WITH_LINK
async def test_eavesdropper_on_no_new_keys_off_keys_again(h: Harness) -> None:
    assert h.has_link
    await h.set_link(eavesdropper=True)
    st = await h.master.status("sae-b")
    assert st.status_extension is not None
    assert st.status_extension["qgw_simulator"]["aborted"] is True
    await drain(h.master, "sae-b")  # key distilled before the attack may still be used
    h.advance(3600.0)
    with pytest.raises(KeyExhausted):
        await h.master.enc_keys("sae-b")
    assert (await h.master.status("sae-b")).stored_key_count == 0
    await h.set_link(eavesdropper=False)
    h.advance(1.0)
    assert len(await h.master.enc_keys("sae-b", number=KEYS_PER_SECOND)) == KEYS_PER_SECOND


@WITH_LINK
async def test_link_down_no_new_keys(h: Harness) -> None:
    assert h.has_link
    await h.set_link(up=False, flush=True)
    h.advance(60.0)
    with pytest.raises(KeyExhausted):
        await h.master.enc_keys("sae-b")
    await h.set_link(up=True)
    h.advance(0.5)
    assert len(await h.master.enc_keys("sae-b", number=5)) == 5


async def test_status_has_every_table_9_field(h: Harness) -> None:
    st = await h.master.status("sae-b")
    assert isinstance(st, KeyStatus)
    for f in STATUS_FIELDS:
        assert getattr(st, f) is not None
    assert st.master_SAE_ID == "sae-a"
    assert st.slave_SAE_ID == "sae-b"
    assert st.key_size == 256
    assert st.min_key_size <= st.key_size <= st.max_key_size


async def test_caller_mistakes_are_value_errors(h: Harness) -> None:
    with pytest.raises(ValueError, match="number"):
        await h.master.enc_keys("sae-b", number=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        await h.master.enc_keys("sae-b", size_bits=250)
    with pytest.raises(ValueError, match="at least one"):
        await h.slave.dec_keys("sae-a", [])


async def test_counters_follow_the_traffic(h: Harness) -> None:
    sent = await h.master.enc_keys("sae-b", number=2)
    await h.slave.dec_keys("sae-a", [k.key_id for k in sent])
    with pytest.raises(KeyNotFound):
        await h.slave.dec_keys("sae-a", [sent[0].key_id])
    assert h.master.counters.keys_delivered == 2
    assert h.master.counters.bits_delivered == 512
    assert h.slave.counters.keys_delivered == 2
    assert h.slave.counters.errors_not_found == 1


async def test_no_key_bytes_in_any_log(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    handed: list[bytes] = []
    sent = await h.master.enc_keys("sae-b", number=4)
    handed += [raw(k) for k in sent]
    handed += [raw(k) for k in await h.slave.dec_keys("sae-a", [k.key_id for k in sent])]
    back = await h.slave.enc_keys("sae-a", number=2, size_bits=512)
    handed += [raw(k) for k in back]
    with pytest.raises(KeySourceError):
        await h.intruder.dec_keys("sae-a", [back[0].key_id])
    with pytest.raises(KeyNotFound):
        await h.slave.dec_keys("sae-a", [sent[0].key_id])
    if h.has_link:
        handed += [raw(k) for k in await drain(h.master, "sae-b")]
    text = caplog.text + "\n".join(repr(r.__dict__) for r in caplog.records)
    text += repr(sent) + str(sent[0]) + repr(h.master)
    assert handed
    for k in handed:
        for form in (
            k.hex(),
            k.hex().upper(),
            base64.b64encode(k).decode(),
            base64.urlsafe_b64encode(k).decode(),
        ):
            assert form not in text


@OVER_TLS
async def test_tls_client_without_certificate_is_refused(h: Harness) -> None:
    assert h.setup is not None
    assert h.runner is not None
    served = h.runner.nodes["A"].keys_served
    ctx = ssl.create_default_context(cafile=str(h.setup.ca))  # trusts the KME, no client cert
    with pytest.raises(KmeUnavailable):
        await h.client(ctx).enc_keys("sae-b")
    assert h.runner.nodes["A"].keys_served == served


@OVER_TLS
async def test_tls_client_with_wrongly_signed_certificate_is_refused(h: Harness) -> None:
    assert h.setup is not None
    assert h.runner is not None
    served = h.runner.nodes["A"].keys_served
    ctx = ssl.create_default_context(cafile=str(h.setup.ca))
    ctx.load_cert_chain(h.setup.pki("rogue-sae-a.crt"), h.setup.pki("rogue-sae-a.key"))
    with pytest.raises(KmeUnavailable):
        await h.client(ctx).enc_keys("sae-b")
    assert h.runner.nodes["A"].keys_served == served


@OVER_TLS
async def test_tls_kme_not_signed_by_pinned_ca_is_refused_without_retry(h: Harness) -> None:
    assert h.setup is not None
    assert h.runner is not None
    cert, key = h.setup.sae("sae-a")
    ctx = ssl.create_default_context(cafile=str(h.setup.pki("rogue-ca.crt")))
    ctx.load_cert_chain(cert, key)
    c = h.client(ctx)
    with pytest.raises(KmeUnavailable, match="TLS"):
        await c.enc_keys("sae-b")
    assert c.counters.attempts == 1


@OVER_TLS
async def test_tls_valid_certificate_of_an_sae_not_attached_here_is_401(h: Harness) -> None:
    assert h.setup is not None
    assert h.runner is not None
    from keysource.tls import client_context

    cert, key = h.setup.sae("sae-b")  # sae-b belongs to KME B, not KME A
    c = h.client(client_context(cert, key, h.setup.ca), kme="A", sae="sae-b")
    with pytest.raises(KmeUnauthorized):
        await c.enc_keys("sae-a")
    assert c.counters.attempts == 1
