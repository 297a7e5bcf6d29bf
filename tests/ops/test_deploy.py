"""deploy/: example site configs validate, units are hardened, compose draws the site boundary.

Docker is not available on the test machine and PyYAML is not a dependency, so compose.yaml is
checked with a small line-based reader of the subset it uses (block mappings, flow lists).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.config import Role, load_settings
from tests.conftest import ROOT, run_qgw

DEPLOY = ROOT / "deploy"
SITES = ("site-a", "site-b")


# -- example site configs ---------------------------------------------------------------------


@pytest.mark.parametrize("site", SITES)
def test_example_site_config_validates(site: str) -> None:
    proc = run_qgw("check-config", "--config", str(DEPLOY / "examples" / f"{site}.toml"))
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stderr


def test_example_sites_mirror_each_other() -> None:
    a = load_settings(DEPLOY / "examples" / "site-a.toml", environ={})
    b = load_settings(DEPLOY / "examples" / "site-b.toml", environ={})
    assert {a.gateway.role, b.gateway.role} == {Role.INITIATOR, Role.RESPONDER}
    assert a.auth.peer_name == b.gateway.site_id
    assert b.auth.peer_name == a.gateway.site_id
    assert (a.qkd.sae_id, a.qkd.peer_sae_id) == (b.qkd.peer_sae_id, b.qkd.sae_id)
    assert a.crypto.suite == b.crypto.suite
    assert a.qkd.mode == b.qkd.mode
    assert a.mqtt.client_id != b.mqtt.client_id
    # Every rule leaving one site has a matching rule entering the other: the same pattern and
    # the same link name (remote_prefix names topics on the link, docs/bridge.md).
    for src, dst in ((a, b), (b, a)):
        for rule in (r for r in src.mqtt.rules if r.direction == "out"):
            assert any(
                r.direction == "in"
                and r.pattern == rule.pattern
                and r.remote_prefix == rule.remote_prefix
                for r in dst.mqtt.rules
            ), f"no matching 'in' rule at {dst.gateway.site_id} for {rule.pattern}"


# -- systemd units ----------------------------------------------------------------------------

HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ReadOnlyPaths": "/etc/qgw",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "RestrictSUIDSGID": "yes",
    "Restart": "on-failure",
    "User": "qgw",
}


def unit_service_section(path: Path) -> dict[str, list[str]]:
    section = ""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", ["qgw@.service", "qgw-kme-sim.service"])
def test_units_are_hardened(unit: str) -> None:
    svc = unit_service_section(DEPLOY / "systemd" / unit)
    for key, value in HARDENING.items():
        assert value in svc.get(key, []), f"{unit}: {key}={value} missing"
    assert "DynamicUser" not in svc or svc["DynamicUser"] == ["no"] or "User" not in svc
    assert any("@system-service" in v for v in svc["SystemCallFilter"])


def test_gateway_unit_runs_the_instance_config() -> None:
    svc = unit_service_section(DEPLOY / "systemd" / "qgw@.service")
    assert svc["ExecStart"] == ["/opt/qgw/venv/bin/qgw run --config /etc/qgw/%i.toml"]
    assert "2" in svc["RestartPreventExitStatus"]  # config errors do not restart-loop


def test_units_verify_with_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed; directives are checked by the other tests")
    # verify insists that ExecStart binaries exist: point them at one that does.
    names = []
    for unit in ("qgw@.service", "qgw-kme-sim.service"):
        text = (DEPLOY / "systemd" / unit).read_text().replace("/opt/qgw/venv/bin/qgw", "/bin/true")
        name = "qgw@site-a.service" if unit == "qgw@.service" else unit
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    proc = subprocess.run(
        [analyze, "verify", "--man=no", *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Unknown" not in proc.stderr, proc.stderr


# -- compose.yaml -----------------------------------------------------------------------------


@dataclass
class Service:
    networks: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    command: str = ""


@dataclass
class Compose:
    top: list[str]
    services: dict[str, Service]
    networks: dict[str, str]  # name -> flow mapping text


def _flow_list(text: str) -> list[str]:
    text = text.strip()
    assert text.startswith("["), text
    assert text.endswith("]"), text
    return [x.strip().strip("\"'") for x in text[1:-1].split(",") if x.strip()]


def read_compose(path: Path) -> Compose:
    """Read the YAML subset compose.yaml uses; fail on anything unexpected (tabs, odd indent)."""
    top: list[str] = []
    services: dict[str, Service] = {}
    networks: dict[str, str] = {}
    section = ""
    svc: Service | None = None
    key = ""
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        assert "\t" not in raw, f"line {n}: tab"
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"line {n}: odd indentation"
        text = line.strip()
        if indent == 0:
            m = re.fullmatch(r"([\w.-]+):(?: &\w+)?", text)
            assert m, f"line {n}: top-level key expected: {text!r}"
            section = m.group(1)
            top.append(section)
            continue
        if section == "services":
            if indent == 2:
                m = re.fullmatch(r"([\w-]+):", text)
                assert m, f"line {n}: service name expected"
                svc = services.setdefault(m.group(1), Service())
            elif indent == 4:
                assert svc is not None
                key, _, value = text.partition(":")
                value = value.strip()
                if key == "networks" and value:
                    svc.networks = _flow_list(value)
                elif key == "command":
                    svc.command = " ".join(_flow_list(value))
            elif indent == 6 and svc is not None:
                if key == "environment":
                    k, _, v = text.partition(":")
                    svc.environment[k.strip()] = v.strip().strip('"')
                elif key == "volumes":
                    assert text.startswith("- "), f"line {n}"
                    svc.volumes.append(text[2:].strip())
        elif section == "networks" and indent == 2:
            name, _, value = text.partition(":")
            networks[name] = value.strip()
    return Compose(top, services, networks)


@pytest.fixture(scope="module")
def compose() -> Compose:
    return read_compose(DEPLOY / "compose.yaml")


def test_compose_has_two_sites(compose: Compose) -> None:
    assert {"services", "networks", "volumes"} <= set(compose.top)
    for s in ("a", "b"):
        for role in ("mosquitto", "kme", "gateway"):
            assert f"{role}-{s}" in compose.services
            assert compose.services[f"{role}-{s}"].networks, f"{role}-{s} has no networks"
    declared = set(compose.networks)
    for name, svc in compose.services.items():
        assert set(svc.networks) <= declared, f"{name} uses an undeclared network"


def test_compose_secure_site_boundary(compose: Compose) -> None:
    on: dict[str, set[str]] = {}
    for name, svc in compose.services.items():
        for net in svc.networks:
            on.setdefault(net, set()).add(name)
    for s in ("a", "b"):
        kme_nets = set(compose.services[f"kme-{s}"].networks)
        # Every network the KME is on is internal and holds no other site's gateway/broker.
        for net in kme_nets:
            assert "internal: true" in compose.networks[net], f"{net} must be internal"
            assert on[net] <= {f"kme-{s}", f"gateway-{s}", "kme-a", "kme-b"}, (net, on[net])
        # The KME's own site network: exactly this KME and this gateway.
        own = [net for net in kme_nets if f"gateway-{s}" in on[net]]
        assert own, f"gateway-{s} cannot reach kme-{s}"
        for net in own:
            assert on[net] == {f"kme-{s}", f"gateway-{s}"}, (net, on[net])
        assert "wan" not in kme_nets
        assert not kme_nets & set(compose.services[f"mosquitto-{s}"].networks)
    # The gateways meet only on the WAN; the KMEs only on their own link.
    shared = set(compose.services["gateway-a"].networks) & set(
        compose.services["gateway-b"].networks
    )
    assert shared == {"wan"}
    kme_shared = set(compose.services["kme-a"].networks) & set(compose.services["kme-b"].networks)
    assert kme_shared
    assert all("internal: true" in compose.networks[n] for n in kme_shared)


def test_compose_mounts_exist(compose: Compose) -> None:
    for name, svc in compose.services.items():
        for vol in svc.volumes:
            src = vol.split(":", 1)[0]
            if src.startswith("./"):  # ${QGW_DEMO_DIR:-./demo} is made by qgw init-demo
                assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"


@pytest.mark.parametrize("site", ["a", "b"])
def test_compose_gateway_overrides_validate(compose: Compose, site: str) -> None:
    svc = compose.services[f"gateway-{site}"]
    assert svc.command.startswith("run --config /etc/qgw-compose/site-")
    env = {k: v for k, v in svc.environment.items() if k.startswith("QGW_")}
    assert env, "compose sets the site's host names through QGW_* variables"
    proc = run_qgw(
        "check-config", "--config", str(DEPLOY / "examples" / f"site-{site}.toml"), env=env
    )
    assert proc.returncode == 0, proc.stderr
    for key, value in env.items():
        leaf = key.split("__", 1)[1].lower()
        assert f'{leaf} = "{value}"' in proc.stdout, f"{key} not in effect"


def test_compose_kme_config_matches_the_simulator_schema() -> None:
    kme_config = pytest.importorskip(
        "keysource.kme_config", reason="the KME simulator (keysource.kme_config) is not merged yet"
    )
    path = DEPLOY / "compose" / "kme.toml"
    data = tomllib.loads(path.read_text())
    cfg = kme_config.kme_config_from_dict(data, base=path.parent)
    assert cfg.kme_a.sae_ids == ["sae-a"]
    assert cfg.kme_b.sae_ids == ["sae-b"]


# -- container image --------------------------------------------------------------------------


def test_containerfile_shape() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    # ARG BASE defaults to the official slim image pinned by digest; every stage is FROM it.
    base = re.search(r"^ARG BASE=(\S+)$", text, re.MULTILINE)
    assert base, "ARG BASE=<default image> missing"
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1))
    froms = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert froms
    assert set(froms) == {"${BASE}"}
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users
    assert users[-1] not in ("root", "0", "0:0")
    assert "--no-index" in text  # the runtime stage installs only the wheels built before
    assert "PIP_CONSTRAINT=/src/deploy/constraints.txt" in text  # the pins shared with setup.sh
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.MULTILINE)
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for part in src.split():
            if part.endswith("*"):  # optional (the wheelhouse of registry-less builds)
                continue
            assert (ROOT / part).exists(), f"COPY source {part} missing"


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = {}
    for raw in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not pinned: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0]).lower()
        assert name in pins, f"{name} is not pinned in deploy/constraints.txt"
    assert "constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()


def _x509(path: Path, *fields: str) -> str:
    """``openssl x509 -noout`` fields of a PEM certificate, as text (RFC 2253 names)."""
    proc = subprocess.run(
        ["openssl", "x509", "-noout", "-nameopt", "RFC2253", *fields, "-in", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


def test_compose_kme_config_matches_init_demo_pki(tmp_path: Path) -> None:
    """The KME config of the compose file names what `qgw init-demo --kme-host` writes."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed (scripts/setup.sh installs it)")
    proc = run_qgw("init-demo", str(tmp_path / "d"), "--kme-host", "kme-a", "--kme-host", "kme-b")
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads((DEPLOY / "compose" / "kme.toml").read_text())

    def local(path: str) -> Path:
        assert path.startswith("/etc/qgw/"), path
        return tmp_path / "d" / path.removeprefix("/etc/qgw/")

    def subject(path: str) -> str:
        return _x509(local(path), "-subject").removeprefix("subject=").strip()

    sync_ca = subject(data["sync"]["ca"])
    for section, host, sae in (("kme_a", "kme-a", "sae-a"), ("kme_b", "kme-b", "sae-b")):
        kme = data[section]
        for k in ("cert", "key", "ca", "sync_cert", "sync_key"):
            assert local(kme[k]).exists(), f"{section}.{k}: init-demo writes no {kme[k]}"
        # [kme_x] ca verifies the SAE client certificates the gateways present
        sae_cert = _x509(local(f"/etc/qgw/kme-pki/{sae}.crt"), "-issuer")
        assert f"issuer={subject(kme['ca'])}" in sae_cert, f"{section}: ca does not sign {sae}"
        sync = _x509(local(kme["sync_cert"]), "-subject", "-issuer")
        assert f"issuer={sync_ca}\n" in sync, f"{section}: [sync] ca does not sign sync_cert"
        cn = re.search(r"^subject=.*\bCN=([^,\n]+)", sync, re.MULTILINE)
        assert cn, sync
        assert kme["kme_id"] == cn.group(1), f"{section}: kme_id must be the sync cert's CN"
        for cert in (kme["cert"], kme["sync_cert"]):
            san = _x509(local(cert), "-ext", "subjectAltName")
            assert f"DNS:{host}" in san, f"{cert} lacks DNS:{host}"


def test_compose_depends_on_is_health_gated() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    for svc, deps in (
        ("gateway-a", ("mosquitto-a", "kme-a", "gateway-b")),
        ("gateway-b", ("mosquitto-b", "kme-b")),
    ):
        block = text.split(f"\n  {svc}:\n", 1)[1].split("\n  # ----", 1)[0].split("\n\n", 1)[0]
        for dep in deps:
            assert f"{dep}: {{condition: service_healthy}}" in block, f"{svc} -> {dep}"
