"""An exception inside a session task (here: the QKD key fetch) becomes alert 19 at the
peer and a counted, logged internal error locally -- never a hang until the handshake
timeout and never an unretrieved task exception (issue 17). Two PeerLinks, real TCP."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway.core import labels as L

from .helpers import site_pair
from .test_link import Site, until


class Raising:
    """A key source whose chosen call raises a plain RuntimeError (a bug, not a KME error)."""

    def __init__(self, inner: Any, op: str) -> None:
        self.inner, self.op, self.calls = inner, op, 0
        self.counters = inner.counters

    async def enc_keys(self, *a: Any, **k: Any) -> Any:
        if self.op == "enc_keys":
            self.calls += 1
            raise RuntimeError("injected failure (test)")
        return await self.inner.enc_keys(*a, **k)

    async def dec_keys(self, *a: Any, **k: Any) -> Any:
        if self.op == "dec_keys":
            self.calls += 1
            raise RuntimeError("injected failure (test)")
        return await self.inner.dec_keys(*a, **k)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _break(site: Site, op: str) -> Raising:
    r = Raising(site.keysource, op)
    site.link.keysource = r  # type: ignore[assignment]
    site.keysource = r  # type: ignore[assignment]
    return r


def _unretrieved(context: dict[str, Any], seen: list[str]) -> None:
    seen.append(str(context.get("message")))


async def test_responder_fetch_failure_alerts_the_initiator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, c: _unretrieved(c, seen))
    da, db = site_pair(tmp_path)
    b = Site(db, tmp_path)
    broken = _break(b, "dec_keys")
    b.start()
    await until(lambda: b.link.listen_port is not None)
    a = Site(da, tmp_path)
    a.start()
    try:
        with caplog.at_level(logging.WARNING):
            # the peer (initiator) is told at once: alert 19, not its handshake timeout
            await until(lambda: (a.link.status.last_close or "").startswith("peer: internal_error"))
            await until(lambda: b.link.internal_errors >= 1)
        assert broken.calls >= 1
        assert not a.link.is_up()
        assert not b.link.is_up()
        body_a = a.metrics.render().decode()
        assert 'qgw_handshakes_total{reason="internal_error",result="failed"}' in body_a
        body_b = b.metrics.render().decode()
        assert 'qgw_handshakes_total{reason="internal_error",result="failed"}' in body_b
        assert (b.link.status.last_close or "").startswith("local: internal_error")
        lines = [r for r in caplog.records if getattr(r, "event", "") == "internal_error"]
        assert lines
        assert "qkd_fetch" in lines[0].getMessage()
        assert "RuntimeError" in lines[0].getMessage()
    finally:
        await a.stop()
        await b.stop()
    gc.collect()
    await asyncio.sleep(0)
    assert not [m for m in seen if "never retrieved" in m]


async def test_initiator_fetch_failure_is_counted_and_closes(tmp_path: Path) -> None:
    seen: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _l, c: _unretrieved(c, seen))
    da, db = site_pair(tmp_path)
    b = Site(db, tmp_path)
    b.start()
    await until(lambda: b.link.listen_port is not None)
    a = Site(da, tmp_path)
    _break(a, "enc_keys")
    a.start()
    try:
        await until(lambda: a.link.internal_errors >= 2)  # counted per attempt; it retries
        assert not a.link.is_up()
        assert (a.link.status.last_close or "").startswith("local: internal_error")
        body = a.metrics.render().decode()
        assert 'qgw_handshakes_total{reason="internal_error",result="failed"}' in body
    finally:
        await a.stop()
        await b.stop()
    gc.collect()
    await asyncio.sleep(0)
    assert not [m for m in seen if "never retrieved" in m]
    assert L.Alert.INTERNAL_ERROR == 19
