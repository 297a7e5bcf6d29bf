"""wot configuration and command line: `[auth]` keys through the loader that `run` uses,
`qgw wot init-introducer / keygen / endorse / show`, `qgw init-demo --auth wot`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.credentials import check_credentials, load_credentials
from gateway.crypto import get_provider, wot
from gateway.errors import ConfigError
from gateway.initdemo import init_demo
from tests.conftest import run_qgw

PROVIDER = get_provider("pyca")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wotdemo")
    init_demo(root, auth="wot")
    return root


def _with_auth(demo: Path, tmp: Path, **changes: object) -> Path:
    """site-b.toml of the demo with ``[auth]`` keys changed, written next to the demo files."""
    from gateway.config import to_toml

    data = tomllib.loads((demo / "site-b.toml").read_text())
    data["auth"].update(changes)
    data["auth"] = {k: v for k, v in data["auth"].items() if v is not None}
    path = demo / f"{tmp.name}.toml"
    path.write_text(to_toml(data))
    return path


def test_init_demo_wot_writes_four_introducers_and_loads(demo: Path) -> None:
    s = load_settings(demo / "site-a.toml", environ={})
    assert [i.trust.value for i in s.auth.introducers] == [
        "full",
        "marginal",
        "marginal",
        "marginal",
    ]
    auth, own = load_credentials(s, PROVIDER)
    assert auth.identity == "site-a"
    assert len(auth.certs) == 4
    assert own is None
    assert oct((demo / "wot" / "site-a.key").stat().st_mode & 0o777) == "0o600"
    for d in (demo / "wot" / "introducers").iterdir():
        assert (d / "introducer.key").stat().st_mode & 0o077 == 0
    report = check_credentials(s, PROVIDER)
    assert not report.problems
    assert any("4 introducer(s)" in line for line in report.lines)


@pytest.mark.parametrize(
    ("changes", "key", "text"),
    [
        ({"endorsements": None}, "auth", "needs endorsements"),
        ({"introducers": []}, "auth", "at least one [[auth.introducers]]"),
        ({"marginals_needed": 5}, "auth.marginals_needed", "less than or equal to 4"),
        ({"full_needed": 0}, "auth.full_needed", "greater than or equal to 1"),
    ],
)
def test_wot_config_shape_errors_name_the_key(
    demo: Path, tmp_path: Path, changes: dict[str, object], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(_with_auth(demo, tmp_path, **changes), environ={})
    problems = dict(exc.value.problems)
    assert key in problems, problems
    assert text in problems[key]


def test_wot_credential_errors_name_the_key(demo: Path, tmp_path: Path) -> None:
    intro = "wot/introducers/full-1/introducer.crt"
    cases = [
        (
            {
                "introducers": [
                    {"file": intro, "trust": "full"},
                    {"file": intro, "trust": "marginal"},
                ]
            },
            "auth.introducers[1].file",
            "the same introducer key",
        ),
        ({"endorsements": "wot/site-a.endorsements.pem"}, "auth.endorsements", "another key"),
        ({"revoked": "wot/site-b.pub"}, "auth.revoked", "64 hex digits"),
        (
            {"introducers": [{"file": "wot/site-b.pub", "trust": "full"}]},
            "auth.introducers[0].file",
            "not a PEM certificate",
        ),
        ({"peer_name": "site-b"}, "auth.peer_name", "equals our own"),
    ]
    for changes, key, text in cases:
        s = load_settings(_with_auth(demo, tmp_path, **changes), environ={})
        with pytest.raises(ConfigError) as exc:
            load_credentials(s, PROVIDER)
        problems = dict(exc.value.problems)
        assert key in problems, (changes, problems)
        assert text in problems[key], (changes, problems)


def test_cli_introducer_keygen_endorse_show(tmp_path: Path, demo: Path) -> None:
    intro = tmp_path / "intro"
    r = run_qgw("wot", "init-introducer", "--out", str(intro), "--name", "ops")
    assert r.returncode == 0, r.stderr
    assert (intro / "introducer.key").stat().st_mode & 0o077 == 0
    r = run_qgw("wot", "keygen", "--out", str(tmp_path), "--name", "site-a")
    assert r.returncode == 0, r.stderr
    assert "BEGIN PRIVATE KEY" not in r.stdout + r.stderr
    out = tmp_path / "e.pem"
    r = run_qgw(
        "wot", "endorse", "--introducer", str(intro), "--name", "site-a",
        "--key", str(tmp_path / "site-a.pub"), "--days", "7", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = run_qgw("wot", "show", str(out))
    assert r.returncode == 0, r.stderr
    assert "'ops' vouches for site-a" in r.stdout
    assert "6 days left" in r.stdout
    assert "policy: not evaluated" in r.stdout
    # judged by the demo's site-b policy: "ops" is not one of its introducers
    r = run_qgw("wot", "show", str(out), "--config", str(demo / "site-b.toml"))
    assert r.returncode == 1
    assert "REFUSED" in r.stdout
    assert "issued by an unknown key" in r.stdout
    r = run_qgw(
        "wot",
        "show",
        str(demo / "wot" / "site-a.endorsements.pem"),
        "--config",
        str(demo / "site-b.toml"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ACCEPTED: 1 full + 3 marginal" in r.stdout
    # stdout endorsement, then refusing to overwrite an introducer
    r = run_qgw(
        "wot", "endorse", "--introducer", str(intro), "--name", "site-a",
        "--key", str(tmp_path / "site-a.pub"),
    )  # fmt: skip
    assert r.returncode == 0
    assert wot.load_endorsements(r.stdout.encode())
    r = run_qgw("wot", "init-introducer", "--out", str(intro))
    assert r.returncode == 2
    assert "refusing to overwrite" in r.stderr
    r = run_qgw("wot", "show", str(tmp_path / "site-a.pub"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
