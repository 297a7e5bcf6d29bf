"""systemd readiness notification (``Type=notify``) without a dependency.

``sd_notify(3)`` is one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or
an abstract name starting with ``@``). Outside systemd the variable is unset and every call is a
no-op. Failures are logged once and never stop the gateway.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"RELOADING=1"``, ``"STOPPING=1"``); True if sent."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning(
            "sd_notify %s to %s failed: %s", state.split("=", maxsplit=1)[0], addr, exc.strerror
        )
        return False
    return True
