"""Run the shipped deploy/compose.yaml under podman-compose: a project, its containers, waits.

The project is started with ``podman-compose -p NAME -f deploy/compose.yaml up -d`` and only
environment variables the compose file documents (demo folder, uid, images, host ports). Every
wait polls a condition with an explicit timeout and fails with what it was waiting for; the
conftest attaches every container's log to a failing test's report.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
SERVICES = ("mosquitto-a", "kme-a", "gateway-a", "mosquitto-b", "kme-b", "gateway-b")
COMMAND_TIMEOUT_SECONDS = 120.0  # one podman / podman-compose command
UP_TIMEOUT_SECONDS = 300.0  # podman-compose up -d of the six containers
PROJECT_LABEL = "io.podman.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


class CommandFailed(AssertionError):
    pass


def run(
    argv: list[str],
    env: dict[str, str],
    timeout: float = COMMAND_TIMEOUT_SECONDS,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"exit {proc.returncode}: {shlex.join(argv)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def wait_until(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    demo: Path
    ports: dict[str, int]
    _names: dict[str, str] = field(default_factory=dict)

    # -- commands ------------------------------------------------------------------------

    def podman(
        self, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], self.env, timeout, check)

    def compose(
        self, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "podman_compose", "-p", self.project, "-f", str(COMPOSE_FILE)]
        return run([*argv, *args], self.env, timeout, check)

    def up(self) -> None:
        self.compose("up", "-d", "--no-build", timeout=UP_TIMEOUT_SECONDS)

    def down(self) -> None:
        """Remove everything of this project, even when podman-compose itself fails."""
        self.compose("down", "-v", "-t", "5", timeout=UP_TIMEOUT_SECONDS, check=False)
        sel = f"label={PROJECT_LABEL}={self.project}"
        ids = self.podman("ps", "-aq", "--filter", sel, check=False).stdout.split()
        if ids:
            self.podman("rm", "-f", "-t", "0", *ids, check=False)
        for kind in ("network", "volume"):
            ids = self.podman(kind, "ls", "-q", "--filter", sel, check=False).stdout.split()
            if ids:
                self.podman(kind, "rm", "-f", *ids, check=False)

    # -- containers ----------------------------------------------------------------------

    def name(self, service: str) -> str:
        if service not in self._names:
            out = self.podman(
                "ps", "-a", "--format", "{{.Names}}",
                "--filter", f"label={PROJECT_LABEL}={self.project}",
                "--filter", f"label={SERVICE_LABEL}={service}",
            ).stdout.split()  # fmt: skip
            assert len(out) == 1, f"service {service}: containers {out}"
            self._names[service] = out[0]
        return self._names[service]

    def state(self, service: str) -> tuple[str, str]:
        out = self.podman(
            "inspect", "--format", "{{.State.Status}} {{.State.StartedAt}}", self.name(service)
        ).stdout.strip()
        status, _, started = out.partition(" ")
        return status, started

    def logs(self, service: str) -> str:
        proc = self.podman("logs", self.name(service), check=False)
        return proc.stdout + proc.stderr

    def all_logs(self, tail: int = 60) -> str:
        parts = []
        for s in SERVICES:
            try:
                lines = self.logs(s).splitlines()[-tail:]
                status = " ".join(self.state(s))
            except AssertionError as exc:
                lines, status = [str(exc)], "?"
            parts.append(f"--- {s} ({status}), last {tail} lines\n" + "\n".join(lines))
        return "\n".join(parts)

    def healthcheck(self, service: str) -> bool:
        """Run the container's healthcheck now (podman without systemd runs no timer)."""
        return self.podman("healthcheck", "run", self.name(service), check=False).returncode == 0

    def health_status(self, service: str) -> str:
        out = self.podman("inspect", "--format", "json", self.name(service)).stdout
        state = json.loads(out)[0]["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        return str(health.get("Status", ""))

    def wait_healthy(self, services: tuple[str, ...] = SERVICES, timeout: float = 120.0) -> None:
        for s in services:
            wait_until(lambda s=s: self.healthcheck(s), timeout, f"{s} to report healthy")

    # -- gateways over their published metrics ports -------------------------------------

    def http(self, site: str, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.ports[f'metrics_{site}']}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def ready(self, site: str) -> bool:
        return self.http(site, "/readyz")[0] == 200

    def wait_ready(self, timeout: float = 180.0) -> None:
        for site in ("a", "b"):
            wait_until(lambda site=site: self.ready(site), timeout, f"gateway-{site} /readyz 200")

    def metric(self, site: str, sample: str, **labels: str) -> float:
        from tests.support.sites import metric_value, parse_metrics

        status, text = self.http(site, "/metrics")
        if status != 200:
            return float("nan")
        return metric_value(parse_metrics(text), sample, **labels)


def project_name() -> str:
    return f"qgwct{os.getpid()}x{int(time.time()) % 100000}"
