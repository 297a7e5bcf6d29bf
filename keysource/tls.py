"""TLS contexts for ETSI GS QKD 014 (mutual TLS, TLS >= 1.2, one pinned CA) and the peer CN.

Only ``ssl`` from the standard library; certificates come from gateway.crypto.tlspki.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Client side: present ``cert``/``key``; trust only ``ca``; check the server's name."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Server side: present ``cert``/``key``; require a client certificate signed by ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def peer_common_name(peercert: Any) -> str | None:
    """The subject CN of a verified peer certificate (``SSLSocket.getpeercert()`` form)."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for attr in rdn:
            if isinstance(attr, tuple) and len(attr) == 2 and attr[0] == "commonName":
                return str(attr[1])
    return None
