"""`check-config --strict` loads credentials exactly as `run` does, and `run` never shows a traceback.

Each case breaks one credential of a demo set written by `qgw init-demo` and runs the real
command line in a subprocess.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.credentials import check_credentials
from gateway.crypto import get_provider
from tests.conftest import ROOT, run_qgw


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("creds") / "demo"
    r = run_qgw("init-demo", str(root))
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture
def site(demo_set: Path, tmp_path: Path) -> Path:
    """A private copy of the demo set; returns site-a.toml inside it."""
    copy = tmp_path / "demo"
    shutil.copytree(demo_set, copy)
    return copy / "site-a.toml"


def strict(cfg: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_qgw("check-config", "--strict", "--config", str(cfg), env=env or None)


def test_good_set_reports_what_it_checked(site: Path) -> None:
    r = strict(site)
    assert r.returncode == 0, r.stderr
    assert "key matches" in r.stderr
    assert "chain verifies against" in r.stderr
    assert "KME client certificate valid until" in r.stderr


def test_garbage_certificate_is_refused(site: Path) -> None:
    (site.parent / "gw-pki/site-a.crt").write_text("garbage\n")
    r = strict(site)
    assert r.returncode == 2
    assert "auth.cert" in r.stderr
    assert "not a PEM certificate" in r.stderr
    assert "Traceback" not in r.stderr


def test_key_of_another_certificate_is_refused(site: Path) -> None:
    pki = site.parent / "gw-pki"
    shutil.copyfile(pki / "site-b.key", pki / "site-a.key")
    r = strict(site)
    assert r.returncode == 2
    assert "auth.key" in r.stderr
    assert "is not the private key of the certificate" in r.stderr


def test_ca_that_did_not_sign_us_is_refused(site: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    r = run_qgw("pki", "init-ca", "--out", str(other))
    assert r.returncode == 0, r.stderr
    shutil.copyfile(other / "ca.crt", site.parent / "gw-pki/ca.crt")
    r = strict(site)
    assert r.returncode == 2
    assert "auth.ca" in r.stderr
    assert "does not verify against" in r.stderr


def test_garbage_kme_client_key_is_refused(site: Path) -> None:
    key = site.parent / "kme-pki/sae-a.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    key.chmod(0o600)
    r = strict(site)
    assert r.returncode == 2
    assert "qkd" in r.stderr
    assert "do not load" in r.stderr
    assert "Traceback" not in r.stderr


def test_expired_certificate_is_refused_by_the_shared_loader(site: Path) -> None:
    settings = load_settings(site, environ={})
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650)
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        check_credentials(settings, get_provider("pyca"), now=later)
    assert any(key == "auth.cert" and "expired" in msg for key, msg in exc.value.problems)


def test_certificate_close_to_expiry_warns(site: Path) -> None:
    settings = load_settings(site, environ={})
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=350)
    report = check_credentials(settings, get_provider("pyca"), now=soon)
    assert any("auth.cert expires in" in w for w in report.warnings)


DROP_DAC = "-dac_override,-dac_read_search"


def without_dac_override(*args: str) -> subprocess.CompletedProcess[str]:
    """Run qgw as this user but without the capabilities that let root read any file.

    That is what a service user sees: file modes apply. (Running as another uid would need an
    interpreter that uid can execute, which a per-user pyenv is not.)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("QGW_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [
            "setpriv",
            f"--inh-caps={DROP_DAC}",
            f"--bounding-set={DROP_DAC}",
            sys.executable,
            "-m",
            "gateway",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_unreadable_key_is_named_for_check_and_run(site: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and util-linux setpriv to drop CAP_DAC_OVERRIDE")
    (site.parent / "gw-pki/site-a.key").chmod(0)  # private, but not even readable by its owner
    for command in ("check-config", "run"):
        args = [command, "--config", str(site)]
        if command == "check-config":
            args.insert(1, "--strict")
        r = without_dac_override(*args)
        assert r.returncode == 2, (command, r.stderr)
        assert "Traceback" not in r.stderr
        assert "auth.key" in r.stderr
        assert "cannot read" in r.stderr
        assert "as user" in r.stderr


def test_run_refuses_a_mismatched_key_before_connecting(site: Path) -> None:
    pki = site.parent / "gw-pki"
    shutil.copyfile(pki / "site-b.key", pki / "site-a.key")
    r = run_qgw("run", "--config", str(site), timeout=30)
    assert r.returncode == 2
    assert "is not the private key of the certificate" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("QGW_FOO__BAR", "no section 'foo'"),
        ("QGW_AUTH_MODE", "did you mean QGW_AUTH__MODE"),
        ("QGW_GATEWAY__PEER__X", "one level"),
    ],
)
def test_unknown_environment_variables_are_errors(site: Path, name: str, words: str) -> None:
    r = run_qgw("check-config", "--config", str(site), env={name: "x"})
    assert r.returncode == 2
    assert name in r.stderr
    assert words in r.stderr


def test_bad_values_are_explained_in_words(site: Path) -> None:
    r = run_qgw(
        "check-config",
        "--config",
        str(site),
        env={"QGW_GATEWAY__LISTEN": "nowhere", "QGW_GATEWAY__SITE_ID": "a b"},
    )
    assert r.returncode == 2
    assert "gateway.listen: must be HOST:PORT" in r.stderr
    assert "gateway.site_id: must be 1 to 63 characters" in r.stderr
    assert "^" not in r.stderr  # no regular expression shown to the operator


def test_missing_oqs_provider_is_a_configuration_error(site: Path) -> None:
    from gateway.crypto import get_provider
    from gateway.errors import ProviderUnavailable

    try:
        get_provider("oqs")
    except ProviderUnavailable:
        pass
    else:
        pytest.skip("liboqs is installed here: the provider is available")
    r = run_qgw("run", "--config", str(site), env={"QGW_CRYPTO__PROVIDER": "oqs"}, timeout=30)
    assert r.returncode == 2, r.stderr  # not restarted by systemd (RestartPreventExitStatus=2)
    assert "crypto.provider" in r.stderr
    assert "Traceback" not in r.stderr
