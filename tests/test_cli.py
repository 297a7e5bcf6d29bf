"""The `qgw` command line as a user runs it: exit codes, messages, no tracebacks, no secrets."""

from __future__ import annotations

import os
from pathlib import Path

from gateway import __version__

from .conftest import ROOT, run_qgw

MINIMAL = """
[auth]
mode = "psk"
psk_file = "psk"
peer_name = "beta"
[qkd]
mode = "off"
"""


def test_version_and_help() -> None:
    r = run_qgw("--version")
    assert r.returncode == 0
    assert __version__ in r.stdout
    r = run_qgw("--help")
    assert r.returncode == 0
    assert "check-config" in r.stdout
    r = run_qgw()
    assert r.returncode == 2


def test_check_config_example_exits_0() -> None:
    r = run_qgw("check-config", "--config", str(ROOT / "config.example.toml"))
    assert r.returncode == 0, r.stderr
    assert "[gateway]" in r.stdout
    assert "configuration OK" in r.stderr


def test_check_config_lists_missing_files_with_hint_and_strict_fails(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(MINIMAL)
    r = run_qgw("check-config", "--config", str(cfg))
    assert r.returncode == 0
    assert "auth.psk_file" in r.stderr
    assert "qgw init-demo" in r.stderr
    r = run_qgw("check-config", "--strict", "--config", str(cfg))
    assert r.returncode == 2
    assert "auth.psk_file: file not found" in r.stderr


def test_misspelt_key_exits_2_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nsite_idd = "x"\n' + MINIMAL)
    r = run_qgw("check-config", "--config", str(cfg))
    assert r.returncode == 2
    assert "gateway.site_idd: unknown key" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_wrong_type_exits_2_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(MINIMAL + '[rekey]\nmax_bytes = "lots"\n')
    r = run_qgw("check-config", "--config", str(cfg))
    assert r.returncode == 2
    assert "rekey.max_bytes" in r.stderr
    assert "Traceback" not in r.stderr


def test_env_typo_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(MINIMAL)
    r = run_qgw("check-config", "--config", str(cfg), env={"QGW_GATEWAY__SITEID": "x"})
    assert r.returncode == 2
    assert "gateway.siteid: unknown key" in r.stderr


def test_env_override_shows_in_effective_config(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(MINIMAL)
    r = run_qgw("check-config", "--config", str(cfg), env={"QGW_REKEY__INTERVAL_SECONDS": "42"})
    assert r.returncode == 0
    assert "interval_seconds = 42.0" in r.stdout


def test_world_readable_key_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(MINIMAL)
    psk = tmp_path / "psk"
    psk.write_bytes(os.urandom(32))
    psk.chmod(0o644)
    r = run_qgw("check-config", "--config", str(cfg))
    assert r.returncode == 2
    assert "auth.psk_file" in r.stderr
    assert "readable by group or others" in r.stderr
    psk.chmod(0o600)
    r = run_qgw("check-config", "--strict", "--config", str(cfg))
    assert r.returncode == 0, r.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    r = run_qgw("check-config", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2
    assert "cannot read config file" in r.stderr
    assert "Traceback" not in r.stderr


def test_secret_in_config_never_printed(tmp_path: Path) -> None:
    secret = "Pa55-word-never-shown-77"
    cfg = tmp_path / "gw.toml"
    cfg.write_text(MINIMAL + f'[mqtt]\npassword = "{secret}"\n')
    r = run_qgw("check-config", "--config", str(cfg))
    assert r.returncode == 0
    assert secret not in r.stdout + r.stderr
    # also when it arrives through the environment, and when the config is otherwise broken
    r = run_qgw("check-config", "--config", str(cfg), env={"QGW_MQTT__PASSWORD": secret + "x"})
    assert secret not in r.stdout + r.stderr
    cfg.write_text(MINIMAL + f'[mqtt]\npassword = "{secret}"\nbroker = 5\n')
    r = run_qgw("check-config", "--config", str(cfg))
    assert r.returncode == 2
    assert secret not in r.stdout + r.stderr
