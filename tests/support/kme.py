"""Start the KME simulator for tests: as a real subprocess, or in the test's event loop.

- :func:`write_kme_setup` writes a KME PKI (plus a third SAE ``sae-c`` at KME B and a rogue CA
  for negative TLS tests) and a ``kme.toml`` with fresh free loopback ports.
- :func:`start_kme` / :func:`kme_process` run ``qgw kme serve`` as a subprocess (``--kme both``,
  ``A`` or ``B``) and wait, with a timeout, until its admin endpoint answers.
- :func:`admin_set` flips the link (eavesdropper, up/down, QBER, rate, flush) at run time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import to_toml
from gateway.crypto import tlspki
from gateway.initdemo import DemoPorts, write_kme_config, write_kme_pki
from keysource.kme_config import KmeConfig, load_kme_config, split_hostport

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class KmeSetup:
    root: Path
    config_path: Path
    config: KmeConfig

    def pki(self, name: str) -> Path:
        return self.root / "kme-pki" / name

    def sae(self, sae_id: str) -> tuple[Path, Path]:
        return self.pki(f"{sae_id}.crt"), self.pki(f"{sae_id}.key")

    @property
    def ca(self) -> Path:
        return self.pki("ca.crt")

    def api_url(self, kme: str) -> str:
        sec = self.config.kme_a if kme == "A" else self.config.kme_b
        host, port = split_hostport(sec.listen)
        return f"https://{host}:{port}"

    def admin_url(self, kme: str) -> str:
        sec = self.config.kme_a if kme == "A" else self.config.kme_b
        host, port = split_hostport(sec.admin_listen)
        return f"http://{host}:{port}"


def write_kme_setup(
    root: Path, link: dict[str, Any] | None = None, zero_ports: bool = False
) -> KmeSetup:
    """PKI + kme.toml in ``root``; ``link`` overrides [link]; ``zero_ports``: all ports 0."""
    root.mkdir(parents=True, exist_ok=True)
    write_kme_pki(root)
    pki = root / "kme-pki"
    ca = tlspki.load_issued(pki / "ca.crt", pki / "ca.key")
    tlspki.write_issued(tlspki.issue_client(ca, "sae-c"), pki / "sae-c.crt", pki / "sae-c.key")
    rogue = tlspki.new_ca("rogue CA")
    tlspki.write_issued(rogue, pki / "rogue-ca.crt", pki / "rogue-ca.key")
    # A certificate with a legitimate-looking CN, signed by the wrong CA.
    tlspki.write_issued(
        tlspki.issue_client(rogue, "sae-a"), pki / "rogue-sae-a.crt", pki / "rogue-sae-a.key"
    )
    path = write_kme_config(root, DemoPorts.pick())
    data = tomllib.loads(path.read_text())
    data["kme_b"]["sae_ids"] = ["sae-b", "sae-c"]
    if link:
        data["link"].update(link)
    if zero_ports:
        for k in ("kme_a", "kme_b"):
            for f in ("listen", "admin_listen", "sync_listen", "skip_listen"):
                data[k][f] = "127.0.0.1:0"
    path.write_text(to_toml(data))
    return KmeSetup(root, path, load_kme_config(path))


def http_json(
    url: str, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """Plain-HTTP JSON request (admin endpoint)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


def admin_set(admin_url: str, timeout: float = 5.0, **changes: Any) -> dict[str, Any]:
    status, body = http_json(admin_url + "/admin/link", changes, timeout)
    if status != 200:
        raise RuntimeError(f"admin_set {changes} -> {status} {body}")
    return dict(body)


@dataclass
class KmeProcess:
    proc: subprocess.Popen[str]
    setup: KmeSetup
    which: str
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_kme(setup: KmeSetup, which: str = "both", timeout: float = 30.0) -> KmeProcess:
    """Run ``qgw kme serve`` and wait until every admin endpoint of ``which`` answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QGW_")}
    env["PYTHONPATH"] = str(ROOT)
    log_path = setup.root / f"kme-{which}.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "kme",
                "serve",
                "--config",
                str(setup.config_path),
                "--kme",
                which,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    kp = KmeProcess(proc, setup, which, log_path)
    kmes = ["A", "B"] if which == "both" else [which]
    deadline = time.monotonic() + timeout
    pending = list(kmes)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"KME simulator exited with {proc.returncode}:\n{kp.log()}")
        if time.monotonic() > deadline:
            kp.stop()
            raise TimeoutError(f"KME simulator not ready after {timeout} s:\n{kp.log()}")
        try:
            status, _ = http_json(setup.admin_url(pending[0]) + "/healthz", timeout=1.0)
            if status == 200:
                pending.pop(0)
                continue
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return kp


@contextmanager
def kme_process(
    setup: KmeSetup, which: str = "both", timeout: float = 30.0
) -> Iterator[KmeProcess]:
    kp = start_kme(setup, which, timeout)
    try:
        yield kp
    finally:
        kp.stop()
