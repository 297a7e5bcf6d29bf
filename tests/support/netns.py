"""Two test "hosts" as Linux network namespaces joined by a veth pair (a private WAN link).

::

    netns qgwt-<pid>-<n>-a                      netns qgwt-<pid>-<n>-b
      lo 127.0.0.1 (up)                           lo 127.0.0.1 (up)
      wan0 198.18.0.1/24  <------ veth ------>    wan0 198.18.0.2/24

198.18.0.0/15 is the RFC 2544 benchmarking range; here it exists only inside the two
namespaces (the veth pair is created directly inside them, so nothing appears on the host).
Each namespace has its own loopback, so every site's mosquitto, KME and gateway can bind
127.0.0.1 ports without clashing with the other site or the host.

Usage::

    with NetnsPair() as net:                       # or the `netns_pair` pytest fixture
        srv = net.run_in(net.b, ["mosquitto", "-c", conf])
        ...
        net.cut()       # both veth ends administratively down: connects fail, traffic stops
        net.restore()   # both up again

Cleanup is guaranteed by the context manager / fixture (and an atexit hook for the rest):
processes started with :meth:`NetnsPair.run_in` are terminated (then killed), any process left
in the namespaces is killed by pid, and the namespaces are deleted (which deletes the veth
pair). Namespaces left by a crashed earlier run (their pid no longer alive) are removed by
:func:`cleanup_stale`, which :class:`NetnsPair` calls before creating new ones.

Needs root and iproute2. Tests that need it are marked ``integration`` and use the fixture,
which FAILS (never skips silently) when namespaces are unavailable, unless the environment says
``QGW_ALLOW_NO_NETNS=1``; then it skips with the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = [
    "ALLOW_ENV",
    "PREFIX",
    "Host",
    "NetnsError",
    "NetnsPair",
    "cleanup_stale",
    "list_namespaces",
    "netns_available",
    "netns_pair",
    "require_netns",
]

PREFIX = "qgwt"  # every namespace this helper makes is named qgwt-<pid>-<n>-<a|b>
ALLOW_ENV = "QGW_ALLOW_NO_NETNS"
IFNAME = "wan0"
SUBNET_PREFIX_LEN = 24
ADDR_A = "198.18.0.1"  # RFC 2544 benchmarking range; lives only inside the namespaces
ADDR_B = "198.18.0.2"
IP_TIMEOUT_SECONDS = 10.0  # one `ip` command
STOP_GRACE_SECONDS = 3.0  # SIGTERM -> SIGKILL

_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-[ab]$")
_counter = itertools.count()
_open_pairs: weakref.WeakSet[NetnsPair] = weakref.WeakSet()


class NetnsError(RuntimeError):
    """An `ip` command failed while setting up or tearing down namespaces."""


@dataclass(frozen=True, slots=True)
class Host:
    """One side of the pair."""

    ns: str  # namespace name
    addr: str  # IPv4 address of its end of the link
    ifname: str = IFNAME

    def __str__(self) -> str:
        return self.ns


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            ["ip", *args],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from exc
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    proc = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete_namespace(ns: str) -> None:
    _kill_pids(_ns_pids(ns))  # processes left in our own namespace (e.g. forked daemons)
    _ip("netns", "delete", ns, check=False)


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete this helper's namespaces whose creating process is gone; return their names."""
    removed: list[str] = []
    for ns in list_namespaces():
        m = _NAME_RE.match(ns)
        if m is None or not ns.startswith(prefix + "-"):
            continue
        if _pid_alive(int(m.group(1))):
            continue
        _delete_namespace(ns)
        removed.append(ns)
    return removed


@functools.cache
def netns_available() -> tuple[bool, str]:
    """Whether this process can make namespaces and veth pairs: ``(ok, reason if not)``."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "network namespaces need root (run the integration tests as root)"
    if shutil.which("ip") is None:
        return False, "iproute2 `ip` not found (apt-get install iproute2)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
    except NetnsError as exc:
        return False, f"cannot create a veth pair: {exc}"
    finally:
        _ip("netns", "delete", probe, check=False)
    return True, ""


def require_netns() -> None:
    """Fail the calling test if namespaces are unavailable; skip instead if QGW_ALLOW_NO_NETNS=1."""
    ok, reason = netns_available()
    if ok:
        return
    if os.environ.get(ALLOW_ENV) == "1":
        pytest.skip(f"network namespaces unavailable ({ALLOW_ENV}=1): {reason}")
    pytest.fail(
        f"network namespaces unavailable: {reason}. The integration tests need them; "
        f"set {ALLOW_ENV}=1 to skip these tests explicitly instead.",
        pytrace=False,
    )


class NetnsPair:
    """Two namespaces ``a`` and ``b`` joined by a veth link; see the module docstring."""

    def __init__(self) -> None:
        n = next(_counter)
        base = f"{PREFIX}-{os.getpid()}-{n}"
        self.a = Host(f"{base}-a", ADDR_A)
        self.b = Host(f"{base}-b", ADDR_B)
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False
        self.link_up = False

    # -- lifecycle -----------------------------------------------------------------------

    def create(self) -> NetnsPair:
        """Make both namespaces, the veth pair inside them, addresses, and bring all up."""
        cleanup_stale()
        _open_pairs.add(self)
        try:
            for h in (self.a, self.b):
                _ip("netns", "add", h.ns)
                self._created.append(h.ns)
                _ip("-n", h.ns, "link", "set", "lo", "up")
            # Created directly inside the namespaces: no name on the host can clash.
            _ip(
                *("-n", self.a.ns, "link", "add", "name", IFNAME),
                *("type", "veth", "peer", "name", IFNAME, "netns", self.b.ns),
            )
            for h in (self.a, self.b):
                _ip("-n", h.ns, "addr", "add", f"{h.addr}/{SUBNET_PREFIX_LEN}", "dev", h.ifname)
            self.restore()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process started here, then delete both namespaces (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for p in self._procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=STOP_GRACE_SECONDS)
        for ns in self._created:
            _delete_namespace(ns)
        self._created.clear()
        _open_pairs.discard(self)

    def __enter__(self) -> NetnsPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- use -----------------------------------------------------------------------------

    def _host(self, ns: Host | str) -> Host:
        if isinstance(ns, Host):
            return ns
        for h in (self.a, self.b):
            if ns in (h.ns, h.ns[-1]):
                return h
        raise ValueError(f"unknown namespace {ns!r} (use pair.a, pair.b, 'a' or 'b')")

    def run_in(
        self, ns: Host | str, argv: Sequence[str], **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``ns`` (``ip netns exec``); stopped by :meth:`close`.

        ``ip netns exec`` execs the program, so the returned ``Popen.pid`` is the program itself:
        ``proc.send_signal(signal.SIGKILL)`` kills it, not a wrapper.
        """
        if self._closed:
            raise NetnsError("this NetnsPair is closed")
        host = self._host(ns)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *argv], **popen_kwargs
        )
        self._procs.append(proc)
        return proc

    def run(
        self, ns: Host | str, argv: Sequence[str], timeout: float = 10.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``ns`` to completion (text output captured, no check)."""
        host = self._host(ns)
        return subprocess.run(
            ["ip", "netns", "exec", host.ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cut(self) -> None:
        """Take the link down on both ends, like a WAN outage.

        New connects fail at once (no route); established TCP connections are not reset: data
        sent meanwhile is retransmitted and arrives after :meth:`restore` (checked by hand: a
        write during a 2 s cut arrived about 1 s after restore). Dead-peer detection is the
        gateway's own job (keepalive / timeouts).
        """
        for h in (self.a, self.b):
            _ip("-n", h.ns, "link", "set", h.ifname, "down")
        self.link_up = False

    def restore(self) -> None:
        """Bring the link up on both ends again."""
        for h in (self.a, self.b):
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
        self.link_up = True

    def __repr__(self) -> str:
        return f"NetnsPair(a={self.a.ns}@{self.a.addr}, b={self.b.ns}@{self.b.addr})"


@atexit.register
def _close_leftovers() -> None:
    for pair in list(_open_pairs):
        with contextlib.suppress(Exception):
            pair.close()


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """A fresh :class:`NetnsPair`, cleaned up after the test. Fails if namespaces are unavailable."""
    require_netns()
    with NetnsPair() as pair:
        yield pair
