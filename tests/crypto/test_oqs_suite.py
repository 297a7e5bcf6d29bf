"""The oqs provider end to end (issue 17): run-time algorithm discovery, PKI handshakes with
mixed providers (pyca <-> oqs, both roles), and the conservative FrodoKEM-976 suite (0x03)
in a real handshake over loopback TCP. Without liboqs the oqs tests skip with the reason;
the configuration refusal of suite 0x03 without the oqs provider runs everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main as qgw_main
from gateway.config import settings_from_dict
from gateway.credentials import load_authenticator
from gateway.crypto import KEM_SIZES, KemAlg, Provider, get_provider, x509
from gateway.errors import ConfigError, ProviderUnavailable
from gateway.link import PeerLink
from gateway.metrics import Metrics
from keysource import from_settings
from tests.runtime.helpers import site_pair

FRODO = "frodokem976aes-x25519-aes256gcm-sha384"


def _oqs() -> Any:
    try:
        return get_provider("oqs")
    except ProviderUnavailable as exc:
        pytest.skip(f"liboqs not installed: {exc}")


# --- everywhere ---------------------------------------------------------------------------


def test_frodo_suite_needs_the_oqs_provider(tmp_path: Path) -> None:
    da, _ = site_pair(tmp_path)
    da["crypto"] = {"suite": FRODO}  # provider defaults to pyca
    with pytest.raises(ConfigError) as info:
        settings_from_dict(da, base=tmp_path, environ={})
    keys = [k for k, _ in info.value.problems]
    assert any(k.startswith("crypto") for k in keys), info.value.problems
    assert "crypto.provider = 'oqs'" in str(info.value)
    da["crypto"] = {"suite": FRODO, "provider": "oqs"}
    assert settings_from_dict(da, base=tmp_path, environ={}).crypto.suite.value == FRODO


def test_check_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        '[gateway]\nsite_id = "site-a"\nrole = "initiator"\npeer = "127.0.0.1:1"\n'
        '[auth]\nmode = "psk"\npsk_file = "psk"\npeer_name = "site-b"\n'
        f'[crypto]\nsuite = "{FRODO}"\nprovider = "pyca"\n'
        '[qkd]\nmode = "off"\n[mqtt]\nclient_id = "a"\n'
        '[[mqtt.rules]]\npattern = "t/#"\ndirection = "both"\n'
    )
    assert qgw_main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert "crypto" in err
    assert "needs crypto.provider = 'oqs'" in err


# --- with liboqs ----------------------------------------------------------------------------


def test_algorithms_are_discovered_from_liboqs() -> None:
    prov = _oqs()
    import oqs

    assert prov.kem_algorithms() == frozenset(oqs.get_enabled_kem_mechanisms())
    assert prov.sig_algorithms() == frozenset(oqs.get_enabled_sig_mechanisms())
    assert {"ML-KEM-768", "ML-KEM-1024"} <= prov.kem_algorithms()
    assert not {"HQC-128", "HQC-192", "HQC-256"} & prov.kem_algorithms()  # pre-0.15 names
    for name in ("HQC-1", "HQC-3", "HQC-5"):
        if name in prov.kem_algorithms():
            key = prov.extra_kem_keygen(name)
            ct, ss = prov.extra_encapsulate(name, key.public_bytes())
            assert prov.extra_decapsulate(key, ct) == ss


def test_frodokem_sizes_and_round_trip() -> None:
    prov = _oqs()
    if KemAlg.FRODOKEM976AES.value not in prov.kem_algorithms():
        pytest.skip("this liboqs build does not enable FrodoKEM-976-AES")
    key = prov.kem_keygen(KemAlg.FRODOKEM976AES, bytes(64))
    assert len(key.public_bytes()) == KEM_SIZES[KemAlg.FRODOKEM976AES][0] == 15632
    ct, ss = prov.encapsulate(KemAlg.FRODOKEM976AES, key.public_bytes())
    assert len(ct) == KEM_SIZES[KemAlg.FRODOKEM976AES][1] == 15792
    assert len(ss) == 24
    assert prov.decapsulate(key, ct) == ss
    assert prov.decapsulate(key, bytes([ct[0] ^ 1]) + ct[1:]) != ss  # implicit rejection
    assert repr(key) == "<secret>"


# --- real TCP between two PeerLinks -----------------------------------------------------------


def _pki_files(root: Path) -> None:
    ca_cert, ca_key = x509.create_ca("test site CA")
    for name in ("site-a", "site-b"):
        cert, key = x509.issue_cert(ca_cert, ca_key, name)
        (root / f"{name}.crt").write_bytes(cert)
        fd = os.open(root / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, key)
        os.close(fd)
    (root / "ca.crt").write_bytes(ca_cert)


class _Site:
    def __init__(self, d: dict[str, Any], root: Path, provider: Provider) -> None:
        self.settings = settings_from_dict(d, base=root, environ={})
        self.got: list[bytes] = []
        self.keysource = from_settings(self.settings.qkd)
        self.metrics = Metrics(site_id=self.settings.gateway.site_id)
        self.link = PeerLink(
            self.settings,
            auth=load_authenticator(self.settings, provider),
            provider=provider,
            keysource=self.keysource,
            metrics=self.metrics,
            on_message=self._got,
            on_down=lambda: None,
        )
        self.task: asyncio.Task[None] | None = None

    async def _got(self, data: bytes, via: object = None) -> None:
        self.got.append(data)

    async def stop(self) -> None:
        await self.link.stop()
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.keysource.aclose()


async def _until(cond: Any, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def _run_pair(
    tmp_path: Path, providers: tuple[Provider, Provider], auth: str, suite: str | None
) -> None:
    da, db = site_pair(tmp_path)
    if auth == "pki":
        _pki_files(tmp_path)
        for d, me, other in ((da, "site-a", "site-b"), (db, "site-b", "site-a")):
            d["auth"] = {
                "mode": "pki",
                "cert": str(tmp_path / f"{me}.crt"),
                "key": str(tmp_path / f"{me}.key"),
                "ca": str(tmp_path / "ca.crt"),
                "peer_name": other,
            }
    for d, prov in ((da, providers[0]), (db, providers[1])):
        d["crypto"] = {"provider": prov.name} | ({"suite": suite} if suite else {})
    b = _Site(db, tmp_path, providers[1])
    b.task = asyncio.ensure_future(b.link.run())
    await _until(lambda: b.link.listen_port is not None)
    a = _Site(da, tmp_path, providers[0])
    a.task = asyncio.ensure_future(a.link.run())
    try:
        assert await a.link.wait_up(30)
        await _until(b.link.is_up)
        for n in range(20):
            await a.link.send(b"a->b %d" % n)
            await b.link.send(b"b->a %d" % n)
        await _until(lambda: len(a.got) == 20 and len(b.got) == 20)
        assert b.got == [b"a->b %d" % n for n in range(20)]
        assert a.got == [b"b->a %d" % n for n in range(20)]
        a.link.rekey_now()
        await _until(lambda: a.link.status.rekeys == 1 and b.link.status.rekeys == 1)
        await b.link.send(b"after rekey")
        await _until(lambda: a.got[-1] == b"after rekey")
        assert a.link.internal_errors == b.link.internal_errors == 0
        if suite == FRODO:
            assert a.link.status.suite == b.link.status.suite == "FrodoKEM-976-AES+X25519"
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("order", ["oqs-initiator", "oqs-responder", "oqs-both"])
async def test_pki_handshake_with_mixed_providers(tmp_path: Path, order: str) -> None:
    oqs_p, pyca = _oqs(), get_provider("pyca")
    providers = {
        "oqs-initiator": (oqs_p, pyca),
        "oqs-responder": (pyca, oqs_p),
        "oqs-both": (oqs_p, oqs_p),
    }[order]
    await _run_pair(tmp_path, providers, "pki", None)


@pytest.mark.parametrize("auth", ["psk", "pki"])
async def test_frodokem_suite_handshake_rekey_and_traffic(tmp_path: Path, auth: str) -> None:
    oqs_p = _oqs()
    if KemAlg.FRODOKEM976AES.value not in oqs_p.kem_algorithms():
        pytest.skip("this liboqs build does not enable FrodoKEM-976-AES")
    await _run_pair(tmp_path, (oqs_p, oqs_p), auth, FRODO)


# --- suite 0x03 key-schedule vector (docs/protocol.md §4), independent HMAC -------------------

VECTOR = {
    "S0": "382f438a61466ceda447f15bf7b46e071d7d670a8ea6396991ddc28521fb259d04c5a172a09f6412c6d958af9cfb4575",
    "S1": "95ec8c35a228fcd469fc7f54d897a4fae2b0d59beb5f4274676443fc58a01c1710a65690a253eca98428708ae6909de1",
    "S2": "064aa54781b0f654f5176edccb2a65cec1e36e730be0d5503e80c54d113bbb8a5633d34de44c1fc4fbda6f38b13d8cd5",
    "S3": "8510098005d9b79b2c1ff6f8a969d5a6f072e0c638a6eff48fd14f25bcfdb60a1b38a6d945cd0e0bf321e049080dac34",
    "R0": "24759020fdb06b2fc594f1cf78f54acbf2f898f18c591c13e36790782cfde3b5fb8cd6b051c25b24e05b6f6b0a75a4e0",
    "R1": "96301f7043c19b4ca3c6d5e542177c7b41725114126255b78fa9e96bffa4d066d66a1dfd2d221864ee180648aa27e16a",
    "R2": "60df3403ff40b37c7c827e0c9569d76731ce1b209b30d050203b589f4129b18e47732da1042b77cad8bb938b3c1f1155",
}


def _ref_schedule() -> dict[str, bytes]:
    import hashlib
    import hmac
    import struct

    def ext(salt: bytes, ikm: bytes) -> bytes:
        return hmac.new(salt, ikm, hashlib.sha384).digest()

    def derive(s: bytes) -> bytes:  # Expand(S, "derived", "", 48): one HKDF-Expand block
        info = struct.pack(">H", 48) + bytes([len(b"qgw1 derived")]) + b"qgw1 derived" + b"\x00"
        return hmac.new(s, info + b"\x01", hashlib.sha384).digest()

    proto = hashlib.sha384(b"qgw/1 ML-KEM+X25519+QKD HKDF-SHA384 AES-256-GCM").digest()
    psk, qkd, ss, x = (
        bytes(range(32)),
        bytes(range(32, 64)),
        bytes(range(64, 88)),
        bytes(range(88, 120)),
    )
    out = {"S0": ext(proto, psk)}
    out["S1"] = ext(derive(out["S0"]), qkd)
    out["S2"] = ext(derive(out["S1"]), ss)
    out["S3"] = ext(derive(out["S2"]), x)
    out["R0"] = ext(bytes(range(120, 168)), bytes(32))
    out["R1"] = ext(derive(out["R0"]), ss)
    out["R2"] = ext(derive(out["R1"]), x)
    return out


def test_suite3_key_schedule_vector() -> None:
    from gateway.core import schedule

    ss, x = bytes(range(64, 88)), bytes(range(88, 120))
    ours = schedule.bootstrap_secret(bytes(range(32)), bytes(range(32, 64)), ss, x)
    ours |= schedule.rekey_secret(bytes(range(120, 168)), None, ss, x)
    ref = _ref_schedule()
    for name, hexval in VECTOR.items():
        assert ours[name].hex() == hexval, name
        assert ref[name].hex() == hexval, name
