"""The logging setup never emits registered secrets or key-like byte runs."""

from __future__ import annotations

import io
import json
import logging
import os

from gateway.logs import register_secret, setup_logging
from gateway.secret import SecretBytes


def test_registered_secret_redacted_in_text_and_json() -> None:
    key = os.urandom(32)
    register_secret(key)
    register_secret("broker-password-xyz")
    for fmt in ("text", "json"):
        buf = io.StringIO()
        setup_logging("debug", fmt, stream=buf)
        log = logging.getLogger("t")
        log.info("key=%s b64 pw=%s", key.hex(), "broker-password-xyz")
        try:
            raise ValueError(f"bad {key.hex()}")
        except ValueError:
            log.exception("failed")
        out = buf.getvalue()
        assert key.hex() not in out
        assert "broker-password-xyz" not in out
        assert "<redacted>" in out
        if fmt == "json":
            for line in out.splitlines():
                json.loads(line)
    setup_logging("info", "text")


def test_unregistered_keylike_hex_redacted() -> None:
    buf = io.StringIO()
    setup_logging("info", "text", stream=buf)
    k = os.urandom(32).hex()
    logging.getLogger("t").warning("leak %s", k)
    assert k not in buf.getvalue()
    setup_logging("info", "text")


def test_secret_bytes_never_prints() -> None:
    raw = os.urandom(32)
    s = SecretBytes(raw)
    assert repr(s) == "<secret>"
    assert raw.hex() not in f"{s} {s!r} {[s]}"
    assert s.expose_secret_bytes() == raw
    s.wipe()
    assert s.wiped
