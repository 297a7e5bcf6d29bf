"""The simulator's SKIP API over real mutual TLS: one key pool with the ETSI 014 API (a key made
over one interface is delivered once, over either), refusals with the documented status codes,
capabilities and entropy; and interop with the independent ``skip-qkd`` client from PyPI."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.errors import KeyNotFound
from keysource.etsi014 import Etsi014Client
from keysource.simulator import SimulatorRunner
from keysource.skip import SkipClient
from keysource.tls import client_context
from tests.keysource.harness import FAST_RETRY, LINK, FakeClock
from tests.support.kme import KmeSetup, write_kme_setup

pytestmark = pytest.mark.timeout(60)


@dataclass
class Sim:
    setup: KmeSetup
    runner: SimulatorRunner
    clients: list[Any]

    def port(self, kme: str, api: str) -> int:
        ep = self.runner.endpoints[kme]
        if api == "skip":
            assert ep.skip is not None
            return ep.skip[1]
        return ep.api[1]

    def ctx(self, sae: str) -> ssl.SSLContext:
        cert, key = self.setup.sae(sae)
        return client_context(cert, key, self.setup.ca)

    def skip(self, kme: str, sae: str) -> SkipClient:
        url = f"https://127.0.0.1:{self.port(kme, 'skip')}"
        c = SkipClient(url, sae, self.ctx(sae), retry=FAST_RETRY)
        self.clients.append(c)
        return c

    def etsi(self, kme: str, sae: str) -> Etsi014Client:
        url = f"https://127.0.0.1:{self.port(kme, 'api')}"
        c = Etsi014Client(url, sae, self.ctx(sae), retry=FAST_RETRY)
        self.clients.append(c)
        return c

    async def get(self, kme: str, sae: str, target: str) -> tuple[int, Any]:
        """One raw GET on the SKIP port as ``sae`` (status, JSON body or None)."""
        url = f"https://127.0.0.1:{self.port(kme, 'skip')}{target}"
        conn = aiohttp.TCPConnector(ssl=self.ctx(sae))
        async with (
            aiohttp.ClientSession(connector=conn) as s,
            s.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r,
        ):
            body = await r.read()
            return r.status, (await r.json(content_type=None)) if body else None


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Sim]:
    setup = write_kme_setup(tmp_path, LINK, zero_ports=True)
    runner = SimulatorRunner(setup.config, "both", FakeClock())
    await runner.start()
    s = Sim(setup, runner, [])
    try:
        yield s
    finally:
        for c in s.clients:
            await c.aclose()
        await runner.stop()


@pytest.mark.parametrize(("make", "take"), [("skip", "etsi"), ("etsi", "skip")])
async def test_mixing_014_and_skip_for_one_key_delivers_it_once(
    sim: Sim, make: str, take: str
) -> None:
    """Documented choice (docs/keysource.md): one pool, one key ID in two spellings; the slave's
    copy goes to whichever interface asks first, and only once."""
    maker = getattr(sim, make)("A", "sae-a")
    taker = getattr(sim, take)("B", "sae-b")
    other = getattr(sim, "etsi" if take == "skip" else "skip")("B", "sae-b")
    (k,) = await maker.enc_keys("sae-b")
    (got,) = await taker.dec_keys("sae-a", [k.key_id])
    assert got.key.expose_secret_bytes() == k.key.expose_secret_bytes()
    with pytest.raises(KeyNotFound):  # the other interface finds it gone
        await other.dec_keys("sae-a", [k.key_id])


async def test_capabilities_and_entropy(sim: Sim) -> None:
    status, caps = await sim.get("A", "sae-a", "/capabilities")
    assert status == 200
    assert caps["localSystemID"] == "sae-a"
    assert caps["remoteSystemID"] == ["sae-b", "sae-c"]
    assert caps["key"] is True
    assert caps["entropy"] is True
    assert isinstance(caps["algorithm"], str)
    assert caps["qgw_simulator"]["stored_key_count"] == LINK["initial_keys"]
    status, ent = await sim.get("A", "sae-a", "/entropy")
    assert status == 200
    assert ent["minentropy"] == 256
    assert len(bytes.fromhex(ent["randomStr"])) == 32
    status, ent = await sim.get("A", "sae-a", "/entropy?minentropy=1024")
    assert (status, len(ent["randomStr"])) == (200, 256)


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/key", 400),  # remoteSystemID is required
        ("/key?remoteSystemID=sae-b&number=2", 400),  # no such parameter in SKIP
        ("/key?remoteSystemID=sae-b&remoteSystemID=sae-c", 400),
        ("/key?remoteSystemID=nobody", 400),
        ("/key?remoteSystemID=sae-a", 400),  # our own system is not a peer
        ("/key?remoteSystemID=sae-b&size=250", 400),
        ("/key?remoteSystemID=sae-b&size=-8", 400),
        ("/key?remoteSystemID=sae-b&size=65536", 400),
        ("/key/" + "0" * 31 + "?remoteSystemID=sae-b", 400),  # not 128 bits
        ("/key/" + uuid.uuid4().hex + "?remoteSystemID=sae-b", 404),  # forged
        ("/key/" + uuid.uuid4().hex, 400),
        ("/entropy?minentropy=7", 400),
        ("/entropy?minentropy=99999", 400),
        ("/capabilities?x=1", 400),
        ("/api/v1/keys/sae-b/status", 404),  # the ETSI 014 paths are not on the SKIP port
    ],
)
async def test_bad_requests_get_the_documented_status(sim: Sim, target: str, status: int) -> None:
    served = sim.runner.nodes["A"].keys_served
    got, body = await sim.get("A", "sae-a", target)
    assert got == status
    if status == 400:
        assert isinstance(body["message"], str)
    assert sim.runner.nodes["A"].keys_served == served


async def test_caller_not_attached_or_not_the_keys_system_is_401(sim: Sim) -> None:
    for target in ("/capabilities", "/entropy", "/key?remoteSystemID=sae-a", "/key/" + "0" * 32):
        assert (await sim.get("A", "sae-b", target))[0] == 401  # sae-b is attached to KME B
    status, k = await sim.get("A", "sae-a", "/key?remoteSystemID=sae-b")
    assert status == 200
    assert (await sim.get("B", "sae-c", f"/key/{k['keyId']}?remoteSystemID=sae-a"))[0] == 401
    assert (await sim.get("B", "sae-b", f"/key/{k['keyId']}?remoteSystemID=sae-c"))[0] == 404
    status, got = await sim.get("B", "sae-b", f"/key/{k['keyId'].upper()}?remoteSystemID=sae-a")
    assert (status, got) == (200, k)
    assert (await sim.get("B", "sae-b", f"/key/{k['keyId']}?remoteSystemID=sae-a"))[0] == 404


async def test_post_is_not_allowed(sim: Sim) -> None:
    url = f"https://127.0.0.1:{sim.port('A', 'skip')}/key?remoteSystemID=sae-b"
    conn = aiohttp.TCPConnector(ssl=sim.ctx("sae-a"))
    async with aiohttp.ClientSession(connector=conn) as s, s.post(url) as r:
        assert r.status == 405


async def test_interop_with_the_independent_skip_qkd_client(sim: Sim) -> None:
    """skip-qkd 1.0.0 (PyPI, dev dependency): blocking sockets, one connection per request
    (``Connection: close``), so one client object per call, in a thread."""
    from skip_qkd import MTLSConfig, SkipQKDClient  # dev dependency, imported where used

    def call(kme: str, sae: str, method: str, *args: Any) -> dict[str, Any]:
        cert, key = sim.setup.sae(sae)
        mtls = MTLSConfig(ca_file=str(sim.setup.ca), cert_file=str(cert), key_file=str(key))
        with SkipQKDClient(f"127.0.0.1:{sim.port(kme, 'skip')}", sae, mtls_config=mtls) as c:
            out: dict[str, Any] = getattr(c, method)(*args)
            return out

    caps = await asyncio.to_thread(call, "A", "sae-a", "capabilities")
    assert caps["localSystemID"] == "sae-a"
    made = await asyncio.to_thread(call, "A", "sae-a", "request_key", "sae-b", 256)
    assert len(made["keyId"]) == 32
    assert len(bytes.fromhex(made["key"])) == 32
    got = await asyncio.to_thread(call, "B", "sae-b", "fetch_key_by_id", made["keyId"], "sae-a")
    assert got == made
    ent = await asyncio.to_thread(call, "B", "sae-b", "entropy", 512)
    assert len(bytes.fromhex(ent["randomStr"])) == 64
    # Our client and theirs agree on the same key, both ways round.
    ours = sim.skip("A", "sae-a")
    (k,) = await ours.enc_keys("sae-b")
    theirs = await asyncio.to_thread(
        call, "B", "sae-b", "fetch_key_by_id", k.key_id.replace("-", ""), "sae-a"
    )
    assert bytes.fromhex(theirs["key"]) == k.key.expose_secret_bytes()
    made = await asyncio.to_thread(call, "B", "sae-b", "request_key", "sae-a")
    (mine,) = await sim.skip("A", "sae-a").dec_keys("sae-b", [str(uuid.UUID(made["keyId"]))])
    assert mine.key.expose_secret_bytes() == bytes.fromhex(made["key"])
    with pytest.raises(RuntimeError, match="404"):  # delivered once, also to skip-qkd
        await asyncio.to_thread(call, "B", "sae-b", "fetch_key_by_id", made["keyId"], "sae-a")


async def test_two_process_mode_serves_skip_from_the_shared_pool(tmp_path: Path) -> None:
    """--kme A and --kme B as two runners (KME B's keys come from A over the sync channel)."""
    setup = write_kme_setup(tmp_path, LINK)  # fixed free ports: each KME must know the other's
    clock = FakeClock()
    run_a = SimulatorRunner(setup.config, "A", clock)
    run_b = SimulatorRunner(setup.config, "B", clock)
    await run_a.start()
    await run_b.start()
    sim_a, sim_b = Sim(setup, run_a, []), Sim(setup, run_b, [])
    try:
        a, b = sim_a.skip("A", "sae-a"), sim_b.skip("B", "sae-b")
        sent = await a.enc_keys("sae-b", number=2)  # A generates and pushes B's copy
        got = await b.dec_keys("sae-a", [k.key_id for k in sent])
        assert [k.key.expose_secret_bytes() for k in got] == [
            k.key.expose_secret_bytes() for k in sent
        ]
        back = await b.enc_keys("sae-a")  # B asks A, A keeps the slave's copy
        (mine,) = await a.dec_keys("sae-b", [back[0].key_id])
        assert mine.key.expose_secret_bytes() == back[0].key.expose_secret_bytes()
        st = await b.status("sae-a")  # B's capabilities carry A's link view
        assert st.stored_key_count == LINK["initial_keys"] - 3
    finally:
        for c in (*sim_a.clients, *sim_b.clients):
            await c.aclose()
        await run_b.stop()
        await run_a.stop()
