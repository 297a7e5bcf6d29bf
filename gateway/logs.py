"""One logging setup for the whole gateway: text or JSON lines, with a redaction filter.

Code never logs key material on purpose; the filter is a second line of defence. It
redacts (a) every value registered with :func:`register_secret` (e.g. the broker password,
the PSK once loaded) wherever it appears in a formatted message, and (b) long runs of hex or
base64 that look like key bytes. Key material can only be written to an opt-in key log for
debugging, which this module does not provide.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import threading
import time
from typing import Any

REDACTED = "<redacted>"
_LOCK = threading.Lock()
_SECRETS: set[str] = set()
# 32+ hex digits or 40+ base64 characters in one run: looks like key material.
_KEYLIKE = re.compile(
    r"(?<![A-Za-z0-9+/=_-])(?:[0-9a-fA-F]{32,}|[A-Za-z0-9+/]{40,}={0,2})(?![A-Za-z0-9+/=])"
)


def register_secret(value: str | bytes) -> None:
    """Make sure this value (and its hex / base64 forms) never reaches a log line."""
    if isinstance(value, bytes):
        forms = {value.hex(), base64.b64encode(value).decode(), value.decode("latin-1")}
    else:
        forms = {value}
    with _LOCK:
        _SECRETS.update(f for f in forms if len(f) >= 4)


def redact(text: str) -> str:
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return _KEYLIKE.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Format the traceback now and redact it; drop the live exception object.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("site", "peer", "event", "epoch", "reason", "alert", "rule"):
            if hasattr(record, key):
                obj[key] = getattr(record, key)
        if record.exc_text:
            obj["exc"] = record.exc_text
        return json.dumps(obj, separators=(",", ":"))


def setup_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Configure the root logger once: one handler, the redaction filter, text or JSON."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())


class RateLimitedSummary:
    """Count events by reason and log one summary line at most every ``interval`` seconds.

    For things an attacker can make happen at will (unauthenticated connections closed,
    evicted, refused): one WARNING per event would let anyone fill the disk (issue 10 saw
    42,489 lines in 15 minutes). Counters in the metrics carry the exact numbers.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval: float = 10.0,
        level: int = logging.WARNING,
        clock: Any = time.monotonic,
    ) -> None:
        self._log = logger
        self._what = what
        self._interval = interval
        self._level = level
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._since: float | None = None
        self.lines = 0  # summary lines written (for tests and the flood benchmark)

    def add(self, reason: str) -> None:
        now = self._clock()
        if self._since is None:
            self._since = now
        self._counts[reason] = self._counts.get(reason, 0) + 1
        self.flush(now)

    def flush(self, now: float | None = None, *, force: bool = False) -> None:
        """Write the summary if the interval has passed (or ``force``) and counts are pending."""
        now = self._clock() if now is None else now
        if not self._counts or self._since is None:
            return
        if not force and now - self._since < self._interval:
            return
        total = sum(self._counts.values())
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self._counts.items()))
        self._log.log(
            self._level,
            "%d %s in the last %.0f s (%s)",
            total,
            self._what,
            now - self._since,
            detail,
        )
        self.lines += 1
        self._counts.clear()
        self._since = now
