"""Two PeerLinks over real loopback TCP: handshake, traffic, rekey, reconnect (resumption),
peer restart (visible re-bootstrap), QKD policy in operation. Static QKD keys, PSK auth."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from gateway.credentials import load_authenticator
from gateway.crypto import get_provider
from gateway.link import PeerLink
from gateway.metrics import Metrics
from keysource import from_settings

from .helpers import settings, site_pair

PROVIDER = get_provider("pyca")


class Site:
    def __init__(self, d: dict, root: Path) -> None:  # type: ignore[type-arg]
        self.settings = settings(d, root)
        self.got: list[bytes] = []
        self.downs = 0
        self.metrics = Metrics(site_id=self.settings.gateway.site_id)
        self.keysource = (
            from_settings(self.settings.qkd) if self.settings.qkd.mode.value != "off" else None
        )
        self.link = PeerLink(
            self.settings,
            auth=load_authenticator(self.settings, PROVIDER),
            provider=PROVIDER,
            keysource=self.keysource,
            metrics=self.metrics,
            on_message=self._got,
            on_down=self._down,
        )
        self.task: asyncio.Task[None] | None = None

    async def _got(self, data: bytes, via: object = None) -> None:
        self.got.append(data)

    def _down(self) -> None:
        self.downs += 1

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.link.run())

    async def stop(self) -> None:
        await self.link.stop()
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.keysource:
            await self.keysource.aclose()


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_link_end_to_end(tmp_path: Path) -> None:
    da, db = site_pair(tmp_path)
    b = Site(db, tmp_path)
    b.start()
    await until(lambda: b.link.listen_port is not None)
    a = Site(da, tmp_path)
    a.start()
    try:
        assert await a.link.wait_up(10)
        await until(b.link.is_up)
        for n in range(50):
            await a.link.send(b"a->b %d" % n)
            await b.link.send(b"b->a %d" % n)
        await until(lambda: len(b.got) == 50 and len(a.got) == 50)
        assert b.got == [b"a->b %d" % n for n in range(50)]
        assert a.link.status.qkd_used
        # rekey, then traffic on the new epoch
        a.link.rekey_now()
        await until(lambda: a.link.status.rekeys == 1 and b.link.status.rekeys == 1)
        await a.link.send(b"after rekey")
        await until(lambda: b.got[-1] == b"after rekey")
        assert a.link.status.epoch == b.link.status.epoch == 1
        assert a.link.status.qkd_keys == 1 + 3
        # cut the TCP connection: the initiator reconnects and RESUMES (no new bootstrap)
        cur = a.link._current
        assert cur is not None
        cur.transport.abort()
        await until(lambda: a.link.status.resumptions == 1 and a.link.is_up() and b.link.is_up())
        assert a.link.status.handshakes == 1
        assert a.downs >= 1
        await a.link.send(b"after resume")
        await until(lambda: b.got[-1] == b"after resume")
        # the responder restarts (state lost): the initiator bootstraps again, visibly
        await b.stop()
        b2 = Site(db, tmp_path)
        b2.start()
        await until(lambda: a.link.status.handshakes == 2 and b2.link.is_up(), timeout=20)
        assert "rebootstrap" in a.link.status.alarms
        body = a.metrics.render().decode()
        assert 'qgw_handshakes_total{reason="rebootstrap",result="ok"} 1.0' in body
        await b2.stop()
    finally:
        await a.stop()
        await b.stop()


async def test_required_qkd_fails_closed_then_recovers(tmp_path: Path) -> None:
    da, db = site_pair(tmp_path)
    b = Site(db, tmp_path)
    b.start()
    await until(lambda: b.link.listen_port is not None)
    from gateway.errors import KmeUnavailable

    class Flaky:
        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner, self.down = inner, True
            self.counters = inner.counters

        async def enc_keys(self, *a, **k):  # type: ignore[no-untyped-def]
            if self.down:
                raise KmeUnavailable("KME down (test)")
            return await self.inner.enc_keys(*a, **k)

        async def dec_keys(self, *a, **k):  # type: ignore[no-untyped-def]
            return await self.inner.dec_keys(*a, **k)

        async def aclose(self) -> None:
            await self.inner.aclose()

    a = Site(da, tmp_path)  # its key source fails until the test says otherwise
    flaky = Flaky(a.keysource)
    a.link.keysource = flaky  # type: ignore[assignment]
    a.keysource = flaky  # type: ignore[assignment]
    a.start()
    try:
        await asyncio.sleep(1.5)
        assert not a.link.is_up()
        body = a.metrics.render().decode()
        assert 'qgw_qkd_alarm{reason="qkd_unavailable"} 1.0' in body
        assert 'qgw_kme_errors_total{kind="unavailable"}' in body
        flaky.down = False
        assert await a.link.wait_up(15)
        await until(
            lambda: 'qgw_qkd_alarm{reason="qkd_unavailable"} 0.0' in a.metrics.render().decode()
        )
    finally:
        await a.stop()
        await b.stop()


async def test_preferred_runs_without_qkd_and_alarms(tmp_path: Path) -> None:
    da, db = site_pair(tmp_path, qkd_mode="preferred")
    b = Site(db, tmp_path)
    b.start()
    await until(lambda: b.link.listen_port is not None)
    a = Site(da, tmp_path)

    class Down:
        counters = None

        async def enc_keys(self, *a, **k):  # type: ignore[no-untyped-def]
            from gateway.errors import KmeUnavailable

            raise KmeUnavailable("down")

        async def aclose(self) -> None:
            pass

    a.link.keysource = Down()  # type: ignore[assignment]
    a.start()
    try:
        assert await a.link.wait_up(10)
        assert not a.link.status.qkd_used
        body = a.metrics.render().decode()
        assert 'qgw_qkd_mode_in_effect{mode="pqc-only"} 1.0' in body
        assert 'qgw_qkd_alarm{reason="qkd_unavailable"} 1.0' in body
        await a.link.send(b"pqc only")
        await until(lambda: b.got == [b"pqc only"])
    finally:
        await a.stop()
        await b.stop()


async def test_idle_unauthenticated_sockets_cannot_lock_out_the_peer(tmp_path: Path) -> None:
    """Review M3: more idle TCP connections than pending slots; the real peer still gets in."""
    da, db = site_pair(tmp_path)
    b = Site(db, tmp_path)
    b.start()
    await until(lambda: b.link.listen_port is not None)
    idle = [await asyncio.open_connection("127.0.0.1", b.link.listen_port) for _ in range(6)]
    a = Site(da, tmp_path)
    a.start()
    try:
        assert await a.link.wait_up(8)
    finally:
        for _r, w in idle:
            w.close()
        await a.stop()
        await b.stop()


async def test_forged_inits_from_another_address_do_not_starve_the_peer() -> None:
    """Review M2: the bootstrap rate limit is per source address."""
    from gateway.core.connection import Association

    assoc = Association()
    assert all(assoc.take_token(0.0, "203.0.113.9") for _ in range(5))
    assert not assoc.take_token(0.0, "203.0.113.9")
    assert assoc.take_token(0.0, "127.0.0.1")
