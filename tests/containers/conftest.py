"""Fixtures of the container suite: build the images once, bring up deploy/compose.yaml once.

Root is needed (rootful podman). Without root the suite skips with that reason; as root, a host
where the images cannot be built or the containers cannot run FAILS with the reason (setup.sh's
output), so CI cannot pass by not running it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_qgw
from tests.containers.stack import Stack, project_name

SETUP = Path(__file__).with_name("setup.sh")
SETUP_TIMEOUT_SECONDS = 900.0  # apt + mmdebstrap + image builds on a fresh machine (~3-5 min)
CONTAINER_UID = 10001  # the image's user (deploy/Containerfile)

_stacks: list[Stack] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.containers)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.failed and _stacks:
        try:
            report.sections.append(("container logs", _stacks[-1].all_logs()))
        except Exception as exc:
            report.sections.append(("container logs", f"could not collect: {exc!r}"))
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("the container suite needs root (rootful podman; tests/containers/setup.sh)")
    out = tmp_path_factory.mktemp("containers") / "env"
    env = {**os.environ, "QGW_PYTHON": sys.executable}
    try:
        proc = subprocess.run(
            ["bash", str(SETUP), str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=SETUP_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"tests/containers/setup.sh took over {SETUP_TIMEOUT_SECONDS:.0f} s: {exc}")
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        pytest.fail(
            "podman cannot build or run the images on this (root) machine: tests/containers/"
            f"setup.sh exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    result = {}
    for line in out.read_text().splitlines():
        k, _, v = line.partition("=")
        result[k] = v
    return result


@pytest.fixture(scope="module")
def stack(images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert shutil.which("podman"), "setup.sh ran but podman is not on PATH"
    demo = tmp_path_factory.mktemp("demo") / "demo"
    # Exactly the deploy README's command: KME certificates carrying the compose service names.
    proc = run_qgw("init-demo", str(demo), "--kme-host", "kme-a", "--kme-host", "kme-b")
    assert proc.returncode == 0, proc.stderr
    for p in [demo, *demo.rglob("*")]:
        os.chown(p, CONTAINER_UID, CONTAINER_UID)  # README: the containers' uid owns deploy/demo
    ports = {k: free_port() for k in ("mqtt_a", "mqtt_b", "metrics_a", "metrics_b")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("QGW_")}
    env.update(images)
    env.update(
        QGW_DEMO_DIR=str(demo),
        QGW_MQTT_A_PORT=str(ports["mqtt_a"]),
        QGW_MQTT_B_PORT=str(ports["mqtt_b"]),
        QGW_METRICS_A_PORT=str(ports["metrics_a"]),
        QGW_METRICS_B_PORT=str(ports["metrics_b"]),
    )
    s = Stack(project_name(), env, demo, ports)
    _stacks.append(s)
    try:
        try:
            s.up()
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{s.all_logs()}") from exc
        yield s
    finally:
        try:
            s.down()
        finally:
            _stacks.remove(s)
            shutil.rmtree(demo, ignore_errors=True)
