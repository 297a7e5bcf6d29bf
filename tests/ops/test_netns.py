"""The namespace helper itself: reachability only across the veth, cut/restore, cleanup."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

import pytest

from tests.support import netns
from tests.support.netns import NetnsPair, list_namespaces

pytestmark = pytest.mark.integration

# Listens on ADDR:0 and prints the port; answers b"pong" to every connection.
SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"pong")
    c.close()
"""

# Connects to ADDR:PORT, exit 0 if it read b"pong", 1 otherwise (one try, short timeout).
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
        c.settimeout(2)
        sys.exit(0 if c.recv(4) == b"pong" else 1)
except OSError as exc:
    print(type(exc).__name__, exc, file=sys.stderr)
    sys.exit(1)
"""


def read_line(proc: subprocess.Popen[str], timeout: float = 5.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output within {timeout} s")
    return proc.stdout.readline().strip()


def connect(pair: NetnsPair, ns: str, addr: str, port: int) -> bool:
    return pair.run(ns, [sys.executable, "-c", CLIENT, addr, str(port)], timeout=10).returncode == 0


def start_server(pair: NetnsPair) -> tuple[subprocess.Popen[str], int]:
    srv = pair.run_in(
        pair.b, [sys.executable, "-c", SERVER, pair.b.addr], stdout=subprocess.PIPE, text=True
    )
    return srv, int(read_line(srv))


def test_reachable_across_the_link_then_cut_and_restore(netns_pair: NetnsPair) -> None:
    pair = netns_pair
    srv, port = start_server(pair)
    assert connect(pair, "a", pair.b.addr, port)

    pair.cut()
    assert not pair.link_up
    assert not connect(pair, "a", pair.b.addr, port)

    pair.restore()
    assert connect(pair, "a", pair.b.addr, port)
    assert srv.poll() is None


def test_addresses_exist_only_inside_the_namespaces(netns_pair: NetnsPair) -> None:
    pair = netns_pair
    _, port = start_server(pair)
    # From the host (the test process itself) the link address is not reachable.
    try:
        with socket.create_connection((pair.b.addr, port), timeout=1):
            reached = True
    except OSError:
        reached = False
    assert not reached
    # Each namespace has its own loopback, up.
    out = pair.run("a", ["ip", "-br", "addr", "show", "lo"]).stdout
    assert "127.0.0.1" in out
    assert "UNKNOWN" in out or "UP" in out


def test_cleanup_leaves_nothing_behind() -> None:
    netns.require_netns()
    with NetnsPair() as pair:
        names = {pair.a.ns, pair.b.ns}
        assert names <= set(list_namespaces())
        srv, _ = start_server(pair)
        sleeper = pair.run_in("b", ["sleep", "60"])
        # `ip netns exec` execs the program: the Popen pid is the process in the namespace,
        # so a test's SIGKILL hits the program itself.
        deadline = time.monotonic() + 5  # until `ip` has entered the namespace
        while sleeper.pid not in netns._ns_pids(pair.b.ns):
            assert time.monotonic() < deadline, "sleeper never appeared in namespace b"
            time.sleep(0.02)
    assert not names & set(list_namespaces())
    assert srv.poll() is not None
    assert sleeper.poll() is not None
    with pytest.raises(netns.NetnsError):
        pair.run_in("a", ["true"])


def test_failed_create_cleans_up() -> None:
    netns.require_netns()
    pair = NetnsPair()
    pair.a = netns.Host(pair.a.ns, "not-an-address")
    with pytest.raises(netns.NetnsError):
        pair.create()
    assert pair.a.ns not in list_namespaces()
    assert pair.b.ns not in list_namespaces()


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    netns.require_netns()
    dead = 4_194_303  # above any pid this test's own run can have; checked below
    while netns._pid_alive(dead):
        dead -= 1
    stale = f"{netns.PREFIX}-{dead}-0-a"
    alive = f"{netns.PREFIX}-{os.getpid()}-999-a"
    foreign = "qgwt-not-ours"
    for ns in (stale, alive, foreign):
        subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        removed = netns.cleanup_stale()
        current = set(list_namespaces())
        assert stale in removed
        assert stale not in current
        assert alive in current  # our own pid is alive: not stale
        assert foreign in current  # not this helper's name pattern
    finally:
        for ns in (stale, alive, foreign):
            subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=10)


def test_unavailable_fails_unless_explicitly_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "netns_available", lambda: (False, "no root"))
    monkeypatch.delenv(netns.ALLOW_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="no root"):
        netns.require_netns()
    monkeypatch.setenv(netns.ALLOW_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match="no root"):
        netns.require_netns()


def test_available_here() -> None:
    # This machine runs the suite as root with iproute2; if that changes, say so loudly.
    ok, reason = netns.netns_available()
    if not ok and os.environ.get(netns.ALLOW_ENV) == "1":
        pytest.skip(reason)
    assert ok, reason
