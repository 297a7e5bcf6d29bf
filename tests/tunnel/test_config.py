"""``[[tunnel]]`` configuration: the shape, validation messages in words, the TOML round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.config import load_settings, redacted_dump, split_address, to_toml
from gateway.errors import ConfigError

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


def load(tmp_path: Path, text: str) -> object:
    p = tmp_path / "gw.toml"
    p.write_text(MINIMAL + text)
    return load_settings(p, environ={})


def problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    return str(exc.value)


def test_both_ends_parse(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        '[[tunnel]]\nname = "mqtt-bridge"\nlisten = "127.0.0.1:1884"\n'
        '[[tunnel]]\nname = "opc.ua"\nconnect = "[::1]:4840"\n',
    )
    tunnels = s.tunnel  # type: ignore[attr-defined]
    assert [(t.name, t.listen, t.connect) for t in tunnels] == [
        ("mqtt-bridge", "127.0.0.1:1884", None),
        ("opc.ua", None, "[::1]:4840"),
    ]
    assert split_address(tunnels[1].connect) == ("::1", 4840)


def test_no_tunnels_by_default(tmp_path: Path) -> None:
    assert load(tmp_path, "").tunnel == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('name = "x"\n', "exactly one of listen"),
        ('name = "x"\nlisten = "127.0.0.1:1"\nconnect = "127.0.0.1:2"\n', "exactly one of listen"),
        ('name = "x"\nlisten = "localhost"\n', "is not HOST:PORT"),
        ('name = "x"\nconnect = "host:99999"\n', "port must be a number from 0 to 65535"),
        ('name = "x"\nconnect = "::1:80"\n', "IPv6 address in brackets"),
        ('name = "x"\nconnect = "127.0.0.1:0"\n', "port other than 0"),
        ('name = "bad name"\nlisten = "127.0.0.1:1"\n', "tunnel[0].name"),
        ('name = "x"\nlisten = "127.0.0.1:1"\nport = 3\n', "unknown key"),
    ],
)
def test_bad_entries_are_explained(tmp_path: Path, text: str, words: str) -> None:
    assert words in problems(tmp_path, "[[tunnel]]\n" + text)


def test_names_must_be_unique(tmp_path: Path) -> None:
    msg = problems(
        tmp_path,
        '[[tunnel]]\nname = "x"\nlisten = "127.0.0.1:1"\n'
        '[[tunnel]]\nname = "x"\nconnect = "127.0.0.1:2"\n',
    )
    assert "'x' is used twice" in msg


def test_toml_round_trip(tmp_path: Path) -> None:
    s = load(tmp_path, '[[tunnel]]\nname = "a"\nlisten = "127.0.0.1:5"\n')
    data = redacted_dump(s)  # type: ignore[arg-type]
    again = tomllib.loads(to_toml(data))
    assert again["tunnel"] == [{"name": "a", "listen": "127.0.0.1:5"}]
