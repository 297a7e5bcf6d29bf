"""check-config's broker queue check: a cap below outage tolerance x rate warns, with numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.bridge.mosquitto import Mosquitto
from gateway.bridge.queue_check import (
    BrokerConfigUnreadable,
    queue_limit_warnings,
    read_mosquitto_limits,
)
from gateway.config import MqttSection
from tests.support.mosquitto import require_mosquitto


def mqtt(**kw: object) -> MqttSection:
    return MqttSection(**kw)  # type: ignore[arg-type]


def test_no_rate_no_check() -> None:
    assert queue_limit_warnings(mqtt(broker_max_queued_messages=1)) == []


def test_too_small_limit_warns_naming_the_numbers() -> None:
    w = queue_limit_warnings(
        mqtt(outage_tolerance_seconds=300, expected_rate=50, broker_max_queued_messages=1000)
    )
    assert len(w) == 1
    assert "broker queue limit 1000 messages < 300 s x 50 msg/s = 15000 needed" in w[0]
    assert "mqtt.broker_max_queued_messages" in w[0]


@pytest.mark.parametrize("limit", [15000, 1_000_000, 0])
def test_big_enough_or_unlimited_is_quiet(limit: int) -> None:
    m = mqtt(outage_tolerance_seconds=300, expected_rate=50, broker_max_queued_messages=limit)
    assert queue_limit_warnings(m) == []


def test_unknown_limit_says_so() -> None:
    (w,) = queue_limit_warnings(mqtt(expected_rate=10))
    assert "queue limit is unknown" in w
    assert "300 s x 10 msg/s = 3000 needed" in w


def test_mosquitto_conf_default_is_1000(tmp_path: Path) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883\n# max_queued_messages 99999999\npersistence true\n")
    lim = read_mosquitto_limits(conf)
    assert (lim.messages, lim.bytes) == (1000, 0)
    (w,) = queue_limit_warnings(mqtt(expected_rate=50, broker_config=conf))
    assert "broker queue limit 1000 messages < 300 s x 50 msg/s = 15000 needed" in w
    assert "mosquitto's default" in w


def test_mosquitto_conf_values_include_dir_and_last_wins(tmp_path: Path) -> None:
    inc = tmp_path / "conf.d"
    inc.mkdir()
    (inc / "10-queue.conf").write_text("max_queued_messages 200\n")
    (inc / "20-queue.conf").write_text("max_queued_messages\t20000\nmax_queued_bytes 1500000\n")
    (inc / "ignored.txt").write_text("max_queued_messages 1\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"max_queued_messages 5\ninclude_dir {inc}\n")
    lim = read_mosquitto_limits(conf)
    assert (lim.messages, lim.bytes) == (20000, 1_500_000)
    (w,) = queue_limit_warnings(mqtt(expected_rate=50, broker_config=conf))
    assert "1500000 bytes" in w
    assert "at most 100 bytes" in w  # 1.5 MB over 15000 messages
    assert "20-queue.conf:2" in w


def test_unlimited_in_mosquitto_conf(tmp_path: Path) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("max_queued_messages 0\n")
    assert queue_limit_warnings(mqtt(expected_rate=1e6, broker_config=conf)) == []


def test_explicit_limit_beats_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("max_queued_messages 10\n")
    m = mqtt(expected_rate=50, broker_config=conf, broker_max_queued_messages=0)
    assert queue_limit_warnings(m) == []


@pytest.mark.parametrize(
    "text", ["max_queued_messages lots\n", "max_queued_messages -4\n", "include_dir /nonexistent\n"]
)
def test_bad_or_unreadable_conf_is_a_warning_not_a_crash(tmp_path: Path, text: str) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    with pytest.raises(BrokerConfigUnreadable):
        read_mosquitto_limits(conf)
    (w,) = queue_limit_warnings(mqtt(expected_rate=1, broker_config=conf))
    assert w.startswith("mqtt.broker_config: ")
    assert "not checked" in w
    (w,) = queue_limit_warnings(mqtt(expected_rate=1, broker_config=tmp_path / "missing.conf"))
    assert "cannot read" in w


def test_the_launchers_own_broker_config_is_read(tmp_path: Path) -> None:
    """The mosquitto qgw launches (demo, tests) writes a config this check understands."""
    require_mosquitto()
    small = Mosquitto(tmp_path / "small", max_queued_messages=500)
    big = Mosquitto(tmp_path / "big")
    for b in (small, big):
        b.write_config()
    assert read_mosquitto_limits(small.config_path).messages == 500
    assert read_mosquitto_limits(big.config_path).messages == 1_000_000
    (w,) = queue_limit_warnings(mqtt(expected_rate=50, broker_config=small.config_path))
    assert "broker queue limit 500 messages < 300 s x 50 msg/s = 15000 needed" in w
    assert queue_limit_warnings(mqtt(expected_rate=50, broker_config=big.config_path)) == []
