"""One harness per KeySource implementation, for the conformance suite.

Each harness offers a master (sae-a), a slave (sae-b) and an intruder (sae-c, attached to the
slave's KME), plus a fake clock and link switches where the implementation has a link.
"""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import KeyNotFound, KmeUnauthorized
from keysource.base import KeySource
from keysource.etsi014 import Etsi014Client, RetryPolicy
from keysource.simulator import NodeKeySource, SimulatorRunner
from keysource.skip import SkipClient
from keysource.static import StaticKeySource
from keysource.tls import client_context
from tests.support.kme import KmeSetup, write_kme_setup

# 10 keys of 256 bits per second; a pool of 40 keys, full at start.
LINK = {
    "rate_bps": 2560.0,
    "key_size": 256,
    "max_key_count": 40,
    "max_key_per_request": 16,
    "initial_keys": 40,
    "qber": 0.02,
}
KEYS_PER_SECOND = 10
# Fast back-off, few attempts (exhaustion fails within 4 quick tries); a generous deadline so a
# loaded machine (slow TLS handshakes under 16 concurrent calls) does not fail the suite.
FAST_RETRY = RetryPolicy(
    base_seconds=0.005, cap_seconds=0.02, deadline_seconds=10.0, max_attempts=4
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Harness:
    name: str
    master: KeySource
    slave: KeySource
    intruder: KeySource
    has_link: bool
    wrong_sae_error: type[Exception]
    clock: FakeClock = field(default_factory=FakeClock)
    runner: SimulatorRunner | None = None
    setup: KmeSetup | None = None
    extra: list[KeySource] = field(default_factory=list)
    # ETSI 014 dec_keys is all-or-nothing; SKIP fetches one ID per request (docs/keysource.md).
    atomic_dec_keys: bool = True
    client_cls: type[Etsi014Client] = Etsi014Client  # what h.client() builds, on which port

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds

    async def set_link(self, **changes: Any) -> None:
        assert self.runner is not None
        assert self.runner.link is not None
        self.runner.link.set(self.clock(), **changes)

    def client(self, ctx: ssl.SSLContext, kme: str = "A", sae: str = "sae-a") -> Etsi014Client:
        assert self.runner is not None
        ep = self.runner.endpoints[kme]
        port = ep.api[1] if self.client_cls is Etsi014Client else _skip_port(ep.skip)
        c = self.client_cls(f"https://127.0.0.1:{port}", sae, ctx, retry=FAST_RETRY)
        self.extra.append(c)
        return c

    async def aclose(self) -> None:
        for s in (self.master, self.slave, self.intruder, *self.extra):
            await s.aclose()
        if self.runner is not None:
            await self.runner.stop()


def static_harness() -> Harness:
    seed = secrets.token_bytes(32)
    return Harness(
        "static",
        StaticKeySource(seed, "sae-a"),
        StaticKeySource(seed, "sae-b"),
        StaticKeySource(seed, "sae-c"),
        has_link=False,
        wrong_sae_error=KeyNotFound,
    )


def simulator_harness(tmp: Path) -> Harness:
    setup = write_kme_setup(tmp, LINK, zero_ports=True)
    clock = FakeClock()
    runner = SimulatorRunner(setup.config, "both", clock)
    nodes = runner.build_nodes()
    return Harness(
        "simulator",
        NodeKeySource(nodes["A"], "sae-a"),
        NodeKeySource(nodes["B"], "sae-b"),
        NodeKeySource(nodes["B"], "sae-c"),
        has_link=True,
        wrong_sae_error=KmeUnauthorized,
        clock=clock,
        runner=runner,
        setup=setup,
    )


async def etsi014_harness(tmp: Path) -> Harness:
    setup = write_kme_setup(tmp, LINK, zero_ports=True)
    clock = FakeClock()
    runner = SimulatorRunner(setup.config, "both", clock)
    await runner.start()

    def client(kme: str, sae: str) -> Etsi014Client:
        cert, key = setup.sae(sae)
        _, port = runner.endpoints[kme].api
        ctx = client_context(cert, key, setup.ca)
        return Etsi014Client(f"https://127.0.0.1:{port}", sae, ctx, retry=FAST_RETRY)

    return Harness(
        "etsi014",
        client("A", "sae-a"),
        client("B", "sae-b"),
        client("B", "sae-c"),
        has_link=True,
        wrong_sae_error=KmeUnauthorized,
        clock=clock,
        runner=runner,
        setup=setup,
    )


def _skip_port(ep: tuple[str, int] | None) -> int:
    assert ep is not None, "the simulator does not serve SKIP (skip_listen unset)"
    return ep[1]


async def skip_harness(tmp: Path) -> Harness:
    """The SKIP client talking to the simulator's SKIP API over real mutual TLS."""
    setup = write_kme_setup(tmp, LINK, zero_ports=True)
    clock = FakeClock()
    runner = SimulatorRunner(setup.config, "both", clock)
    await runner.start()

    def client(kme: str, sae: str) -> SkipClient:
        cert, key = setup.sae(sae)
        port = _skip_port(runner.endpoints[kme].skip)
        ctx = client_context(cert, key, setup.ca)
        return SkipClient(f"https://127.0.0.1:{port}", sae, ctx, retry=FAST_RETRY)

    return Harness(
        "skip",
        client("A", "sae-a"),
        client("B", "sae-b"),
        client("B", "sae-c"),
        has_link=True,
        wrong_sae_error=KmeUnauthorized,
        clock=clock,
        runner=runner,
        setup=setup,
        atomic_dec_keys=False,
        client_cls=SkipClient,
    )


FACTORIES: dict[str, Callable[..., Any]] = {
    "static": static_harness,
    "simulator": simulator_harness,
    "etsi014": etsi014_harness,
    "skip": skip_harness,
}
