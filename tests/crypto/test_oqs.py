"""The liboqs provider: absent -> a clear ProviderUnavailable, fast, with no network and no
subprocess; present -> cross-provider interop with pyca (skipped here with the reason)."""

from __future__ import annotations

import hashlib
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.crypto import CORE_KEMS, KemAlg, Provider, SigAlg, _oqs, get_provider
from gateway.errors import AuthenticationError, CryptoError, ProviderUnavailable
from tests.vectors import load_vectors, unhex

ROOT = Path(__file__).resolve().parents[2]


def _liboqs_present() -> bool:
    try:
        _oqs.locate_liboqs()
    except ProviderUnavailable:
        return False
    return True


def _forbid(*_: Any, **__: Any) -> None:
    pytest.fail("the oqs provider tried to open a connection or start a process")


@pytest.fixture
def no_liboqs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A machine without liboqs: empty install prefix and home, no system search."""
    monkeypatch.setenv("OQS_INSTALL_PATH", str(tmp_path / "prefix"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_oqs, "SEARCH_SYSTEM_DIRS", False)
    monkeypatch.delitem(sys.modules, "oqs", raising=False)
    monkeypatch.delitem(sys.modules, "oqs.oqs", raising=False)
    monkeypatch.setattr(socket.socket, "connect", _forbid)
    monkeypatch.setattr(socket, "create_connection", _forbid)
    monkeypatch.setattr(subprocess.Popen, "__init__", _forbid)


@pytest.mark.usefixtures("no_liboqs")
def test_absent_liboqs_raises_provider_unavailable_without_network_or_subprocess() -> None:
    start = time.monotonic()
    with pytest.raises(ProviderUnavailable, match="liboqs shared library not found") as info:
        get_provider("oqs")
    assert "pip install qgw[oqs]" in str(info.value)
    assert "oqs" not in sys.modules, "oqs must not be imported when liboqs is absent"
    assert time.monotonic() - start < 30  # generous; the point is: no 5 s countdown + build


@pytest.mark.skipif(importlib.util.find_spec("oqs") is None, reason="liboqs-python not installed")
@pytest.mark.skipif(_liboqs_present(), reason="liboqs is installed: find_library would find it")
def test_guard_stops_liboqs_python_auto_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even if our own search were wrong, importing oqs cannot clone or build liboqs.

    We hand liboqs-python a path that does not load, so it falls into its auto-install
    branch; the audit hook must refuse the `git clone` before any process starts.
    """
    monkeypatch.delitem(sys.modules, "oqs", raising=False)
    monkeypatch.delitem(sys.modules, "oqs.oqs", raising=False)
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # liboqs-python counts down 5 s first
    monkeypatch.setattr(socket.socket, "connect", _forbid)
    with pytest.raises(ProviderUnavailable, match="tried to run 'git'"):
        _oqs._import_oqs(Path("/nonexistent/liboqs.so"))
    assert "oqs" not in sys.modules


@pytest.mark.skipif(_liboqs_present(), reason="liboqs is installed here")
def test_fresh_interpreter_never_fetches(tmp_path: Path) -> None:
    """A new process with an audit hook that kills it on any process start or connection."""
    code = (
        "import os, sys\n"
        "def hook(event, args):\n"
        "    if event in ('subprocess.Popen', 'os.system', 'os.posix_spawn', 'socket.connect',"
        " 'socket.getaddrinfo'):\n"
        "        os.write(2, ('forbidden: ' + event + '\\n').encode()); os._exit(3)\n"
        "sys.addaudithook(hook)\n"
        "from gateway.crypto import get_provider\n"
        "from gateway.errors import ProviderUnavailable\n"
        "try:\n"
        "    get_provider('oqs')\n"
        "except ProviderUnavailable as exc:\n"
        "    print('unavailable:', exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(4)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    env["OQS_INSTALL_PATH"] = str(tmp_path / "none")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "liboqs shared library not found" in proc.stdout


# --- with liboqs: cross-provider interop ----------------------------------------------------


@pytest.fixture(scope="module")
def oqs_provider() -> Any:
    try:
        return get_provider("oqs")
    except ProviderUnavailable as exc:
        pytest.skip(f"liboqs not installed: {exc}")


@pytest.fixture(scope="module")
def pyca() -> Provider:
    return get_provider("pyca")


@pytest.mark.parametrize("alg", sorted(CORE_KEMS))
def test_cross_kem_pyca_to_oqs_and_back(oqs_provider: Any, pyca: Provider, alg: KemAlg) -> None:
    seed = bytes(range(64))
    if oqs_provider.seeded_kem_keygen:
        oqs_key = oqs_provider.kem_keygen(alg, seed)
        assert oqs_key.public_bytes() == pyca.kem_keygen(alg, seed).public_bytes()
    else:
        with pytest.raises(ProviderUnavailable):
            oqs_provider.kem_keygen(alg, seed)
        oqs_key = None
    pyca_key = pyca.kem_keygen(alg, bytes(64))
    ct, ss = oqs_provider.encapsulate(alg, pyca_key.public_bytes())
    assert pyca.decapsulate(pyca_key, ct) == ss
    if oqs_key is not None:
        ct, ss = pyca.encapsulate(alg, oqs_key.public_bytes())
        assert oqs_provider.decapsulate(oqs_key, ct) == ss
        with pytest.raises(AuthenticationError):
            oqs_provider.decapsulate(oqs_key, ct[:-1])
    with pytest.raises(AuthenticationError):
        oqs_provider.encapsulate(alg, pyca_key.public_bytes()[:-1])
    with pytest.raises(CryptoError):
        oqs_provider.decapsulate(pyca_key, ct)


@pytest.mark.parametrize("alg", list(SigAlg))
def test_cross_sign_verify(oqs_provider: Any, pyca: Provider, alg: SigAlg) -> None:
    msg, ctx = b"transcript", b"qgw ctx"
    okey = oqs_provider.sig_keygen(alg, bytes(32))
    osig = oqs_provider.sign(okey, msg, ctx)
    assert pyca.verify(alg, okey.public_bytes(), msg, osig, ctx)
    assert not pyca.verify(alg, okey.public_bytes(), msg, osig, b"other")
    pkey = pyca.sig_keygen(alg, bytes(range(32)))
    psig = pyca.sign(pkey, msg, ctx)
    assert oqs_provider.verify(alg, pkey.public_bytes(), msg, psig, ctx)
    assert not oqs_provider.verify(alg, pkey.public_bytes(), msg + b"x", psig, ctx)
    assert not oqs_provider.verify(alg, pkey.public_bytes(), msg, psig[:-1], ctx)


def test_recorded_kem_vectors_with_oqs(oqs_provider: Any) -> None:
    if not oqs_provider.seeded_kem_keygen:
        pytest.skip("this liboqs has no seeded ML-KEM keygen")
    for v in load_vectors("pqc_keygen_recorded"):
        if v["kind"] == "kem":
            key = oqs_provider.kem_keygen(KemAlg(v["alg"]), unhex(v["seed"]))
            assert hashlib.sha256(key.public_bytes()).hexdigest() == v["public_sha256"]


def test_extra_kems_round_trip(oqs_provider: Any) -> None:
    extras = sorted(oqs_provider.kem_algorithms() - {a.value for a in KemAlg})
    if not extras:
        pytest.skip("this liboqs build has none of the extra KEMs")
    for name in extras:
        if name.startswith("Classic-McEliece") and name != "Classic-McEliece-348864":
            continue  # large keys, slow keygen: one parameter set is enough here
        key = oqs_provider.extra_kem_keygen(name)
        ct, ss = oqs_provider.extra_encapsulate(name, key.public_bytes())
        assert oqs_provider.extra_decapsulate(key, ct) == ss
        with pytest.raises(AuthenticationError):
            oqs_provider.extra_decapsulate(key, ct[:-1])
