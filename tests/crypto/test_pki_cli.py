"""`qgw pki ...` through the real command line, and write_gateway_pki for init-demo."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from gateway.crypto import SigAlg
from gateway.crypto import x509 as gx
from gateway.errors import ConfigError
from gateway.pki import write_file_atomic, write_gateway_pki

Qgw = Callable[..., CompletedProcess[str]]
NOW = dt.datetime.now(dt.UTC)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_ca_issue_and_verify(qgw: Qgw, tmp_path: Path) -> None:
    ca_dir, gw_dir = tmp_path / "ca", tmp_path / "gw"
    r = qgw("pki", "init-ca", "--out", str(ca_dir), "--name", "Site CA", "--days", "30")
    assert r.returncode == 0, r.stderr
    assert mode(ca_dir / "ca.key") == 0o600
    assert mode(ca_dir / "ca.crt") == 0o644
    r = qgw("pki", "issue", "--ca-dir", str(ca_dir), "--name", "site-a", "--out", str(gw_dir))
    assert r.returncode == 0, r.stderr
    assert mode(gw_dir / "site-a.key") == 0o600
    assert "PRIVATE KEY" not in r.stdout + r.stderr
    peer = gx.verify_peer(
        gx.load_cert_chain((gw_dir / "site-a.crt").read_bytes()),
        (ca_dir / "ca.crt").read_bytes(),
        "site-a",
        NOW,
        {SigAlg.MLDSA65},
    )
    assert peer.alg is SigAlg.MLDSA65
    key = gx.load_signing_key((gw_dir / "site-a.key").read_bytes())
    assert key.public_bytes() == peer.public_key
    assert not list(gw_dir.glob(".*.tmp"))
    assert not list(ca_dir.glob(".*.tmp"))

    r = qgw(
        "pki",
        "issue",
        "--ca-dir",
        str(ca_dir),
        "--name",
        "site-b",
        "--out",
        str(gw_dir),
        "--alg",
        "ML-DSA-87",
    )
    assert r.returncode == 0, r.stderr
    chain = gx.load_cert_chain((gw_dir / "site-b.crt").read_bytes())
    ca = (ca_dir / "ca.crt").read_bytes()
    assert gx.verify_peer(chain, ca, "site-b", NOW, {SigAlg.MLDSA87}).alg is SigAlg.MLDSA87


def test_refuses_to_overwrite_unless_forced(qgw: Qgw, tmp_path: Path) -> None:
    assert qgw("pki", "init-ca", "--out", str(tmp_path)).returncode == 0
    before = (tmp_path / "ca.key").read_bytes()
    r = qgw("pki", "init-ca", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "already exists" in r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "ca.key").read_bytes() == before
    r = qgw("pki", "init-ca", "--out", str(tmp_path), "--force")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ca.key").read_bytes() != before
    assert mode(tmp_path / "ca.key") == 0o600


def test_user_errors_exit_2_without_traceback(qgw: Qgw, tmp_path: Path) -> None:
    r = qgw(
        "pki",
        "issue",
        "--ca-dir",
        str(tmp_path / "missing"),
        "--name",
        "site-a",
        "--out",
        str(tmp_path),
    )
    assert r.returncode == 2
    assert "CA certificate not found" in r.stderr
    assert "Traceback" not in r.stderr
    assert qgw("pki", "init-ca", "--out", str(tmp_path)).returncode == 0
    r = qgw("pki", "issue", "--ca-dir", str(tmp_path), "--name", "Bad_Name", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "invalid gateway name" in r.stderr
    assert "Traceback" not in r.stderr
    r = qgw("pki", "init-ca", "--out", str(tmp_path / "x"), "--days", "0")
    assert r.returncode == 2


def test_psk_file(qgw: Qgw, tmp_path: Path) -> None:
    psk = tmp_path / "keys" / "psk"
    r = qgw("pki", "psk", "--out", str(psk))
    assert r.returncode == 0, r.stderr
    data = psk.read_bytes()
    assert len(data) == 32
    assert mode(psk) == 0o600
    assert data.hex() not in r.stdout + r.stderr
    r = qgw("pki", "psk", "--out", str(psk))
    assert r.returncode == 2
    assert psk.read_bytes() == data
    other = tmp_path / "psk2"
    assert qgw("pki", "psk", "--out", str(other)).returncode == 0
    assert other.read_bytes() != data


def test_write_file_atomic_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_file_atomic(tmp_path / "k", b"secret", 0o600)
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        write_file_atomic(tmp_path / "k", b"other", 0o600)
    write_file_atomic(tmp_path / "k", b"other", 0o600, overwrite=True)
    assert (tmp_path / "k").read_bytes() == b"other"


def test_write_gateway_pki_for_init_demo(tmp_path: Path) -> None:
    write_gateway_pki(tmp_path, ["site-a", "site-b"])
    pki = tmp_path / "gw-pki"
    assert sorted(p.name for p in pki.iterdir()) == [
        "ca.crt",
        "ca.key",
        "site-a.crt",
        "site-a.key",
        "site-b.crt",
        "site-b.key",
    ]
    for key in ("ca.key", "site-a.key", "site-b.key"):
        assert mode(pki / key) == 0o600
    ca = (pki / "ca.crt").read_bytes()
    for name in ("site-a", "site-b"):
        chain = gx.load_cert_chain((pki / f"{name}.crt").read_bytes())
        assert gx.verify_peer(chain, ca, name, NOW, {SigAlg.MLDSA65}).name == name
        other = "site-b" if name == "site-a" else "site-a"
        with pytest.raises(Exception, match="wrong name"):
            gx.verify_peer(chain, ca, other, NOW, {SigAlg.MLDSA65})
    with pytest.raises(ConfigError, match="already exists"):
        write_gateway_pki(tmp_path, ["site-a", "site-b"])
    with pytest.raises(ConfigError):
        write_gateway_pki(tmp_path / "new", ["site-a", "site-a"])
