"""bench/loadgen.c counts what the benchmark's figures rest on: received, lost, duplicate and
foreign messages, through a real mosquitto. No timing is asserted (rates and latencies are the
benchmark's business, not a test's)."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.bridge.mosquitto import Mosquitto

SOURCE = Path(__file__).resolve().parent.parent / "bench" / "loadgen.c"
TIMEOUT = 60


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/mosquitto.h").exists():
        pytest.skip("needs gcc and libmosquitto-dev (scripts/setup.sh installs them)")
    out = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(
        [gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE), "-lmosquitto"],
        check=True,
        timeout=TIMEOUT,
    )
    return out


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto") as b:
        yield b


def _json(text: str) -> dict[str, Any]:
    line = [x for x in text.splitlines() if x.startswith("{")][-1]
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def _sub(loadgen: Path, port: int, n: int, run: int, size: int = 100) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [
            str(loadgen),
            "sub",
            "-p",
            str(port),
            "-t",
            "t/lg",
            "-n",
            str(n),
            "-r",
            str(run),
            "-s",
            str(size),
            "-T",
            "30",
            "-I",
            "3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], TIMEOUT)
    assert ready, "loadgen sub did not subscribe"
    assert p.stdout.readline().strip() == "ready"
    return p


def _pub(loadgen: Path, port: int, n: int, run: int, *extra: str) -> dict[str, Any]:
    r = subprocess.run(
        [str(loadgen), "pub", "-p", str(port), "-t", "t/lg", "-n", str(n), "-r", str(run), *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    return _json(r.stdout)


def _finish(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = p.communicate(timeout=TIMEOUT)
    return _json(out)


def test_counts_every_message(loadgen: Path, broker: Mosquitto) -> None:
    sub = _sub(loadgen, broker.port, 500, 1, size=1024)
    pub = _pub(loadgen, broker.port, 500, 1, "-s", "1024", "-w", "50")
    s = _finish(sub)
    assert (pub["sent"], pub["acked"]) == (500, 500)
    assert (s["received"], s["lost"], s["duplicates"], s["foreign"]) == (500, 0, 0, 0)
    assert s["stopped_by"] == "count"
    assert 0 <= s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]


def test_paced_publisher_sends_everything(loadgen: Path, broker: Mosquitto) -> None:
    sub = _sub(loadgen, broker.port, 100, 2)
    pub = _pub(loadgen, broker.port, 100, 2, "-R", "500")
    assert (pub["sent"], pub["acked"]) == (100, 100)
    assert _finish(sub)["received"] == 100


def test_lost_duplicate_and_foreign(loadgen: Path, broker: Mosquitto) -> None:
    sub = _sub(loadgen, broker.port, 10, 3)
    _pub(loadgen, broker.port, 4, 3)  # sequence numbers 0..3
    _pub(loadgen, broker.port, 4, 3)  # the same four again: duplicates
    _pub(loadgen, broker.port, 5, 99)  # another run: foreign
    _pub(loadgen, broker.port, 3, 3, "-s", "200")  # right run, wrong size: foreign
    s = _finish(sub)
    assert (s["received"], s["lost"], s["duplicates"], s["foreign"]) == (4, 6, 4, 8)
    assert s["stopped_by"] == "idle"
