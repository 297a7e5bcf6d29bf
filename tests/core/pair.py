"""Drive two sans-I/O cores against each other in memory (no sockets, no clock, no KME)."""

from __future__ import annotations

import datetime
import os
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.core import labels as L
from gateway.core import schedule
from gateway.core.admission import Admission
from gateway.core.auth import PkiAuthenticator, PskAuthenticator
from gateway.core.connection import (
    Alarm,
    Association,
    Closed,
    Connection,
    Event,
    HandshakeComplete,
    MessageReceived,
    NeedQkdKeys,
    NeedQkdKeysById,
    RekeyComplete,
    Role,
    SessionParams,
)
from gateway.core.wire import Challenge, FrameBuffer
from gateway.crypto import SIG_SEED_LEN, Provider, SigAlg, get_provider
from gateway.errors import AuthenticationError

PROVIDER = get_provider("pyca")


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return lambda n: r.randbytes(n)


def split_frames(chunks: list[bytes]) -> list[bytes]:
    """Every whole frame in these chunks, in order."""
    fb = FrameBuffer()
    out = []
    for c in chunks:
        fb.feed(c)
        while (f := fb.next_frame()) is not None:
            out.append(f[2])
    return out


def first_frame(chunks: list[bytes], ftype: L.FrameType) -> bytes:
    return next(f for f in split_frames(chunks) if f[4] == ftype)


def admit(
    r: Connection, auth_i: object, assoc_i: Association | None = None, now: float = 0.0
) -> list[Event]:
    """Run the admission exchange (AD1..AD4, docs/protocol.md §3.5) against a fresh responder
    as the initiator ``auth_i`` would (bootstrap, or resume when ``assoc_i`` holds a chain), so a
    test can then send it an INIT or REKEY_INIT. Returns the responder's events (Admitted)."""
    adm = Admission(
        initiator=True,
        suite=r.params.suite,
        auth_mode=auth_i.mode,  # type: ignore[attr-defined]
        qkd_policy=r.params.qkd_policy,
        identity=auth_i.identity,  # type: ignore[attr-defined]
        peer_name=r.auth.identity,
        s0=schedule.psk_secret(auth_i.psk()),  # type: ignore[attr-defined]
    )
    challenge = r.data_to_send()
    assert challenge[4] == L.FrameType.CHALLENGE
    hello = adm.consume_challenge(
        Challenge.decode(challenge[5:]), challenge, assoc_i or Association(), seeded_rng(99)
    )
    r.receive_data(hello, now)
    admit_frame = r.data_to_send()
    assert admit_frame[4:5] == bytes([L.FrameType.ADMIT]), r.state
    return list(iter(r.next_event, None))


def drive_admission(i: Connection, r: Connection, now: float = 0.0) -> None:
    """Move CHALLENGE, HELLO and ADMIT between a started initiator and a fresh responder."""
    i.receive_data(r.data_to_send(), now)
    r.receive_data(i.data_to_send(), now)
    i.receive_data(r.data_to_send(), now)


class FakeKme:
    """Both sides of one QKD link: keys fetched by ID once per side (ETSI 014 semantics)."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.pool_b: dict[str, bytes] = {}
        self.available = True
        self.peer_available = True
        self.delivered: list[tuple[str, bytes]] = []

    def enc_keys(self, n: int) -> list[tuple[str, bytes]] | None:
        if not self.available:
            return None
        out = []
        for _ in range(n):
            kid = str(uuid.UUID(bytes=self.rng.randbytes(16), version=4))
            key = self.rng.randbytes(32)
            self.pool_b[kid] = key
            out.append((kid, key))
        self.delivered += out
        return out

    def dec_keys(self, ids: tuple[str, ...]) -> list[tuple[str, bytes]] | None:
        if not self.peer_available or any(i not in self.pool_b for i in ids):
            return None
        return [(i, self.pool_b.pop(i)) for i in ids]


@dataclass
class Side:
    conn: Connection
    events: list[Event] = field(default_factory=list)

    def messages(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, MessageReceived)]

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]


def psk_auths(psk: bytes | None = None) -> tuple[PskAuthenticator, PskAuthenticator]:
    psk = psk or os.urandom(32)
    return PskAuthenticator("site-a", psk), PskAuthenticator("site-b", psk)


def raw_key_verifier(trusted: dict[bytes, str]):  # type: ignore[no-untyped-def]
    """A stand-in CertVerifier for core tests: a 'certificate' is name || 0x00 || raw public key."""

    def verify(
        chain: list[bytes], expected: str, now: datetime.datetime
    ) -> tuple[str, SigAlg, bytes, str]:
        cert = chain[0]
        name, _, pub = cert.partition(b"\x00")
        if pub not in trusted:
            raise AuthenticationError("untrusted certificate")
        return name.decode(), SigAlg.MLDSA65, pub, "fp"

    return verify


def pki_auths(
    names: tuple[str, str] = ("site-a", "site-b"),
) -> tuple[PkiAuthenticator, PkiAuthenticator]:
    keys = [PROVIDER.sig_keygen(SigAlg.MLDSA65, os.urandom(SIG_SEED_LEN)) for _ in names]
    trusted = {k.public_bytes(): n for k, n in zip(keys, names, strict=True)}
    ver = raw_key_verifier(trusted)
    a, b = (
        PkiAuthenticator(
            n,
            certs=(n.encode() + b"\x00" + k.public_bytes(),),
            key=k,
            provider=PROVIDER,
            verifier=ver,
        )
        for n, k in zip(names, keys, strict=True)
    )
    return a, b


class Pair:
    """An initiator and a responder wired together; ``pump`` moves bytes and answers KME events."""

    def __init__(
        self,
        auth: str = "psk",
        suite: L.SuiteId = L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384,
        policy: L.QkdPolicyId = L.QkdPolicyId.REQUIRED,
        seed: int = 1,
        kme: FakeKme | None = None,
        assoc_i: Association | None = None,
        assoc_r: Association | None = None,
        auths: tuple[object, object] | None = None,
        provider: Provider = PROVIDER,
        rngs: tuple[Callable[[int], bytes], Callable[[int], bytes]] | None = None,
        **params: object,
    ) -> None:
        a, b = auths or (psk_auths() if auth == "psk" else pki_auths())
        self.kme = kme or FakeKme(seed)
        self.now = 1000.0
        self.assoc_i = assoc_i or Association()
        self.assoc_r = assoc_r or Association()
        mk = lambda role, peer: SessionParams(
            role=role, suite=suite, qkd_policy=policy, peer_name=peer, **params
        )  # type: ignore[arg-type]
        rng_i, rng_r = rngs or (seeded_rng(seed), seeded_rng(seed + 1000))
        self.i = Side(Connection(mk(Role.INITIATOR, "site-b"), a, provider, rng_i, self.assoc_i))  # type: ignore[arg-type]
        self.r = Side(Connection(mk(Role.RESPONDER, "site-a"), b, provider, rng_r, self.assoc_r))  # type: ignore[arg-type]
        self.wire_i2r: list[bytes] = []  # every chunk sent, for attack tests
        self.wire_r2i: list[bytes] = []
        self.wire: list[tuple[str, bytes]] = []  # every chunk in the order sent ("i2r"/"r2i")
        self.tamper: Callable[[str, bytes], bytes] | None = None

    def _answer(self, side: Side) -> bool:
        progressed = False
        while (ev := side.conn.next_event()) is not None:
            progressed = True
            side.events.append(ev)
            if isinstance(ev, NeedQkdKeys):
                side.conn.provide_qkd_keys(self.kme.enc_keys(ev.count), self.now)
            elif isinstance(ev, NeedQkdKeysById):
                side.conn.provide_qkd_keys(self.kme.dec_keys(ev.key_ids), self.now)
        return progressed

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = self._answer(self.i) | self._answer(self.r)
            out = self.i.conn.data_to_send()
            if out:
                self.wire_i2r.append(out)
                self.wire.append(("i2r", out))
                if self.tamper:
                    out = self.tamper("i2r", out)
                self.r.conn.receive_data(out, self.now)
                moved = True
            out = self.r.conn.data_to_send()
            if out:
                self.wire_r2i.append(out)
                self.wire.append(("r2i", out))
                if self.tamper:
                    out = self.tamper("r2i", out)
                self.i.conn.receive_data(out, self.now)
                moved = True
            if not moved:
                return

    def handshake(self) -> None:
        self.i.conn.start(self.now)
        self.pump()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for side in (self.i, self.r):
            t = side.conn.get_timer()
            if t is not None and t <= self.now:
                side.conn.handle_timer(self.now)
        self.pump()

    def established(self) -> bool:
        return bool(self.i.of(HandshakeComplete)) and bool(self.r.of(HandshakeComplete))

    def closed(self) -> list[Closed]:
        return self.i.of(Closed) + self.r.of(Closed)

    def alarms(self) -> list[Alarm]:
        return self.i.of(Alarm) + self.r.of(Alarm)

    def rekeys(self) -> tuple[list[RekeyComplete], list[RekeyComplete]]:
        return self.i.of(RekeyComplete), self.r.of(RekeyComplete)
