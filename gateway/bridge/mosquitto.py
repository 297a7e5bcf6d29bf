"""Start and stop a real mosquitto broker on loopback (tests, benchmarks, ``qgw demo``).

The broker gets a generated configuration in a work folder: one listener on 127.0.0.1 with
a free port, anonymous access, large queues (the gateway relies on the broker's persistent
session as its store-and-forward queue) and a packet size limit. Persistence is off unless
asked for; with ``persistence=True`` the database lives in the work folder so that
:meth:`Mosquitto.restart` keeps retained messages and sessions.

Plain use::

    with Mosquitto() as broker:
        print(broker.url)          # mqtt://127.0.0.1:PORT

Nothing here downloads anything; if mosquitto is missing, :class:`MosquittoMissing` says how
to install it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from gateway.errors import GatewayError

DEFAULT_BINARY = "/usr/sbin/mosquitto"
AUTOSAVE_SECONDS = 2
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0


class MosquittoMissing(GatewayError):
    """The mosquitto broker binary is not installed."""


class MosquittoFailed(GatewayError):
    """mosquitto did not start (or did not accept connections in time)."""


def find_mosquitto(binary: str | None = None) -> str:
    """Path of the mosquitto binary, or raise :class:`MosquittoMissing` with install advice."""
    candidates = [binary] if binary else [DEFAULT_BINARY, shutil.which("mosquitto")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise MosquittoMissing(
        "mosquitto is not installed; install it with `apt-get install mosquitto` "
        "(Debian/Ubuntu) or your system's package manager"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS chose it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Mosquitto:
    """One mosquitto process with a generated configuration."""

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        port: int | None = None,
        binary: str | None = None,
        persistence: bool = False,
        max_queued_messages: int = 1_000_000,
        max_packet_size: int = 16 << 20,
        max_inflight_messages: int = 0,
        sys_interval: int | None = None,
        extra_config: str = "",
    ) -> None:
        self.binary = find_mosquitto(binary)
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="qgw-mosquitto-")
            workdir = self._own_dir.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or 0
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.max_packet_size = max_packet_size
        self.max_inflight_messages = max_inflight_messages
        self.sys_interval = sys_interval  # $SYS every N s (None: mosquitto's 10; 0: off)
        self.extra_config = extra_config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _config(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "user root" if os.geteuid() == 0 else "",
            f"max_queued_messages {self.max_queued_messages}",
            "max_queued_bytes 0",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_packet_size {self.max_packet_size}",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "persistent_client_expiration 1d",
            "" if self.sys_interval is None else f"sys_interval {self.sys_interval}",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                # Save the database every AUTOSAVE_SECONDS, not only at shutdown: after a
                # crash the broker comes back with the gateway's session and subscriptions
                # (issue 18; docs/bridge.md "Broker crashes").
                f"autosave_interval {AUTOSAVE_SECONDS}",
            ]
        else:
            lines.append("persistence false")
        return "\n".join(x for x in lines if x) + "\n" + self.extra_config + "\n"

    def write_config(self) -> Path:
        """Write the generated mosquitto.conf (``start`` does; ``check-config`` can read it)."""
        self.config_path.write_text(self._config())
        return self.config_path

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> Mosquitto:
        """Start the broker and return once it accepts TCP connections."""
        if self.running:
            return self
        fixed_port = self.port != 0
        attempts = 1 if fixed_port else 5
        last = ""
        for _ in range(attempts):
            if not fixed_port:
                self.port = free_port()
            self.write_config()
            self._proc = subprocess.Popen(  # noqa: S603 -- our binary, our generated config
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if _accepts(self.port):
                    return self
                time.sleep(0.02)
            last = self._collect_failure()
            if not fixed_port:
                self.port = 0
        raise MosquittoFailed(f"mosquitto did not start: {last}")

    def _collect_failure(self) -> str:
        proc = self._proc
        self._proc = None
        if proc is None:
            return "not started"
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=STOP_TIMEOUT_SECONDS)
        text = err.decode("utf-8", "replace").strip()
        with contextlib.suppress(OSError):
            text += " " + self.log_path.read_text(errors="replace")[-2000:]
        return text or f"exit code {proc.returncode}"

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop with SIGTERM (mosquitto saves its database if persistence is on); kill if stuck."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused broker must be able to act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stderr is not None:
            proc.stderr.close()

    def pause(self) -> None:
        """SIGSTOP: the broker stops reading and answering, its sockets stay open (a hung
        broker, for tests); :meth:`resume` continues it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Stop with SIGKILL (no database save)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(STOP_TIMEOUT_SECONDS)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self, timeout: float = START_TIMEOUT_SECONDS) -> Mosquitto:
        """Stop and start again on the same port (state kept only with persistence)."""
        self.stop()
        # The port is ours now; keep it so clients reconnect to the same URL.
        deadline = time.monotonic() + timeout
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.start(timeout)

    def close(self) -> None:
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Mosquitto {self.url} {state}>"
