"""Configuration: TOML loading, environment precedence, validation errors, file checks, redaction."""

from __future__ import annotations

import os
import tomllib
import typing
from pathlib import Path

import pytest

from gateway.config import (
    AuthMode,
    QkdMode,
    check_files,
    load_settings,
    redacted_dump,
    require_files,
    to_toml,
)
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[gateway]
site_id = "alpha"
[auth]
mode = "psk"
psk_file = "keys/psk"
peer_name = "beta"
[qkd]
mode = "off"
"""


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(exc.value.problems)


def test_example_config_loads_and_has_every_section() -> None:
    s = load_settings(ROOT / "config.example.toml", environ={})
    assert s.auth.mode is AuthMode.PKI
    assert s.qkd.mode is QkdMode.REQUIRED
    assert len(s.mqtt.rules) == 2
    # every key of the model appears in the example (the example documents all keys)
    text = (ROOT / "config.example.toml").read_text()
    for section_name, section_field in type(s).model_fields.items():
        assert f"[{section_name}]" in text
        section_model = section_field.annotation
        if typing.get_origin(section_model) is list:  # [[tunnel]]: an array of tables
            (section_model,) = typing.get_args(section_model)
        for key in section_model.model_fields:  # type: ignore[union-attr]
            present = f"{key} =" in text or f"[[{section_name}.{key}]]" in text
            assert present, f"{section_name}.{key} missing from example"


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MINIMAL), environ={})
    assert s.auth.psk_file == tmp_path / "keys/psk"


def test_env_overrides_file_and_file_overrides_default(tmp_path: Path) -> None:
    cfg = write(tmp_path, MINIMAL + "\n[rekey]\ninterval_seconds = 60\nmax_records = 1000\n")
    s = load_settings(cfg, environ={"QGW_REKEY__INTERVAL_SECONDS": "30"})
    assert s.rekey.interval_seconds == 30  # env beats file
    assert s.rekey.max_records == 1000  # file beats default
    assert s.rekey.max_bytes == 2**36  # default
    s2 = load_settings(cfg, environ={})
    assert s2.rekey.interval_seconds == 60


def test_env_relative_path_resolves_against_config_folder(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MINIMAL), environ={"QGW_AUTH__PSK_FILE": "other/psk"})
    assert s.auth.psk_file == tmp_path / "other/psk"


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    cfg = write(tmp_path, MINIMAL.replace('site_id = "alpha"', 'site_idd = "alpha"'))
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ={})
    assert problems_of(exc) == {"gateway.site_idd": "unknown key"}


def test_unknown_key_in_env_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, MINIMAL), environ={"QGW_REKEY__INTERVALL": "3"})
    assert "rekey.intervall" in problems_of(exc)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, MINIMAL + "\n[gatway]\nx = 1\n"), environ={})
    assert problems_of(exc) == {"gatway": "unknown key"}


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ('[rekey]\ninterval_seconds = "soon"', "rekey.interval_seconds"),
        ("[rekey]\nmax_records = 1", "rekey.max_records"),
        ('[crypto]\nsuite = "rsa-aes128"', "crypto.suite"),
        ('[logging]\nlevel = "loud"', "logging.level"),
        ('[mqtt]\nbroker = "http://x"', "mqtt.broker"),
        ('[metrics]\nlisten = "nowhere"', "metrics.listen"),
        ('[[mqtt.rules]]\npattern = "a/#/b"', "mqtt.rules[0].pattern"),
        ('[[mqtt.rules]]\npattern = "a"\nqos = 2', "mqtt.rules[0].qos"),
        ('[[mqtt.rules]]\npattern = "a"\ndirection = "sideways"', "mqtt.rules[0].direction"),
    ],
)
def test_wrong_types_and_values_are_named(tmp_path: Path, snippet: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, MINIMAL + "\n" + snippet + "\n"), environ={})
    assert key in problems_of(exc), exc.value.problems


def test_gateway_hostport_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(
            write(tmp_path, MINIMAL.replace('site_id = "alpha"', 'peer = "host:99999"')), environ={}
        )
    assert "gateway.peer" in problems_of(exc)


def test_missing_required_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, '[gateway]\nsite_id = "a"\n'), environ={})
    assert set(problems_of(exc)) == {"auth", "qkd"}


def test_mode_specific_fields_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, '[auth]\nmode = "pki"\n[qkd]\nmode = "off"\n'), environ={})
    assert "cert, key, ca" in problems_of(exc)["auth"]
    text = '[auth]\nmode = "psk"\npsk_file = "p"\n[qkd]\nmode = "required"\nsource = "static"\n'
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text), environ={})
    assert "static_file" in problems_of(exc)["qkd"]


def test_kme_url_must_be_https(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'mode = "off"', 'mode = "required"\nkme_url = "http://kme"\ncert = "c"\nkey = "k"\nca = "a"'
    )
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, text), environ={})
    assert "https" in problems_of(exc)["qkd"]


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[gateway\n"), environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_file_checks_missing_and_mode(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MINIMAL), environ={})
    fc = check_files(s)
    assert [m.key for m in fc.missing] == ["auth.psk_file"]
    with pytest.raises(ConfigError, match="file not found"):
        require_files(s)
    psk = tmp_path / "keys" / "psk"
    psk.parent.mkdir()
    psk.write_bytes(os.urandom(32))
    psk.chmod(0o644)
    fc = check_files(s)
    assert fc.missing == []
    assert fc.problems
    assert fc.problems[0][0] == "auth.psk_file"
    assert "chmod 600" in fc.problems[0][1]
    psk.chmod(0o600)
    require_files(s)  # no exception
    assert check_files(s).problems == []


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "keys" / "psk").mkdir(parents=True)
    s = load_settings(write(tmp_path, MINIMAL), environ={})
    assert "not a regular file" in check_files(s).problems[0][1]


def test_password_is_redacted_everywhere(tmp_path: Path) -> None:
    secret = "hunter2-very-secret-Zq9"
    s = load_settings(write(tmp_path, MINIMAL + f'\n[mqtt]\npassword = "{secret}"\n'), environ={})
    assert s.mqtt.password is not None
    assert s.mqtt.password.get_secret_value() == secret
    assert secret not in repr(s)
    assert secret not in str(s)
    dumped = to_toml(redacted_dump(s))
    assert secret not in dumped
    assert 'password = "<redacted>"' in dumped


def test_validation_error_never_echoes_input(tmp_path: Path) -> None:
    secret = "s3cr3t-value-in-wrong-place"
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, MINIMAL + f'\n[mqtt]\npasword = "{secret}"\n'), environ={})
    assert secret not in str(exc.value)


def test_to_toml_round_trips(tmp_path: Path) -> None:
    s = load_settings(ROOT / "config.example.toml", environ={})
    data = redacted_dump(s)
    again = tomllib.loads(to_toml(data))
    assert again["mqtt"]["rules"] == data["mqtt"]["rules"]
    assert again["rekey"] == data["rekey"]
