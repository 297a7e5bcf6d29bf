"""``qgw demo --mode tunnel``: mosquitto's own bridge through the qgw tunnel, every message counted."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from gateway.demo import bridge_config
from tests.support.mosquitto import require_mosquitto
from tests.support.sites import child_env

pytestmark = pytest.mark.integration


def test_bridge_config_points_at_the_tunnel() -> None:
    text = bridge_config(41234)
    assert "address 127.0.0.1:41234" in text
    assert "topic demo/# out 1" in text
    assert "cleansession false" in text  # the broker queues for the bridge while it is down


def test_demo_tunnel_mode_delivers_every_message(tmp_path: object) -> None:
    require_mosquitto()
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--mode", "tunnel", "--duration", "8"],
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "through tunnel 'mqtt-bridge'" in out
    published = int(re.search(r"messages published\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    delivered = int(re.search(r"messages delivered\s+(\d+)", out).group(1))  # type: ignore[union-attr]
    assert published > 0
    assert delivered == published
    assert re.search(r"messages lost\s+0\b", out)
    assert "| tunnel mqtt-bridge: 1 stream" in out  # the status line shows the tunnel
