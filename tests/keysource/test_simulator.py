"""The simulator's HTTP surface (standard status codes and bodies, GET forms, admin endpoint),
its config validation, and two-process mode (KME A and KME B kept in sync over mTLS)."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.errors import ConfigError, KeyExhausted, KeyNotFound, KmeUnauthorized
from keysource.etsi014 import Etsi014Client, RetryPolicy
from keysource.kme_config import kme_config_from_dict
from keysource.simulator import SimulatorRunner
from keysource.tls import client_context
from keysource.wire import MSG_KEYS_NOT_FOUND, MSG_SIZE_MULTIPLE_OF_8
from tests.keysource.harness import LINK, FakeClock
from tests.support.kme import KmeSetup, write_kme_setup

pytestmark = pytest.mark.timeout(60)


class Api:
    def __init__(self, setup: KmeSetup, runner: SimulatorRunner) -> None:
        self.setup, self.runner = setup, runner
        self.sessions: list[aiohttp.ClientSession] = []

    def session(self, sae: str) -> aiohttp.ClientSession:
        cert, key = self.setup.sae(sae)
        s = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(cert, key, self.setup.ca))
        )
        self.sessions.append(s)
        return s

    def url(self, kme: str, path: str) -> str:
        return f"https://127.0.0.1:{self.runner.endpoints[kme].api[1]}/api/v1/keys/{path}"

    def admin(self, kme: str, path: str) -> str:
        return f"http://127.0.0.1:{self.runner.endpoints[kme].admin[1]}{path}"

    async def call(
        self, sae: str, kme: str, method: str, path: str, body: Any = None
    ) -> tuple[int, bytes]:
        async with self.session(sae).request(method, self.url(kme, path), json=body) as r:
            return r.status, await r.read()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    setup = write_kme_setup(tmp_path, LINK, zero_ports=True)
    runner = SimulatorRunner(setup.config, "both", FakeClock())
    await runner.start()
    a = Api(setup, runner)
    try:
        yield a
    finally:
        for s in a.sessions:
            await s.close()
        await runner.stop()


async def test_get_forms_of_enc_and_dec_keys(api: Api) -> None:
    st, body = await api.call("sae-a", "A", "GET", "sae-b/enc_keys?number=2&size=128")
    assert st == 200
    keys = json.loads(body)["keys"]
    assert len(keys) == 2
    st, body = await api.call("sae-b", "B", "GET", f"sae-a/dec_keys?key_ID={keys[0]['key_ID']}")
    assert st == 200
    assert json.loads(body)["keys"] == [keys[0]]


async def test_status_codes_and_bodies_follow_the_standard(api: Api) -> None:
    st, body = await api.call("sae-a", "A", "POST", "sae-b/enc_keys", {"number": 1})
    kid = json.loads(body)["keys"][0]["key_ID"]
    st, body = await api.call(
        "sae-c", "B", "POST", "sae-a/dec_keys", {"key_IDs": [{"key_ID": kid}]}
    )
    assert (st, body) == (401, b"")  # not the named slave: 401, no body
    st, body = await api.call(
        "sae-b", "B", "POST", "sae-a/dec_keys", {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}
    )
    assert st == 400
    assert json.loads(body)["message"] == MSG_KEYS_NOT_FOUND
    st, body = await api.call("sae-a", "A", "POST", "sae-b/enc_keys", {"size": 100})
    assert (st, json.loads(body)["message"]) == (400, MSG_SIZE_MULTIPLE_OF_8)
    st, body = await api.call(
        "sae-a", "A", "POST", "sae-b/enc_keys", {"additional_slave_SAE_IDs": ["sae-c"]}
    )
    assert st == 400
    st, body = await api.call("sae-a", "A", "POST", "sae-b/enc_keys", {"number": 16, "size": 8192})
    assert st == 503
    assert "exhausted" in json.loads(body)["message"]
    st, body = await api.call("sae-b", "A", "GET", "sae-a/status")  # sae-b is not at KME A
    assert (st, body) == (401, b"")
    st, body = await api.call("sae-a", "A", "GET", "nobody/status")
    assert st == 400
    st, _ = await api.call("sae-a", "A", "GET", "sae-b/enc_keys?number=1&evil=1")
    assert st == 400


async def test_admin_endpoint_flips_the_link(api: Api) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            api.admin("A", "/admin/link"), json={"eavesdropper": True, "flush": True}
        ) as r:
            assert r.status == 200
            assert (await r.json())["link"]["aborted"] is True
        async with s.get(api.admin("B", "/admin/state")) as r:
            state = await r.json()
            assert state["link"]["eavesdropper"] is True  # one link, seen from both KMEs
        st, body = await api.call("sae-a", "A", "POST", "sae-b/enc_keys", {})
        assert st == 503
        assert "aborted" in json.loads(body)["message"]
        async with s.post(api.admin("A", "/admin/link"), json={"bogus": 1}) as r:
            assert r.status == 400
        async with s.post(api.admin("A", "/admin/link"), json={"qber": "high"}) as r:
            assert r.status == 400


def test_kme_config_validation(tmp_path: Path) -> None:
    setup = write_kme_setup(tmp_path)
    import tomllib

    base = tomllib.loads(setup.config_path.read_text())

    def problems(mutate: Any) -> str:
        data = json.loads(json.dumps(base))
        mutate(data)
        with pytest.raises(ConfigError) as ei:
            kme_config_from_dict(data, tmp_path)
        return str(ei.value)

    assert "kme_a.sae_idz: unknown key" in problems(lambda d: d["kme_a"].update(sae_idz=["x"]))
    assert "loopback" in problems(lambda d: d["kme_a"].update(admin_listen="0.0.0.0:1"))
    assert "both KMEs" in problems(lambda d: d["kme_b"].update(sae_ids=["sae-a"]))
    assert "qber" in problems(lambda d: d["link"].update(qber=0.3))


async def test_two_process_mode_keeps_pools_in_sync_over_mtls(tmp_path: Path) -> None:
    setup = write_kme_setup(tmp_path, LINK)  # fixed free ports: each KME must know the other's
    clock = FakeClock()
    run_a = SimulatorRunner(setup.config, "A", clock)
    run_b = SimulatorRunner(setup.config, "B", clock)
    await run_a.start()
    await run_b.start()
    policy = RetryPolicy(base_seconds=0.005, cap_seconds=0.01, deadline_seconds=0.5, max_attempts=2)

    def client(kme: str, sae: str) -> Etsi014Client:
        cert, key = setup.sae(sae)
        return Etsi014Client(
            setup.api_url(kme), sae, client_context(cert, key, setup.ca), retry=policy
        )

    a, b, c = client("A", "sae-a"), client("B", "sae-b"), client("B", "sae-c")
    try:
        sent = await a.enc_keys("sae-b", number=3)  # A generates, pushes to B
        got = await b.dec_keys("sae-a", [k.key_id for k in sent])
        assert [k.key.expose_secret_bytes() for k in got] == [
            k.key.expose_secret_bytes() for k in sent
        ]
        back = await b.enc_keys("sae-a", number=2)  # B asks A, A keeps the slave's copy
        got = await a.dec_keys("sae-b", [k.key_id for k in back])
        assert [k.key.expose_secret_bytes() for k in got] == [
            k.key.expose_secret_bytes() for k in back
        ]
        with pytest.raises(KeyNotFound):
            await a.dec_keys("sae-b", [back[0].key_id])
        more = await a.enc_keys("sae-b")
        with pytest.raises(KmeUnauthorized):
            await c.dec_keys("sae-a", [more[0].key_id])
        st = await b.status("sae-a")  # B reports A's link
        assert st.source_KME_ID == "KME-B"
        assert st.stored_key_count == LINK["initial_keys"] - 6
        # The admin endpoint of B forwards to the link owner A.
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                setup.admin_url("B") + "/admin/link", json={"eavesdropper": True, "flush": True}
            ) as r,
        ):
            assert r.status == 200
        with pytest.raises(KeyExhausted):
            await b.enc_keys("sae-a")
        with pytest.raises(KeyExhausted):
            await a.enc_keys("sae-b")
    finally:
        for x in (a, b, c):
            await x.aclose()
        await run_b.stop()
        await run_a.stop()


async def test_sync_channel_refuses_an_sae_certificate(tmp_path: Path) -> None:
    setup = write_kme_setup(tmp_path, LINK)
    run_a = SimulatorRunner(setup.config, "A", FakeClock())
    await run_a.start()
    try:
        sync = run_a.endpoints["A"].sync
        assert sync is not None
        cert, key = setup.sae("sae-b")
        ctx = ssl.create_default_context(cafile=str(setup.pki("sync-ca.crt")))
        ctx.load_cert_chain(cert, key)  # signed by the SAE CA, not the sync CA
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.post(f"https://127.0.0.1:{sync[1]}/sync/v1/reserve", json={}) as r:
                    await r.read()
    finally:
        await run_a.stop()
