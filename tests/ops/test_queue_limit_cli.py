"""`qgw check-config` warns when the local broker's queue cannot hold the outage tolerance."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_qgw

BASE = """
[auth]
mode = "psk"
psk_file = "psk"
peer_name = "beta"
[qkd]
mode = "off"
[mqtt]
outage_tolerance_seconds = 300
expected_rate = 50
"""


def check(tmp_path: Path, mqtt_extra: str, *flags: str) -> tuple[int, str]:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BASE + mqtt_extra)
    psk = tmp_path / "psk"
    psk.write_bytes(b"k" * 32)
    psk.chmod(0o600)
    r = run_qgw("check-config", *flags, "--config", str(cfg))
    return r.returncode, r.stderr


def test_small_mosquitto_queue_warns_and_big_one_does_not(tmp_path: Path) -> None:
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883\npersistence true\n")  # max_queued_messages: default 1000
    code, err = check(tmp_path, 'broker_config = "mosquitto.conf"\n')
    assert code == 0, err
    assert (
        "warning: broker queue limit 1000 messages < 300 s x 50 msg/s = 15000 needed for the "
        "outage tolerance" in err
    )
    assert "configuration OK" in err
    # a warning, not an error, also under --strict (like certificate expiry)
    code, err = check(tmp_path, 'broker_config = "mosquitto.conf"\n', "--strict")
    assert code == 0, err
    assert "broker queue limit 1000 messages" in err

    conf.write_text("listener 1883\nmax_queued_messages 100000\n")
    code, err = check(tmp_path, 'broker_config = "mosquitto.conf"\n')
    assert code == 0, err
    assert "queue limit" not in err


def test_explicit_limit_and_unlimited(tmp_path: Path) -> None:
    code, err = check(tmp_path, "broker_max_queued_messages = 14999\n")
    assert code == 0, err
    assert "broker queue limit 14999 messages < 300 s x 50 msg/s = 15000 needed" in err
    code, err = check(tmp_path, "broker_max_queued_messages = 0\n")
    assert code == 0, err
    assert "queue limit" not in err


def test_new_keys_are_typed(tmp_path: Path) -> None:
    code, err = check(tmp_path, "broker_max_queued_messages = -1\n")
    assert code == 2
    assert "mqtt.broker_max_queued_messages" in err
