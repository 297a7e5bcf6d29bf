"""Pre-handshake admission: CHALLENGE / HELLO / ADMIT (docs/protocol.md §3.5, steps AD1…AD5).

Sans-I/O like the rest of the core: frames in, frames and one :class:`Admitted` event out; the
cookie comes from the injected RNG. :class:`gateway.core.connection.Connection` holds one
:class:`Admission` per connection and hands over to INIT (bootstrap) or REKEY_INIT (resumption)
only once it is done::

    R -> I  CHALLENGE  version, cookie                                      AD1
    I -> R  HELLO      version, suite, auth, policy, kind, epoch, id_i, id_r, n_hello,
                       proof = HMAC(K_hello, HELLO_core || cookie)[0:32]     AD2
                                                              AD3  checks, proof (cheap)
    R -> I  ADMIT      kind, epoch, proof = HMAC(K_admit, H(CHALLENGE || HELLO) || ADMIT_core)[0:32]
                                                                             AD4
    I       verify ADMIT; only now fetch QKD keys (enc_keys) and send INIT / REKEY_INIT   AD5

State table (named after what is expected next)::

    initiator  I_EXPECT_CHALLENGE --CHALLENGE--> I_EXPECT_ADMIT --ADMIT ok--> DONE
    responder  R_EXPECT_HELLO --HELLO ok--> DONE (ADMIT sent)
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from gateway.core import labels as L
from gateway.core import schedule
from gateway.core.wire import Admit, Challenge, Hello
from gateway.crypto import constant_time_equal, hmac_sha384, sha384


class _AssociationView(Protocol):
    chain: bytes | None
    epoch: int
    next: tuple[int, bytes] | None


class AdmState(Enum):
    I_EXPECT_CHALLENGE = auto()
    I_EXPECT_ADMIT = auto()
    R_EXPECT_HELLO = auto()
    DONE = auto()


@dataclass(frozen=True, slots=True)
class Admitted:
    """Responder: the connection passed admission (AD4).

    ``authenticated`` is True when the HELLO proof verified under a secret (the chain key for a
    resumption, the PSK for a psk bootstrap); the shell then never counts or evicts the
    connection as unauthenticated. A pki bootstrap HELLO only proves knowledge of public values.
    """

    kind: L.HelloKind
    epoch: int
    authenticated: bool


class Refused(Exception):
    """Admission refused with this alert (the connection answers it and closes)."""

    def __init__(self, alert: L.Alert, reason: str) -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason


def resume_keys(chain: bytes, epoch: int) -> tuple[bytes, bytes]:
    """(K_hello, K_admit) of a resumption from ``chain`` = chain_e (labels "resume hello/admit")."""
    ctx = struct.pack(">I", epoch)
    return (
        schedule.expand_label(chain, L.L_HELLO_RESUME, ctx),
        schedule.expand_label(chain, L.L_ADMIT_RESUME, ctx),
    )


def bootstrap_keys(
    mode: L.AuthModeId, s0: bytes, suite: int, id_i: str, id_r: str
) -> tuple[bytes, bytes]:
    """(K_hello, K_admit) of a bootstrap: from S0 in psk mode, public mac1-style keys in pki
    and wot (both are signature modes without a shared secret before the handshake)."""
    if mode is L.AuthModeId.PSK:
        return (
            schedule.expand_label(s0, L.L_HELLO_PSK, b""),
            schedule.expand_label(s0, L.L_ADMIT_PSK, b""),
        )
    # pki: K_hello = the INIT admission key (addressed to id_r), K_admit the same shape for id_i
    return schedule.admission_key_pki(suite, id_r), schedule.admission_key_pki(suite, id_i)


def _proof(key: bytes, data: bytes) -> bytes:
    return hmac_sha384(key, data)[: L.ADMISSION_PROOF_LEN]


class Admission:
    """One connection's admission exchange (initiator or responder side)."""

    def __init__(
        self,
        *,
        initiator: bool,
        suite: int,
        auth_mode: L.AuthModeId,
        qkd_policy: int,
        identity: str,
        peer_name: str,
        s0: bytes,
    ) -> None:
        self.state = AdmState.I_EXPECT_CHALLENGE if initiator else AdmState.R_EXPECT_HELLO
        self.kind: L.HelloKind | None = None
        self.epoch = 0
        self._suite, self._mode, self._policy = suite, auth_mode, qkd_policy
        self._identity, self._peer = identity, peer_name
        self._s0 = s0
        self._challenge_frame = b""
        self._hello_frame = b""
        self._k_admit = b""

    def __repr__(self) -> str:
        return f"Admission({self.state.name}, kind={self.kind!r})"

    def wipe(self) -> None:
        self._s0 = self._k_admit = b""

    # --- responder ---------------------------------------------------------------------

    def create_challenge(self, rng: Callable[[int], bytes]) -> bytes:
        """AD1: the responder speaks first with a fresh cookie."""
        self._challenge_frame = Challenge(rng(L.COOKIE_LEN)).encode()
        return self._challenge_frame

    def consume_hello(
        self, m: Hello, raw: bytes, assoc: _AssociationView
    ) -> tuple[bytes, Admitted]:
        """AD3 (all before any KME call or signature), then AD4: returns the ADMIT frame."""
        if m.suite != self._suite:
            raise Refused(L.Alert.SUITE_MISMATCH, "HELLO suite differs from ours")
        if m.auth_mode != self._mode:
            raise Refused(L.Alert.AUTH_MODE_MISMATCH, "HELLO auth mode differs from ours")
        if m.qkd_policy != self._policy:
            raise Refused(L.Alert.QKD_POLICY_MISMATCH, "HELLO QKD policy differs from ours")
        if m.responder != self._identity:
            raise Refused(L.Alert.WRONG_IDENTITY, "HELLO is addressed to another gateway")
        if m.initiator == self._identity:
            raise Refused(L.Alert.WRONG_IDENTITY, "HELLO claims our own identity (reflection)")
        if m.initiator != self._peer:
            raise Refused(L.Alert.WRONG_IDENTITY, "HELLO is from an unexpected peer")
        if m.kind is L.HelloKind.RESUME:
            chain = None
            if assoc.chain is not None and m.epoch == assoc.epoch:
                chain = assoc.chain
            elif assoc.next is not None and m.epoch == assoc.next[0]:
                chain = assoc.next[1]  # a rekey was in flight when the connection broke
            # No chain for that epoch, or a proof that does not verify under it: both answer
            # alert 16 after the same work (one HMAC), so R's epoch is no oracle, and an
            # initiator holding another chain under the same epoch bootstraps again instead of
            # retrying for ever (§3.5 AD3).
            k_hello, k_admit = resume_keys(chain or bytes(L.CHAIN_LEN), m.epoch)
            authenticated = chain is not None
            failure = Refused(L.Alert.NO_SESSION, "no chain verifies this resume HELLO")
        else:
            k_hello, k_admit = bootstrap_keys(
                self._mode, self._s0, m.suite, m.initiator, m.responder
            )
            authenticated = self._mode is L.AuthModeId.PSK
            failure = Refused(L.Alert.ADMISSION_FAILED, "HELLO proof does not verify")
        cookie = self._challenge_frame[6:]
        ok = constant_time_equal(_proof(k_hello, m.core() + cookie), m.proof)
        if not ok or (m.kind is L.HelloKind.RESUME and not authenticated):
            raise failure
        self.kind, self.epoch = m.kind, m.epoch
        core = Admit(m.kind, m.epoch, b"").core()
        proof = _proof(k_admit, sha384(self._challenge_frame + raw) + core)
        self.state = AdmState.DONE
        self.wipe()
        return Admit(m.kind, m.epoch, proof).encode(), Admitted(m.kind, m.epoch, authenticated)

    # --- initiator ---------------------------------------------------------------------

    def consume_challenge(
        self, m: Challenge, raw: bytes, assoc: _AssociationView, rng: Callable[[int], bytes]
    ) -> bytes:
        """AD2: resume when the association holds a chain, else bootstrap; returns HELLO.

        ``rng`` draws n_hello: the ADMIT proof covers the whole HELLO frame, so a recorded
        (CHALLENGE, ADMIT) pair cannot be replayed to this initiator on a new connection.
        """
        if assoc.chain is not None:
            kind, epoch = L.HelloKind.RESUME, assoc.epoch
            k_hello, self._k_admit = resume_keys(assoc.chain, epoch)
        else:
            kind, epoch = L.HelloKind.BOOTSTRAP, 0
            k_hello, self._k_admit = bootstrap_keys(
                self._mode, self._s0, self._suite, self._identity, self._peer
            )
        unsigned = Hello(
            suite=self._suite,
            auth_mode=self._mode,
            qkd_policy=self._policy,
            kind=kind,
            epoch=epoch,
            initiator=self._identity,
            responder=self._peer,
            nonce=rng(L.HELLO_NONCE_LEN),
            proof=b"",
        )
        hello = dataclasses.replace(unsigned, proof=_proof(k_hello, unsigned.core() + m.cookie))
        self._challenge_frame, self._hello_frame = raw, hello.encode()
        self.kind, self.epoch = kind, epoch
        self.state = AdmState.I_EXPECT_ADMIT
        return self._hello_frame

    def consume_admit(self, m: Admit) -> None:
        """AD5: the responder's proof (for a resumption: it holds our chain) before any QKD key."""
        if m.kind is not self.kind or m.epoch != self.epoch:
            raise Refused(L.Alert.ADMISSION_FAILED, "ADMIT for another kind or epoch")
        expect = _proof(self._k_admit, sha384(self._challenge_frame + self._hello_frame) + m.core())
        if not constant_time_equal(expect, m.proof):
            raise Refused(L.Alert.ADMISSION_FAILED, "ADMIT proof does not verify")
        self.state = AdmState.DONE
        self.wipe()
