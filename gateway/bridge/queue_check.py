"""Is the local broker's queue big enough for the outage the site wants to survive? (issue 18)

The broker's persistent session is the bridge's store-and-forward queue (docs/bridge.md): while
the WAN link, the peer or this gateway is down, every QoS 1 message for an ``out`` rule waits in
the local broker's queue for our client id. mosquitto caps that queue per client
(``max_queued_messages``, default 1000; ``max_queued_bytes``, default 0 = no cap) and *drops*
what does not fit, silently for the publisher. :func:`queue_limit_warnings` compares the cap with
``mqtt.outage_tolerance_seconds x mqtt.expected_rate`` and says, with the numbers, when it is too
small. ``qgw check-config`` prints the result as warnings; ``qgw run`` logs them at start.

Where the cap comes from, first that applies:

1. ``mqtt.broker_max_queued_messages`` (0 = unlimited);
2. ``mqtt.broker_config``: the broker's mosquitto.conf (and the files of its ``include_dir``),
   ``max_queued_messages`` / ``max_queued_bytes``; absent = mosquitto's defaults;
3. unknown: a warning that says so, when ``mqtt.expected_rate`` is set.

The in-flight window (``mqtt.inflight``, messages the broker has sent us and we have not
acknowledged) comes on top of the queue during a link outage; it is not counted here, so the
check errs on the safe side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gateway.config import MqttSection

#: mosquitto.conf(5): "max_queued_messages ... Defaults to 1000. Set to 0 for no maximum."
MOSQUITTO_DEFAULT_MAX_QUEUED_MESSAGES = 1000
#: mosquitto.conf(5): "max_queued_bytes ... Defaults to 0. (No maximum)"
MOSQUITTO_DEFAULT_MAX_QUEUED_BYTES = 0
MAX_CONFIG_BYTES = 1 << 20  # a mosquitto.conf larger than this is not one
MAX_INCLUDE_DEPTH = 4


class BrokerConfigUnreadable(Exception):
    """The mosquitto.conf named in mqtt.broker_config could not be read or has a bad value."""


@dataclass(frozen=True, slots=True)
class QueueLimit:
    """A broker's per-client queue cap: 0 means unlimited (as in mosquitto.conf)."""

    messages: int
    bytes: int
    source: str  # where ``messages`` comes from, for the warning text
    bytes_source: str = ""  # where ``bytes`` comes from


def _number(key: str, value: str, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise BrokerConfigUnreadable(f"{where}: {key} {value!r} is not a whole number") from None
    if n < 0:
        raise BrokerConfigUnreadable(f"{where}: {key} {n} is negative")
    return n


def _settings_lines(path: Path, depth: int = 0) -> list[tuple[str, str, str]]:
    """(key, value, 'file:line') for every setting line, include_dir files in place, in the
    order mosquitto reads them (a later line overrides an earlier one)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise BrokerConfigUnreadable(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise BrokerConfigUnreadable(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
    text = raw.decode("utf-8", "replace")
    out: list[tuple[str, str, str]] = []
    for n, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.replace("\t", " ").partition(" ")
        value = value.strip()
        if key == "include_dir" and value:
            if depth >= MAX_INCLUDE_DEPTH:
                raise BrokerConfigUnreadable(f"{path}:{n}: include_dir nested too deep")
            folder = Path(value) if Path(value).is_absolute() else path.parent / value
            try:
                files = sorted(p for p in folder.iterdir() if p.name.endswith(".conf"))
            except OSError as exc:
                raise BrokerConfigUnreadable(
                    f"{path}:{n}: cannot list include_dir {folder}: {exc.strerror or exc}"
                ) from None
            for inc in files:
                out += _settings_lines(inc, depth + 1)
            continue
        out.append((key, value, f"{path}:{n}"))
    return out


def read_mosquitto_limits(path: Path) -> QueueLimit:
    """The per-client queue cap that the mosquitto.conf at ``path`` sets (defaults if absent).

    Raises :class:`BrokerConfigUnreadable` when the file cannot be read or a value is bad.
    """
    messages, bytes_ = MOSQUITTO_DEFAULT_MAX_QUEUED_MESSAGES, MOSQUITTO_DEFAULT_MAX_QUEUED_BYTES
    msg_from = f"mosquitto's default: max_queued_messages is not set in {path}"
    bytes_from = ""
    for key, value, where in _settings_lines(path):
        if key == "max_queued_messages":
            messages = _number(key, value, where)
            msg_from = f"max_queued_messages in {where}"
        elif key == "max_queued_bytes":
            bytes_ = _number(key, value, where)
            bytes_from = f"max_queued_bytes in {where}"
    return QueueLimit(messages, bytes_, msg_from, bytes_from)


def broker_queue_limit(mqtt: MqttSection) -> QueueLimit | None:
    """The configured or readable queue cap of the local broker, or None if unknown."""
    if mqtt.broker_max_queued_messages is not None:
        return QueueLimit(mqtt.broker_max_queued_messages, 0, "mqtt.broker_max_queued_messages")
    if mqtt.broker_config is not None:
        return read_mosquitto_limits(mqtt.broker_config)
    return None


def _fmt(x: float) -> str:
    return f"{x:g}"


def queue_limit_warnings(mqtt: MqttSection) -> list[str]:
    """Warnings (plain sentences with the numbers) when the local broker's queue cap cannot
    hold ``outage_tolerance_seconds x expected_rate`` messages; empty when it can, or when
    ``expected_rate`` is not set."""
    rate = mqtt.expected_rate
    if rate is None:
        return []
    tolerance = mqtt.outage_tolerance_seconds
    needed = math.ceil(tolerance * rate)
    need_text = (
        f"{_fmt(tolerance)} s x {_fmt(rate)} msg/s = {needed} needed for the outage tolerance"
    )
    try:
        limit = broker_queue_limit(mqtt)
    except BrokerConfigUnreadable as exc:
        return [f"mqtt.broker_config: {exc}; the broker's queue limit was not checked"]
    if limit is None:
        unknown = (
            f"mqtt.expected_rate is set but the local broker's queue limit is unknown "
            f"({need_text}): set mqtt.broker_max_queued_messages or mqtt.broker_config"
        )
        return [unknown]
    out = []
    if limit.messages and limit.messages < needed:
        out.append(
            f"broker queue limit {limit.messages} messages < {need_text} ({limit.source}): "
            f"messages beyond it are dropped by the broker during an outage; raise the broker's "
            f"max_queued_messages to at least {needed} (or 0, unlimited)"
        )
    if limit.bytes and needed:
        out.append(
            f"broker queue limit {limit.bytes} bytes ({limit.bytes_source}): the "
            f"{needed} messages the outage tolerance needs fit only if their payloads average at "
            f"most {limit.bytes // needed} bytes"
        )
    return out
