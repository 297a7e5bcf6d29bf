"""The sans-I/O protocol core: one connection between two gateways (docs/protocol.md).

No I/O, no clock, no randomness of its own: bytes go in with :meth:`Connection.receive_data`,
bytes come out of :meth:`Connection.data_to_send`, events come out of
:meth:`Connection.next_event`, time is passed in as ``now`` (monotonic seconds) and
randomness comes from the injected ``rng``. When the core needs a QKD key it emits
:class:`NeedQkdKeys` / :class:`NeedQkdKeysById` and the shell answers with
:meth:`Connection.provide_qkd_keys`.

Message pattern (labels as in docs/protocol.md)::

    admission    R -> I  CHALLENGE  version, cookie                                         AD1
    (every new   I -> R  HELLO      suite, auth, policy, kind, epoch, id_i, id_r, proof     AD2
    connection)  R -> I  ADMIT      kind, epoch, proof        (gateway/core/admission.py)   AD4
    bootstrap    I -> R  INIT     suite, policy, key ID, n_i, id_i, id_r, ek_i, X_i, adm   B2
                 R -> I  RESP     n_r, qkd_used, ct, X_r, cert_r, sig_r/psk_r, fin_r       B5
                 I -> R  CONFIRM  cert_i, sig_i/psk_i, fin_i                               B7
    rekey /      I -> R  REKEY_INIT  epoch+1, n, 3 key IDs, ek, X, WC tag, chain MAC       RK2
    resumption   R -> I  REKEY_RESP  epoch+1, n, qkd_used, ct, X, WC tag, chain MAC       RK4
    records      either  RECORD   epoch, seq, AES-256-GCM(content type || data)            REC1
"""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from gateway.core import labels as L
from gateway.core import schedule
from gateway.core.admission import Admission, Admitted, AdmState, Refused
from gateway.core.auth import Authenticator, InsufficientTrust, PeerIdentity
from gateway.core.records import RecvState, SendState
from gateway.core.wire import (
    Admit,
    AlertMsg,
    Challenge,
    Confirm,
    FrameBuffer,
    Hello,
    Init,
    RekeyInit,
    RekeyResp,
    Resp,
    decode_record_header,
    vec16,
)
from gateway.crypto import (
    KEM_SEED_LEN,
    KemAlg,
    KemPrivateKey,
    Provider,
    X25519PrivateKey,
    constant_time_equal,
    hmac_sha384,
    poly1305_tag,
    poly1305_verify,
    sha384,
)
from gateway.errors import (
    AuthenticationError,
    DecodeError,
    LocalProtocolError,
    ProtocolError,
    ReplayError,
)

Rng = Callable[[int], bytes]

SUITE_KEM = {
    L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384: KemAlg.MLKEM768,
    L.SuiteId.MLKEM1024_X25519_AES256GCM_SHA384: KemAlg.MLKEM1024,
    L.SuiteId.FRODOKEM976AES_X25519_AES256GCM_SHA384: KemAlg.FRODOKEM976AES,
}
SUITE_NAMES = {
    L.SuiteId.MLKEM768_X25519_AES256GCM_SHA384: "ML-KEM-768+X25519",
    L.SuiteId.MLKEM1024_X25519_AES256GCM_SHA384: "ML-KEM-1024+X25519",
    L.SuiteId.FRODOKEM976AES_X25519_AES256GCM_SHA384: "FrodoKEM-976-AES+X25519",
}


class Role(Enum):
    INITIATOR = auto()
    RESPONDER = auto()


class State(Enum):
    """Named after what is expected next (aioquic style)."""

    I_START = auto()
    I_EXPECT_CHALLENGE = auto()  # admission (§3.5): the responder speaks first
    I_EXPECT_ADMIT = auto()
    I_EXPECT_QKD_KEY = auto()
    I_EXPECT_RESP = auto()
    I_EXPECT_REKEY_RESP = auto()  # resumption on a new connection
    R_EXPECT_HELLO = auto()  # admission (§3.5): CHALLENGE sent
    R_EXPECT_INIT = auto()  # admitted: INIT (bootstrap) or REKEY_INIT (resume), as the HELLO said
    R_EXPECT_QKD_KEY = auto()
    R_EXPECT_CONFIRM = auto()
    R_EXPECT_EPOCH_CONFIRM = auto()  # resumption: first record under the new epoch
    ESTABLISHED = auto()
    CLOSED = auto()


class RekeyPhase(Enum):
    IDLE = auto()
    EXPECT_QKD_KEYS = auto()
    EXPECT_REKEY_RESP = auto()
    R_EXPECT_QKD_KEYS = auto()


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedQkdKeys:
    """Initiator (master SAE): fetch ``count`` new keys (enc_keys) and call provide_qkd_keys."""

    count: int


@dataclass(frozen=True, slots=True)
class NeedQkdKeysById:
    """Responder (slave SAE): fetch these key IDs (dec_keys) and call provide_qkd_keys."""

    key_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    epoch: int
    suite: str
    qkd_used: bool
    peer: PeerIdentity
    transcript_hash: bytes
    resumed: bool


@dataclass(frozen=True, slots=True)
class RekeyComplete:
    epoch: int
    qkd_used: bool
    transcript_hash: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class Alarm:
    kind: str  # "qkd_unavailable", "qkd_mode_downgrade", "rebootstrap", "rekey_failed" (§9)
    detail: str
    active: bool = True


@dataclass(frozen=True, slots=True)
class Closed:
    alert: L.Alert
    reason: str
    by_peer: bool
    peer_code: int | None = None  # the code of the peer's ALERT, as sent (before §8's mapping)
    refused_unconfirmed: bool = False  # initiator: the peer refused a bootstrap we had finished
    # initiator: closed before ADMIT verified (AD5), i.e. before any QKD key was fetched; only
    # such a load refusal (alert 17) may be retried without growing the back-off (§7)
    before_admit: bool = False


Event = (
    Admitted
    | NeedQkdKeys
    | NeedQkdKeysById
    | HandshakeComplete
    | RekeyComplete
    | MessageReceived
    | Alarm
    | Closed
)


@dataclass(frozen=True, slots=True)
class SessionParams:
    role: Role
    suite: L.SuiteId
    qkd_policy: L.QkdPolicyId
    peer_name: str
    rekey_interval: float = L.REKEY_AFTER_SECONDS
    max_records: int = 2**24
    max_bytes: int = 2**36
    max_message_bytes: int = 1 << 20
    handshake_timeout: float = L.HANDSHAKE_TIMEOUT_SECONDS


class Association:
    """State that outlives one TCP connection: the chain key, epoch, replay caches, limits.

    The shell keeps one per peer. Losing it (process restart) forces a new bootstrap.
    """

    def __init__(self) -> None:
        self.chain: bytes | None = None
        self.epoch = -1
        self.next: tuple[int, bytes] | None = (
            None  # responder: (epoch, chain) awaiting confirmation
        )
        self.qkd_used: bool | None = None  # QKD use of the current epoch (to alarm on change)
        self.used_key_ids: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.seen_nonces: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        # bootstrap token buckets per source (the shell passes the peer's IP address, which TCP
        # has already proven): forged INITs from one address cannot starve another.
        self.buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self.updated_at = 0.0  # `now` of the last epoch change (stale chains are dropped)
        # initiator: the chain was dropped on an (unauthenticated) alert 16; the next bootstrap
        # must bring QKD key even under `preferred` (§5, §10), so a forged alert 16 plus stolen
        # bootstrap credentials cannot yield a session without QKD.
        self.rebootstrap_needs_qkd = False
        self.global_bucket = (float(L.GLOBAL_BOOTSTRAP_BURST), -1.0)
        # responder: this process has held a chain with this peer. From then on a bootstrap must
        # bring QKD key unless qkd = off, however old the chain (§3.4 B3, §10); forget() keeps
        # it, only a restart clears it.
        self.had_chain = False

    def remember(self, cache: collections.OrderedDict[bytes, None], item: bytes) -> bool:
        """Add ``item``; False if it was already there (replay)."""
        if item in cache:
            return False
        cache[item] = None
        while len(cache) > L.REPLAY_CACHE_SIZE:
            cache.popitem(last=False)
        return True

    def take_token(self, now: float, source: str = "") -> bool:
        tokens, at = self.buckets.pop(source, (float(L.BOOTSTRAP_BURST), now))
        tokens = min(float(L.BOOTSTRAP_BURST), tokens + (now - at) * L.BOOTSTRAP_PER_SECOND)
        ok = tokens >= 1
        self.buckets[source] = (tokens - 1 if ok else tokens, now)
        while len(self.buckets) > 1024:
            self.buckets.popitem(last=False)
        return ok

    def has_token(self, now: float, source: str = "") -> bool:
        """Whether :meth:`take_token` would succeed now (nothing is taken)."""
        tokens, at = self.buckets.get(source, (float(L.BOOTSTRAP_BURST), now))
        return min(float(L.BOOTSTRAP_BURST), tokens + (now - at) * L.BOOTSTRAP_PER_SECOND) >= 1

    def take_global_token(self, now: float) -> bool:
        """The budget over all sources for unauthenticated (pki) bootstrap INITs (B3)."""
        tokens, at = self.global_bucket
        if at >= 0:
            tokens = min(
                float(L.GLOBAL_BOOTSTRAP_BURST),
                tokens + (now - at) * L.GLOBAL_BOOTSTRAP_PER_SECOND,
            )
        ok = tokens >= 1
        self.global_bucket = (tokens - 1 if ok else tokens, now)
        return ok

    def set_chain(self, epoch: int, chain: bytes) -> None:
        self.chain = chain
        self.epoch = epoch
        self.next = None
        self.had_chain = True

    def forget(self) -> None:
        """Erase the chain (peer lost its state, or shutdown)."""
        self.chain = None
        self.next = None
        self.epoch = -1
        self.qkd_used = None

    def __repr__(self) -> str:
        return f"Association(epoch={self.epoch}, chain=<secret>)"


def key_id_bytes(key_id: str) -> bytes:
    try:
        return uuid.UUID(key_id).bytes
    except ValueError as exc:
        raise LocalProtocolError("QKD key ID is not a UUID") from exc


def key_id_str(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))


_PROTOCOL_ALERTS: dict[type[Exception], L.Alert] = {
    DecodeError: L.Alert.DECODE_ERROR,
    ReplayError: L.Alert.REPLAY,
    AuthenticationError: L.Alert.AUTHENTICATION_FAILED,
}


class _Fail(Exception):
    """Internal: abort the connection with this alert."""

    def __init__(self, alert: L.Alert, reason: str) -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason


class Connection:
    """One connection's protocol state machine (initiator or responder)."""

    def __init__(
        self,
        params: SessionParams,
        auth: Authenticator,
        provider: Provider,
        rng: Rng,
        association: Association,
        *,
        source: str = "",
    ) -> None:
        if auth.identity == params.peer_name:
            raise LocalProtocolError("peer name equals our own identity (reflection)")
        self.params = params
        self.auth = auth
        self.provider = provider
        self.rng = rng
        self.assoc = association
        self.source = source  # the peer's address, for per-source admission limits
        self.kem_alg = SUITE_KEM[params.suite]
        self.state = State.I_START if params.role is Role.INITIATOR else State.R_EXPECT_HELLO
        self._adm = Admission(
            initiator=params.role is Role.INITIATOR,
            suite=params.suite,
            auth_mode=auth.mode,
            qkd_policy=params.qkd_policy,
            identity=auth.identity,
            peer_name=params.peer_name,
            s0=schedule.psk_secret(auth.psk()),
        )
        self._frames = FrameBuffer()
        self._out = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        self._deadline: float | None = None
        # handshake scratch (wiped when done)
        self._init: Init | None = None
        self._init_frame = b""
        self._resp_frame = b""
        self._kem_key: KemPrivateKey | None = None
        self._x_key: X25519PrivateKey | None = None
        self._qkd: list[tuple[bytes, bytes]] | None = None  # (key id, key bytes)
        self._s0 = b""
        self._s3 = b""
        self._peer: PeerIdentity | None = None
        self._qkd_used = False
        self._rebootstrap = False
        self._next_chain: tuple[int, bytes] | None = None
        # rekey scratch
        self.rekey_phase = RekeyPhase.IDLE
        self._rk_init: RekeyInit | None = None
        self._rk_init_frame = b""
        self._rk_base_chain = b""
        self._rk_next_retry: float | None = None
        # record layer
        self.epoch = -1
        self.epoch_started = 0.0
        self._send: SendState | None = None
        self._recv: RecvState | None = None
        self._recv_prev: RecvState | None = None
        self._send_next: SendState | None = None  # responder: new epoch awaiting confirmation
        self._recv_next: RecvState | None = None
        self._reassembly: bytearray | None = None
        self.transcript_hash = b""
        self._next_th = b""
        self.resumed = False
        self.stats: collections.Counter[str] = collections.Counter()
        if params.role is Role.RESPONDER:
            self._out += self._adm.create_challenge(rng)  # AD1: the responder speaks first

    # --- public API ---------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Connection({self.params.role.name}, {self.state.name}, epoch={self.epoch})"

    def start(self, now: float) -> None:
        """Initiator: begin (bootstrap, or resumption when the association holds a chain)."""
        if self.params.role is not Role.INITIATOR or self.state is not State.I_START:
            raise LocalProtocolError("start() is for a new initiator connection")
        self._deadline = now + self.params.handshake_timeout
        self.state = State.I_EXPECT_CHALLENGE  # AD1..AD5 come first (§3.5)

    def _begin(self, now: float) -> None:
        """AD5 passed: continue with what was admitted (the HELLO's kind and epoch), not with
        whatever the association holds now."""
        if self._adm.kind is L.HelloKind.RESUME:
            if self.assoc.chain is None or self.assoc.epoch != self._adm.epoch:
                raise _Fail(L.Alert.INTERNAL_ERROR, "the admitted chain is gone")
            self.resumed = True
            self.state = State.I_EXPECT_REKEY_RESP
            self._start_rekey(now)
            return
        if self.params.qkd_policy is L.QkdPolicyId.OFF:
            self._create_init(now)
        else:
            self.state = State.I_EXPECT_QKD_KEY
            self._events.append(NeedQkdKeys(L.BOOTSTRAP_QKD_KEYS))  # B1

    def provide_qkd_keys(self, keys: list[tuple[str, bytes]] | None, now: float) -> None:
        """Answer NeedQkdKeys / NeedQkdKeysById. ``None`` means the KME could not deliver."""
        self._guard(now, lambda n: self._provide(keys, n))

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes from the peer. Never raises for bad input: it closes with an alert."""
        if self.state is State.CLOSED:
            return
        if self.state is State.R_EXPECT_HELLO and self._deadline is None:
            self._deadline = now + self.params.handshake_timeout
        self._frames.feed(data)
        self._guard(now, self._drain_frames)

    def send_message(self, data: bytes, now: float) -> None:
        """Protect one application message (fragmented over records as needed)."""
        if not self.can_send():
            raise LocalProtocolError(f"cannot send in state {self.state.name}")
        if len(data) > self.params.max_message_bytes:
            raise LocalProtocolError("message larger than max_message_bytes")
        assert self._send is not None
        if len(data) <= L.MAX_RECORD_PLAINTEXT:  # the common case: one DATA record
            self._out += self._send.seal(L.ContentType.DATA, data)
            self.stats["records_sent"] += 1
            self.stats["bytes_sent"] += len(data)
            self._maybe_budget_rekey(now)
            return
        chunks = [
            data[i : i + L.MAX_RECORD_PLAINTEXT]
            for i in range(0, len(data), L.MAX_RECORD_PLAINTEXT)
        ] or [b""]
        if self._send.seq + len(chunks) > self._send.max_records or not self._send.room(len(data)):
            raise LocalProtocolError("record budget of this epoch is exhausted; rekey first")
        for i, chunk in enumerate(chunks):
            if len(chunks) == 1:
                ctype = L.ContentType.DATA
            elif i == 0:
                ctype = L.ContentType.DATA_FIRST
            elif i == len(chunks) - 1:
                ctype = L.ContentType.DATA_LAST
            else:
                ctype = L.ContentType.DATA_MORE
            self._out += self._send.seal(ctype, chunk)
        self.stats["records_sent"] += len(chunks)
        self.stats["bytes_sent"] += len(data)
        self._maybe_budget_rekey(now)

    def can_send(self) -> bool:
        return (
            self.state is State.ESTABLISHED
            and self._send is not None
            and self._send.seq < self._send.max_records
        )

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The next time handle_timer() must be called, or None."""
        if self.state is State.CLOSED:
            return None
        times = [t for t in (self._deadline, self._rk_next_retry) if t is not None]
        if self.state is State.ESTABLISHED:
            if self.params.role is Role.INITIATOR and self.rekey_phase is RekeyPhase.IDLE:
                times.append(self.epoch_started + self.params.rekey_interval)
            times.append(self.epoch_started + self.params.rekey_interval * L.REJECT_AFTER_FACTOR)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._guard(now, self._on_timer)

    def close(
        self, now: float, alert: L.Alert = L.Alert.CLOSE_NOTIFY, reason: str = "closed"
    ) -> None:
        """Close locally: an authenticated CLOSE record when established, else an ALERT."""
        if self.state is State.CLOSED:
            return
        if self.state is State.ESTABLISHED and self._send is not None and self._send.room(1):
            self._out += self._send.seal(L.ContentType.CLOSE, bytes([alert]))
        else:
            self._out += AlertMsg(alert, reason).encode()
        refused = self._refused_before_confirm()  # e.g. the dead-peer timeout before R's record
        self._finish(alert, reason, by_peer=False, refused_unconfirmed=refused)

    def transport_closed(self, now: float) -> None:
        """The TCP connection ended without an ALERT (EOF, reset): CLOSED, one Closed event.

        An initiator whose bootstrap R never confirmed discards that chain, as after an ALERT
        (§3.5, §7): a CONFIRM lost with the connection must not leave I resuming a chain R
        does not hold.
        """
        if self.state is State.CLOSED:
            return
        refused = self._refused_before_confirm()
        reason = "transport closed"
        self._finish(L.Alert.CLOSE_NOTIFY, reason, by_peer=True, refused_unconfirmed=refused)

    @property
    def admitted_kind(self) -> L.HelloKind | None:
        """Responder: the kind of HELLO admitted at AD4 (None before AD4)."""
        return self._adm.kind if self._adm.state is AdmState.DONE else None

    @property
    def suite_name(self) -> str:
        return SUITE_NAMES[self.params.suite]

    # --- internals: error handling ------------------------------------------------------

    def _guard(self, now: float, fn: Callable[[float], None]) -> None:
        try:
            fn(now)
        except _Fail as f:
            self._abort(f.alert, f.reason)
        except Refused as f:
            self._abort(f.alert, f.reason)
        except ProtocolError as exc:
            if isinstance(exc, LocalProtocolError):
                raise
            alert = next(
                (a for t, a in _PROTOCOL_ALERTS.items() if isinstance(exc, t)),
                L.Alert.UNEXPECTED_MESSAGE,
            )
            self._abort(alert, str(exc))

    def _abort(self, alert: L.Alert, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.stats[f"abort_{alert.name.lower()}"] += 1
        self._out += AlertMsg(alert, alert.name.lower()).encode()  # details stay local
        self._finish(alert, reason, by_peer=False)

    def _finish(
        self,
        alert: L.Alert,
        reason: str,
        by_peer: bool,
        peer_code: int | None = None,
        refused_unconfirmed: bool = False,
    ) -> None:
        before_admit = self.state in (State.I_EXPECT_CHALLENGE, State.I_EXPECT_ADMIT)
        self.state = State.CLOSED
        self._wipe_handshake()
        for st in (self._send, self._recv, self._recv_prev, self._send_next, self._recv_next):
            if st is not None:
                st.wipe()
        self._send = self._recv = self._recv_prev = self._send_next = self._recv_next = None
        self._events.append(
            Closed(alert, reason, by_peer, peer_code, refused_unconfirmed, before_admit)
        )

    def _wipe_handshake(self) -> None:
        self._adm.wipe()
        if self._x_key is not None:
            self._x_key.wipe()
        self._x_key = None
        self._kem_key = None
        self._qkd = None
        self._s0 = self._s3 = b""
        self._rk_base_chain = b""
        self._init = None
        self._rk_init = None

    # --- internals: dispatch ------------------------------------------------------------

    def _drain_frames(self, now: float) -> None:
        while self.state is not State.CLOSED:
            item = self._frames.next_frame()
            if item is None:
                return
            ftype, body, raw = item
            self.stats["frames_received"] += 1
            if ftype is L.FrameType.ALERT:
                msg = AlertMsg.decode(body)
                alert = L.Alert(msg.code)
                resuming = (
                    self.state is State.I_EXPECT_ADMIT and self._adm.kind is L.HelloKind.RESUME
                )
                if self.state is State.ESTABLISHED or (
                    alert is L.Alert.NO_SESSION and not resuming
                ):
                    # Unauthenticated: it may close this connection, nothing more (§8).
                    alert = L.Alert.UNEXPECTED_MESSAGE
                if alert is L.Alert.NO_SESSION:
                    self._no_session()
                refused = self._refused_before_confirm()
                self._finish(
                    alert,
                    f"peer alert {msg.code}",
                    by_peer=True,
                    peer_code=msg.code,
                    refused_unconfirmed=refused,
                )
                return
            if ftype is L.FrameType.RECORD:
                self._on_record(body, now)
                continue
            self._on_handshake(ftype, body, raw, now)

    def _on_handshake(self, ftype: L.FrameType, body: bytes, raw: bytes, now: float) -> None:
        s, role = self.state, self.params.role
        kind = self._adm.kind
        if ftype is L.FrameType.CHALLENGE and s is State.I_EXPECT_CHALLENGE:
            if body[:1] and body[0] != L.VERSION:  # §3.5: before decoding anything else
                raise _Fail(L.Alert.UNSUPPORTED_VERSION, f"CHALLENGE version {body[0]}")
            self._out += self._adm.consume_challenge(
                Challenge.decode(body), raw, self.assoc, self.rng
            )  # AD2
            self.state = State.I_EXPECT_ADMIT
        elif ftype is L.FrameType.HELLO and s is State.R_EXPECT_HELLO:
            if body[:1] and body[0] != L.VERSION:
                raise _Fail(L.Alert.UNSUPPORTED_VERSION, f"HELLO version {body[0]}")
            admit, ev = self._adm.consume_hello(Hello.decode(body), raw, self.assoc)  # AD3
            if ev.kind is L.HelloKind.BOOTSTRAP:
                self._charge_bootstrap(now)  # AD3: before ADMIT, so I spends no QKD key on it
            self._out += admit  # AD4
            self._events.append(ev)
            self.state = State.R_EXPECT_INIT
        elif ftype is L.FrameType.ADMIT and s is State.I_EXPECT_ADMIT:
            self._adm.consume_admit(Admit.decode(body))  # AD5: only now spend QKD key
            self._begin(now)
        elif (
            ftype is L.FrameType.INIT and s is State.R_EXPECT_INIT and kind is L.HelloKind.BOOTSTRAP
        ):
            if body[:1] and body[0] != L.VERSION:  # §3.1: before decoding anything else
                raise _Fail(L.Alert.UNSUPPORTED_VERSION, f"INIT version {body[0]}")
            self._consume_init(Init.decode(body), raw, now)
        elif ftype is L.FrameType.RESP and s is State.I_EXPECT_RESP:
            self._consume_response(Resp.decode(body), raw, now)
        elif ftype is L.FrameType.CONFIRM and s is State.R_EXPECT_CONFIRM:
            self._consume_confirm(Confirm.decode(body), raw, now)
        elif (
            ftype is L.FrameType.REKEY_INIT
            and role is Role.RESPONDER
            and (
                (s is State.R_EXPECT_INIT and kind is L.HelloKind.RESUME)
                or (s is State.ESTABLISHED and self.rekey_phase is RekeyPhase.IDLE)
            )
        ):
            rk = RekeyInit.decode(body)
            if s is State.R_EXPECT_INIT and rk.epoch != self._adm.epoch + 1:
                # §3.5 AD4: a resume admission for epoch e admits REKEY_INIT for e + 1 only
                raise _Fail(L.Alert.UNEXPECTED_MESSAGE, "REKEY_INIT is not for the admitted epoch")
            self._consume_rekey_init(rk, raw, now)
        elif ftype is L.FrameType.REKEY_RESP and self.rekey_phase is RekeyPhase.EXPECT_REKEY_RESP:
            self._consume_rekey_response(RekeyResp.decode(body), raw, now)
        else:
            raise _Fail(L.Alert.UNEXPECTED_MESSAGE, f"{ftype.name} not expected in {s.name}")

    def _provide(self, keys: list[tuple[str, bytes]] | None, now: float) -> None:
        qkd = None if keys is None else [(key_id_bytes(k), v) for k, v in keys]
        if qkd is not None and any(len(v) < L.QKD_IKM_LEN for _, v in qkd):
            raise LocalProtocolError("QKD keys must be at least 256 bits")
        if self.state is State.I_EXPECT_QKD_KEY:
            self._qkd = qkd
            if qkd is None:
                self._needs_qkd_after_no_session()
                self._qkd_missing("bootstrap")
            self._create_init(now)
        elif self.state is State.R_EXPECT_QKD_KEY:
            self._qkd = qkd
            if qkd is None and self._rebootstrap:
                raise _Fail(
                    L.Alert.QKD_UNAVAILABLE,
                    "re-bootstrap without QKD refused after a chain existed",
                )
            if qkd is None:
                self._qkd_missing("bootstrap")
            self._create_response(now)
        elif self.rekey_phase is RekeyPhase.EXPECT_QKD_KEYS:
            if qkd is None:
                if self.params.qkd_policy is L.QkdPolicyId.REQUIRED:
                    self._events.append(
                        Alarm("qkd_unavailable", "no QKD key for rekey; keeping current keys")
                    )
                    self.rekey_phase = RekeyPhase.IDLE
                    self._rk_next_retry = now + L.REKEY_RETRY_SECONDS
                    if self.state is State.I_EXPECT_REKEY_RESP:
                        raise _Fail(L.Alert.QKD_UNAVAILABLE, "no QKD key for resumption")
                    return
                self._events.append(Alarm("qkd_unavailable", "rekey without QKD (qkd = preferred)"))
            self._create_rekey_init(qkd, now)
        elif self.rekey_phase is RekeyPhase.R_EXPECT_QKD_KEYS:
            if qkd is None:
                if self.params.qkd_policy is L.QkdPolicyId.REQUIRED:
                    self._events.append(Alarm("qkd_unavailable", "peer's rekey keys not available"))
                    raise _Fail(L.Alert.QKD_UNAVAILABLE, "QKD keys for rekey not available")
                self._events.append(Alarm("qkd_unavailable", "rekey without QKD (qkd = preferred)"))
            self._create_rekey_response(qkd, now)
        else:
            raise LocalProtocolError("no QKD key was requested")

    def _refused_before_confirm(self) -> bool:
        """An ALERT to an initiator whose bootstrap R never confirmed (no record from R yet).

        R refused our CONFIRM (e.g. our certificate), or someone forged the alert: either way
        the chain of this bootstrap is not known to be shared. Forget it, and, as after alert 16
        (§5), require QKD key on the next bootstrap unless the policy is off, so a forged alert
        here cannot lead to a bootstrap without QKD either.
        """
        if not (
            self.params.role is Role.INITIATOR
            and self.state is State.ESTABLISHED
            and self._adm.kind is L.HelloKind.BOOTSTRAP
            and self.stats["records_received"] == 0
        ):
            return False
        self.assoc.forget()
        self.assoc.rebootstrap_needs_qkd = self.params.qkd_policy is not L.QkdPolicyId.OFF
        return True

    def _no_session(self) -> None:
        """Alert 16 while resuming (§5): forget the chain; the re-bootstrap must bring QKD."""
        policy_off = self.params.qkd_policy is L.QkdPolicyId.OFF
        self.assoc.forget()
        self.assoc.rebootstrap_needs_qkd = not policy_off
        self._events.append(
            Alarm(
                "rebootstrap",
                "peer says it has no session (alert 16, unauthenticated)"
                + ("" if policy_off else "; the new bootstrap must bring a QKD key"),
            )
        )

    def _needs_qkd_after_no_session(self) -> None:
        """B1/B6 (§5, §10): after an unauthenticated alert 16, no bootstrap without QKD key."""
        if self.assoc.rebootstrap_needs_qkd and self.params.qkd_policy is not L.QkdPolicyId.OFF:
            self._events.append(
                Alarm(
                    "rebootstrap",
                    "re-bootstrap after alert 16 refused without QKD key (a forged alert 16 "
                    "plus stolen bootstrap credentials must not yield a session)",
                )
            )
            raise _Fail(L.Alert.QKD_UNAVAILABLE, "re-bootstrap after alert 16 needs a QKD key")

    def _qkd_missing(self, what: str) -> None:
        if self.params.qkd_policy is L.QkdPolicyId.REQUIRED:
            self._events.append(Alarm("qkd_unavailable", f"no QKD key for {what}; failing closed"))
            raise _Fail(L.Alert.QKD_UNAVAILABLE, "QKD key unavailable and qkd = required")
        self._events.append(Alarm("qkd_unavailable", f"{what} without QKD (qkd = preferred)"))

    # --- bootstrap: initiator -----------------------------------------------------------

    def _create_init(self, now: float) -> None:
        """B2 create_init."""
        p = self.params
        self._kem_key = self.provider.kem_keygen(self.kem_alg, self.rng(KEM_SEED_LEN))
        self._x_key = X25519PrivateKey(self.rng(32))
        offered = self._qkd is not None
        self._s0 = schedule.psk_secret(self.auth.psk())
        unsigned = Init(
            suite=p.suite,
            auth_mode=self.auth.mode,
            qkd_policy=p.qkd_policy,
            qkd_offered=offered,
            qkd_key_id=self._qkd[0][0] if self._qkd else bytes(L.KEY_ID_LEN),
            nonce=self.rng(L.NONCE_LEN),
            initiator=self.auth.identity,
            responder=p.peer_name,
            kem_public=self._kem_key.public_bytes(),
            x25519_public=self._x_key.public_bytes(),
            admission=bytes(L.ADMISSION_LEN),
        )
        adm = self._admission_mac(unsigned, p.peer_name)
        msg = dataclasses.replace(unsigned, admission=adm)
        self._init = msg
        self._init_frame = msg.encode()
        self._out += self._init_frame
        self.state = State.I_EXPECT_RESP

    def _admission_mac(self, m: Init, responder: str) -> bytes:
        if self.auth.mode is L.AuthModeId.PSK:
            key = schedule.admission_key_psk(self._s0)
        else:
            key = schedule.admission_key_pki(m.suite, responder)
        return hmac_sha384(key, m.core())[: L.ADMISSION_LEN]

    def _consume_response(self, m: Resp, raw: bytes, now: float) -> None:
        """B6 consume_response."""
        if self._init is None or self._kem_key is None or self._x_key is None:
            raise _Fail(L.Alert.UNEXPECTED_MESSAGE, "RESP without INIT")
        offered = self._init.qkd_offered
        if m.qkd_used and not offered:
            raise _Fail(
                L.Alert.QKD_POLICY_MISMATCH, "responder claims a QKD key that was not offered"
            )
        self._qkd_used = m.qkd_used
        mlkem_ss = self.provider.decapsulate(self._kem_key, m.kem_ciphertext)
        x_ss = self._x_key.exchange(m.x25519_public)
        qkd = self._qkd[0][1] if (self._qkd and m.qkd_used) else None
        secrets = schedule.bootstrap_secret(self.auth.psk(), qkd, mlkem_ss, x_ss)
        self._s3 = secrets["S3"]
        th2 = sha384(self._init_frame + m.core())
        self._peer = self._verify_peer_auth(m.certs, th2, m.auth, L.SIG_ROLE_R, L.L_PSK_AUTH_R)
        th2s = sha384(self._init_frame + m.core() + vec16(m.auth))
        expect = hmac_sha384(schedule.finished_key(self._s3, L.L_FINISHED_R, th2s), th2s)
        if not constant_time_equal(expect, m.finished):
            raise AuthenticationError("responder finished MAC does not verify")
        if not m.qkd_used:
            self._needs_qkd_after_no_session()
        if offered and not m.qkd_used:  # authenticated now: apply the policy
            self._qkd_missing("bootstrap (responder had no QKD key)")
        self._resp_frame = raw
        self._create_confirm(now)

    def _create_confirm(self, now: float) -> None:
        """B7 create_confirm, then B9 derive epoch 0."""
        core = Confirm(certs=self.auth.certs, auth=b"", finished=b"").core()
        prefix = self._init_frame + self._resp_frame
        th3a = sha384(prefix + core)
        auth = self._make_auth(th3a, L.SIG_ROLE_I, L.L_PSK_AUTH_I)
        th3s = sha384(prefix + core + vec16(auth))
        fin = hmac_sha384(schedule.finished_key(self._s3, L.L_FINISHED_I, th3s), th3s)
        frame = Confirm(certs=self.auth.certs, auth=auth, finished=fin).encode()
        self._out += frame
        th3 = sha384(prefix + frame)
        keys = schedule.epoch_keys(self._s3, th3)  # B9
        assert self._peer is not None
        self._install_epoch(0, keys, th3, now)
        self._established(now, self._peer, resumed=False)

    # --- bootstrap: responder -----------------------------------------------------------

    def _charge_bootstrap(self, now: float) -> None:
        """AD3, bootstrap HELLO: the bootstrap budgets, charged before ADMIT is sent (§3.5).

        The initiator fetches QKD key only after ADMIT, so a refusal here costs it nothing. In pki
        and wot the HELLO proves knowledge of public values only: its INIT's dec_keys call and
        ML-DSA signature also come out of one budget over all source addresses. The per-address
        token is taken only once both buckets had one, so a refusal by the global budget does
        not drain the real peer's own bucket.
        """
        signed = self.auth.mode in (L.AuthModeId.PKI, L.AuthModeId.WOT)
        if not self.assoc.has_token(now, self.source):
            raise _Fail(L.Alert.RATE_LIMITED, "too many bootstrap attempts")
        if signed and not self.assoc.take_global_token(now):
            self.stats["global_budget_refusals"] += 1
            raise _Fail(L.Alert.RATE_LIMITED, "global budget for unauthenticated INITs exhausted")
        self.assoc.take_token(now, self.source)

    def _consume_init(self, m: Init, raw: bytes, now: float) -> None:
        """B3 consume_init: cheap admission checks, before any KME call or signature."""
        p = self.params
        if m.suite != p.suite:
            raise _Fail(L.Alert.SUITE_MISMATCH, "suite differs from the configured suite")
        if m.auth_mode != self.auth.mode:
            raise _Fail(L.Alert.AUTH_MODE_MISMATCH, "auth mode differs from the configured mode")
        if m.qkd_policy != p.qkd_policy:
            raise _Fail(
                L.Alert.QKD_POLICY_MISMATCH, "QKD policy differs from the configured policy"
            )
        if m.responder != self.auth.identity:
            raise _Fail(L.Alert.WRONG_IDENTITY, "INIT is addressed to another gateway")
        if m.initiator == self.auth.identity:
            raise _Fail(L.Alert.WRONG_IDENTITY, "peer claims our own identity (reflection)")
        if m.initiator != p.peer_name:
            raise _Fail(L.Alert.WRONG_IDENTITY, "INIT is from an unexpected peer")
        self._s0 = schedule.psk_secret(self.auth.psk())
        if not constant_time_equal(self._admission_mac(m, self.auth.identity), m.admission):
            raise _Fail(L.Alert.ADMISSION_FAILED, "INIT admission MAC does not verify")
        if m.qkd_offered and p.qkd_policy is L.QkdPolicyId.OFF:
            raise _Fail(L.Alert.QKD_POLICY_MISMATCH, "QKD key offered under qkd = off")
        if not m.qkd_offered and p.qkd_policy is L.QkdPolicyId.REQUIRED:
            raise _Fail(L.Alert.QKD_UNAVAILABLE, "no QKD key offered and qkd = required")
        # Nothing here changes the association: the INIT is not authenticated yet. A chain is
        # replaced only at B9, after CONFIRM verified (an old chain is not dropped here).
        self._rebootstrap = self.assoc.had_chain
        if self._rebootstrap and not m.qkd_offered and p.qkd_policy is not L.QkdPolicyId.OFF:
            # This process has held a chain with the peer: a new bootstrap must bring a QKD key
            # too, however old that chain, so that stolen bootstrap credentials alone cannot
            # yield a session without QKD (§3.4 B3, §10).
            raise _Fail(
                L.Alert.QKD_UNAVAILABLE, "re-bootstrap without QKD refused after a chain existed"
            )
        if not self.assoc.remember(self.assoc.seen_nonces, m.nonce):
            raise ReplayError("INIT nonce seen before")
        if m.qkd_offered and not self.assoc.remember(self.assoc.used_key_ids, m.qkd_key_id):
            raise ReplayError("QKD key ID used before")
        self._init, self._init_frame = m, raw
        self._deadline = now + p.handshake_timeout
        if m.qkd_offered:
            self.state = State.R_EXPECT_QKD_KEY
            self._events.append(NeedQkdKeysById((key_id_str(m.qkd_key_id),)))  # B4
        else:
            if p.qkd_policy is L.QkdPolicyId.PREFERRED:  # a first bootstrap without QKD (§9)
                self._qkd_missing("bootstrap (the initiator offered no QKD key)")
            self._create_response(now)

    def _create_response(self, now: float) -> None:
        """B5 create_response."""
        m = self._init
        assert m is not None
        qkd = None
        if self._qkd:
            if self._qkd[0][0] != m.qkd_key_id:
                raise LocalProtocolError("key source returned another key ID")
            qkd = self._qkd[0][1]
        self._qkd_used = qkd is not None
        ct, mlkem_ss = self.provider.encapsulate(self.kem_alg, m.kem_public)
        self._x_key = X25519PrivateKey(self.rng(32))
        x_ss = self._x_key.exchange(m.x25519_public)
        self._s3 = schedule.bootstrap_secret(self.auth.psk(), qkd, mlkem_ss, x_ss)["S3"]
        unsigned = Resp(
            nonce=self.rng(L.NONCE_LEN),
            qkd_used=self._qkd_used,
            kem_ciphertext=ct,
            x25519_public=self._x_key.public_bytes(),
            certs=self.auth.certs,
            auth=b"",
            finished=b"",
        )
        th2 = sha384(self._init_frame + unsigned.core())
        auth = self._make_auth(th2, L.SIG_ROLE_R, L.L_PSK_AUTH_R)
        th2s = sha384(self._init_frame + unsigned.core() + vec16(auth))
        fin = hmac_sha384(schedule.finished_key(self._s3, L.L_FINISHED_R, th2s), th2s)
        frame = dataclasses.replace(unsigned, auth=auth, finished=fin).encode()
        self._resp_frame = frame
        self._out += frame
        self.state = State.R_EXPECT_CONFIRM

    def _consume_confirm(self, m: Confirm, raw: bytes, now: float) -> None:
        """B8 consume_confirm, then B9 derive epoch 0."""
        prefix = self._init_frame + self._resp_frame
        th3a = sha384(prefix + m.core())
        self._peer = self._verify_peer_auth(m.certs, th3a, m.auth, L.SIG_ROLE_I, L.L_PSK_AUTH_I)
        th3s = sha384(prefix + m.core() + vec16(m.auth))
        expect = hmac_sha384(schedule.finished_key(self._s3, L.L_FINISHED_I, th3s), th3s)
        if not constant_time_equal(expect, m.finished):
            raise AuthenticationError("initiator finished MAC does not verify")
        if self._rebootstrap:
            self._events.append(
                Alarm(
                    "rebootstrap",
                    "peer bootstrapped again although a chain existed",
                )
            )
        th3 = sha384(prefix + raw)
        keys = schedule.epoch_keys(self._s3, th3)  # B9
        self._install_epoch(0, keys, th3, now)
        self._established(now, self._peer, resumed=False)

    # --- bootstrap: shared --------------------------------------------------------------

    def _make_auth(self, th: bytes, sig_role: bytes, psk_label: bytes) -> bytes:
        if self.auth.mode is L.AuthModeId.PSK:
            return hmac_sha384(schedule.psk_auth_key(self._s0, psk_label, th), th)
        return self.auth.sign(sig_role + th)

    def _verify_peer_auth(
        self, certs: tuple[bytes, ...], th: bytes, auth: bytes, sig_role: bytes, psk_label: bytes
    ) -> PeerIdentity:
        if self.auth.mode is L.AuthModeId.PSK:
            if certs:
                raise AuthenticationError("certificates sent in PSK mode")
            expect = hmac_sha384(schedule.psk_auth_key(self._s0, psk_label, th), th)
            if not constant_time_equal(expect, auth):
                raise AuthenticationError("PSK authentication MAC does not verify")
            return PeerIdentity(self.params.peer_name, "psk")
        try:
            peer = self.auth.verify(certs, self.params.peer_name, sig_role + th, auth)
        except InsufficientTrust as exc:  # wot: too few endorsements (§3.6 W4, alert 21)
            raise _Fail(L.Alert.INSUFFICIENT_TRUST, str(exc)) from exc
        except AuthenticationError as exc:
            raise _Fail(L.Alert.BAD_CERTIFICATE, str(exc)) from exc
        if peer.name == self.auth.identity:
            raise _Fail(
                L.Alert.WRONG_IDENTITY, "peer certificate carries our own identity (reflection)"
            )
        return peer

    def _install_epoch(self, epoch: int, keys: schedule.EpochKeys, th: bytes, now: float) -> None:
        p = self.params
        if p.role is Role.INITIATOR:
            send = SendState(epoch, keys.key_i2r, keys.iv_i2r, p.max_records, p.max_bytes)
            recv = RecvState(epoch, keys.key_r2i, keys.iv_r2i, p.max_records, p.max_bytes)
        else:
            send = SendState(epoch, keys.key_r2i, keys.iv_r2i, p.max_records, p.max_bytes)
            recv = RecvState(epoch, keys.key_i2r, keys.iv_i2r, p.max_records, p.max_bytes)
        for st in (self._send, self._recv_prev):
            if st is not None:
                st.wipe()
        self._recv_prev = self._recv
        self._send, self._recv = send, recv
        self.epoch = epoch
        self.epoch_started = now
        self.transcript_hash = th
        self.assoc.set_chain(epoch, keys.chain)
        self.assoc.updated_at = now

    def _established(self, now: float, peer: PeerIdentity, resumed: bool) -> None:
        self.state = State.ESTABLISHED
        if self._qkd_used:
            self.assoc.rebootstrap_needs_qkd = False
        if self.params.role is Role.RESPONDER and self._send is not None:
            # B9/RK7 on a new connection: the responder's first record confirms the session to
            # the initiator, which counts it as established only then (§5 "honest counts").
            self._out += self._send.seal(L.ContentType.EPOCH_CONFIRM, b"")
        self._deadline = None
        self._note_qkd_mode(self._qkd_used)
        self._wipe_handshake()
        self._events.append(
            HandshakeComplete(
                self.epoch, self.suite_name, self._qkd_used, peer, self.transcript_hash, resumed
            )
        )

    def _note_qkd_mode(self, used: bool) -> None:
        if self.assoc.qkd_used is not None and self.assoc.qkd_used != used:
            self._events.append(
                Alarm(
                    "qkd_mode_downgrade",
                    "QKD key " + ("restored" if used else "absent") + " in new epoch",
                    not used,
                )
            )
        self.assoc.qkd_used = used

    # --- rekey --------------------------------------------------------------------------

    def _start_rekey(self, now: float) -> None:
        """RK1: ask for fresh QKD keys (or go straight to RK2 under qkd = off)."""
        self._rk_next_retry = None
        if self.params.qkd_policy is L.QkdPolicyId.OFF:
            self._create_rekey_init(None, now)
            return
        self.rekey_phase = RekeyPhase.EXPECT_QKD_KEYS
        self._events.append(NeedQkdKeys(L.REKEY_QKD_KEYS))

    def _create_rekey_init(self, qkd: list[tuple[bytes, bytes]] | None, now: float) -> None:
        """RK2 create_rekey_init."""
        chain = self.assoc.chain
        assert chain is not None
        if qkd is not None and len(qkd) != L.REKEY_QKD_KEYS:
            raise LocalProtocolError(f"rekey needs {L.REKEY_QKD_KEYS} QKD keys")
        new_epoch = self.assoc.epoch + 1
        self._kem_key = self.provider.kem_keygen(self.kem_alg, self.rng(KEM_SEED_LEN))
        self._x_key = X25519PrivateKey(self.rng(32))
        self._qkd = qkd
        unsigned = RekeyInit(
            epoch=new_epoch,
            nonce=self.rng(L.NONCE_LEN),
            qkd_offered=qkd is not None,
            key_ids=tuple(k for k, _ in qkd)
            if qkd
            else tuple(bytes(L.KEY_ID_LEN) for _ in range(L.REKEY_QKD_KEYS)),
            kem_public=self._kem_key.public_bytes(),
            x25519_public=self._x_key.public_bytes(),
            wc_tag=b"",
            mac=b"",
        )
        ai = unsigned.auth_input()
        tag = poly1305_tag(qkd[1][1][:32], ai) if qkd else bytes(L.WC_TAG_LEN)  # one-time pad key 1
        mac_i, _ = schedule.rekey_mac_keys(chain, new_epoch)
        mac = hmac_sha384(mac_i, ai + tag)
        msg = dataclasses.replace(unsigned, wc_tag=tag, mac=mac)
        self._rk_init = msg
        self._rk_init_frame = msg.encode()
        self._rk_base_chain = chain
        self._out += self._rk_init_frame
        self.rekey_phase = RekeyPhase.EXPECT_REKEY_RESP
        self._deadline = now + self.params.handshake_timeout
        self.stats["rekeys_started"] += 1

    def _consume_rekey_init(self, m: RekeyInit, raw: bytes, now: float) -> None:
        """RK3 consume_rekey_init: chain MAC first (cheap), then KME, then the one-time tag."""
        a = self.assoc
        if a.chain is None:
            raise _Fail(L.Alert.NO_SESSION, "no chain to resume")
        base: bytes | None = None
        if m.epoch == a.epoch + 1:
            base = a.chain
        elif a.next is not None and m.epoch == a.next[0] + 1:
            base = a.next[1]  # initiator moved to `next` before we saw its first record
        if base is None:
            raise ReplayError(f"REKEY_INIT for epoch {m.epoch} does not follow epoch {a.epoch}")
        mac_i, _ = schedule.rekey_mac_keys(base, m.epoch)
        if not constant_time_equal(hmac_sha384(mac_i, m.auth_input() + m.wc_tag), m.mac):
            raise AuthenticationError("REKEY_INIT chain MAC does not verify")
        if not a.remember(a.seen_nonces, sha384(raw)):
            raise ReplayError("REKEY_INIT seen before")
        if base is not a.chain:
            assert a.next is not None
            a.set_chain(a.next[0], a.next[1])
            a.updated_at = now
            if self._promote_if_pending(now):
                self._rekey_complete()
        if m.qkd_offered and self.params.qkd_policy is L.QkdPolicyId.OFF:
            raise _Fail(L.Alert.QKD_POLICY_MISMATCH, "QKD keys offered under qkd = off")
        if not m.qkd_offered and self.params.qkd_policy is L.QkdPolicyId.REQUIRED:
            raise _Fail(L.Alert.QKD_UNAVAILABLE, "rekey without QKD under qkd = required")
        if m.qkd_offered:
            if len(set(m.key_ids)) != len(m.key_ids):
                raise ReplayError("duplicate QKD key IDs in REKEY_INIT")
            for kid in m.key_ids:
                if not a.remember(a.used_key_ids, kid):
                    raise ReplayError("QKD key ID used before")
        self._rk_init, self._rk_init_frame, self._rk_base_chain = m, raw, base
        self._deadline = now + self.params.handshake_timeout
        if m.qkd_offered:
            self.rekey_phase = RekeyPhase.R_EXPECT_QKD_KEYS
            self._events.append(NeedQkdKeysById(tuple(key_id_str(k) for k in m.key_ids)))
        else:
            self._create_rekey_response(None, now)

    def _create_rekey_response(self, qkd: list[tuple[bytes, bytes]] | None, now: float) -> None:
        """RK4 create_rekey_response (after the one-time tag of REKEY_INIT verified)."""
        m = self._rk_init
        assert m is not None
        if qkd is not None:
            if [k for k, _ in qkd] != list(m.key_ids):
                raise LocalProtocolError("key source returned other key IDs")
            if not poly1305_verify(qkd[1][1][:32], m.auth_input(), m.wc_tag):
                raise AuthenticationError("REKEY_INIT one-time (Wegman-Carter) tag does not verify")
        used = qkd is not None
        ct, mlkem_ss = self.provider.encapsulate(self.kem_alg, m.kem_public)
        x_key = X25519PrivateKey(self.rng(32))
        x_ss = x_key.exchange(m.x25519_public)
        unsigned = RekeyResp(
            epoch=m.epoch,
            nonce=self.rng(L.NONCE_LEN),
            qkd_used=used,
            kem_ciphertext=ct,
            x25519_public=x_key.public_bytes(),
            wc_tag=b"",
            mac=b"",
        )
        x_key.wipe()
        tagged = sha384(self._rk_init_frame) + unsigned.auth_input()
        tag = poly1305_tag(qkd[2][1][:32], tagged) if qkd else bytes(L.WC_TAG_LEN)  # pad key 2
        _, mac_r = schedule.rekey_mac_keys(self._rk_base_chain, m.epoch)
        frame = dataclasses.replace(
            unsigned, wc_tag=tag, mac=hmac_sha384(mac_r, tagged + tag)
        ).encode()
        self._out += frame
        secret = schedule.rekey_secret(
            self._rk_base_chain, qkd[0][1] if qkd else None, mlkem_ss, x_ss
        )["R2"]
        th = sha384(self._rk_init_frame + frame)
        keys = schedule.epoch_keys(secret, th)
        p = self.params
        # RK7: new keys wait in `next` until the first record of the new epoch arrives.
        for st in (self._send_next, self._recv_next):
            if st is not None:
                st.wipe()
        self._send_next = SendState(m.epoch, keys.key_r2i, keys.iv_r2i, p.max_records, p.max_bytes)
        self._recv_next = RecvState(m.epoch, keys.key_i2r, keys.iv_i2r, p.max_records, p.max_bytes)
        self._next_th = th
        self._qkd_used = used
        self._next_chain = (m.epoch, keys.chain)
        self.assoc.next = self._next_chain
        self.rekey_phase = RekeyPhase.IDLE
        self._rk_init = None
        self._rk_base_chain = b""
        if self.state is State.R_EXPECT_INIT:
            self.resumed = True
            self.state = State.R_EXPECT_EPOCH_CONFIRM
        else:
            self._deadline = None

    def _consume_rekey_response(self, m: RekeyResp, raw: bytes, now: float) -> None:
        """RK5 consume_rekey_response, then RK6 switch to the new epoch."""
        init = self._rk_init
        if init is None or self._kem_key is None or self._x_key is None:
            raise _Fail(L.Alert.UNEXPECTED_MESSAGE, "REKEY_RESP without REKEY_INIT")
        if m.epoch != init.epoch:
            raise ReplayError("REKEY_RESP for another epoch")
        tagged = sha384(self._rk_init_frame) + m.auth_input()
        _, mac_r = schedule.rekey_mac_keys(self._rk_base_chain, m.epoch)
        if not constant_time_equal(hmac_sha384(mac_r, tagged + m.wc_tag), m.mac):
            raise AuthenticationError("REKEY_RESP chain MAC does not verify")
        qkd = self._qkd
        if m.qkd_used and not init.qkd_offered:
            raise _Fail(
                L.Alert.QKD_POLICY_MISMATCH, "responder claims QKD keys that were not offered"
            )
        if init.qkd_offered and not m.qkd_used:
            if self.params.qkd_policy is L.QkdPolicyId.REQUIRED:
                raise _Fail(L.Alert.QKD_UNAVAILABLE, "responder had no QKD keys and qkd = required")
            self._events.append(
                Alarm("qkd_unavailable", "peer could not fetch the rekey's QKD keys")
            )
            qkd = None
        if qkd is not None and not poly1305_verify(qkd[2][1][:32], tagged, m.wc_tag):
            raise AuthenticationError("REKEY_RESP one-time (Wegman-Carter) tag does not verify")
        mlkem_ss = self.provider.decapsulate(self._kem_key, m.kem_ciphertext)
        x_ss = self._x_key.exchange(m.x25519_public)
        secret = schedule.rekey_secret(
            self._rk_base_chain, qkd[0][1] if qkd else None, mlkem_ss, x_ss
        )["R2"]
        th = sha384(self._rk_init_frame + raw)
        keys = schedule.epoch_keys(secret, th)
        self._qkd_used = qkd is not None
        self._install_epoch(m.epoch, keys, th, now)  # RK6: send under the new epoch from now on
        self.rekey_phase = RekeyPhase.IDLE
        self._deadline = None
        assert self._send is not None
        self._out += self._send.seal(L.ContentType.EPOCH_CONFIRM, b"")
        if self.state is State.I_EXPECT_REKEY_RESP:
            self._established(now, PeerIdentity(self.params.peer_name, "chain"), resumed=True)
        else:
            self._wipe_handshake()
            self._rekey_complete()

    def _rekey_complete(self) -> None:
        """The new epoch is in use on this side: alarm on a QKD mode change, count, report."""
        self._note_qkd_mode(self._qkd_used)
        self.stats["rekeys"] += 1
        self._events.append(RekeyComplete(self.epoch, self._qkd_used, self.transcript_hash))

    def _promote_if_pending(self, now: float) -> bool:
        """RK7: the initiator is on the new epoch: make `next` current (responder)."""
        if self._send_next is None or self._recv_next is None:
            return False
        for st in (self._send, self._recv_prev):
            if st is not None:
                st.wipe()
        self._recv_prev = None
        if self._recv is not None:
            self._recv.wipe()
        self._send, self._recv = self._send_next, self._recv_next
        self._send_next = self._recv_next = None
        self.epoch = self._send.epoch
        self.transcript_hash = self._next_th
        if self._next_chain is not None and self._next_chain[0] == self.epoch:
            self.assoc.set_chain(*self._next_chain)  # the chain this connection derived
        self._next_chain = None
        self.epoch_started = now
        self.assoc.updated_at = now
        return True

    # --- records ------------------------------------------------------------------------

    def _on_record(self, body: bytes, now: float) -> None:
        if self.state not in (State.ESTABLISHED, State.R_EXPECT_EPOCH_CONFIRM):
            raise _Fail(L.Alert.UNEXPECTED_MESSAGE, "record before the handshake completed")
        epoch, seq, ct = decode_record_header(body)
        try:
            ctype, data = self._open(epoch, seq, ct, now)
        except (AuthenticationError, ReplayError) as exc:
            self.stats["record_auth_failures"] += 1
            raise _Fail(L.Alert.RECORD_FAILURE, str(exc)) from exc
        self.stats["records_received"] += 1
        self.stats["bytes_received"] += len(data)
        self._on_content(ctype, data, now)

    def _open(self, epoch: int, seq: int, ct: bytes, now: float) -> tuple[L.ContentType, bytes]:
        if self._recv_next is not None and epoch == self._recv_next.epoch:
            result = self._recv_next.open(seq, ct)
            was_resume = self.state is State.R_EXPECT_EPOCH_CONFIRM
            self._promote_if_pending(now)
            if was_resume:
                self._established(now, PeerIdentity(self.params.peer_name, "chain"), resumed=True)
            else:
                self._rekey_complete()
            return result
        if self._recv is not None and epoch == self._recv.epoch:
            result = self._recv.open(seq, ct)
            if self._recv_prev is not None:  # peer is on the new epoch: old keys go
                self._recv_prev.wipe()
                self._recv_prev = None
            return result
        if self._recv_prev is not None and epoch == self._recv_prev.epoch:
            return self._recv_prev.open(seq, ct)
        raise ReplayError(f"record for unknown epoch {epoch}")

    def _on_content(self, ctype: L.ContentType, data: bytes, now: float) -> None:
        limit = self.params.max_message_bytes
        if ctype is L.ContentType.DATA:
            if self._reassembly is not None:
                raise _Fail(L.Alert.UNEXPECTED_MESSAGE, "whole message inside a fragmented one")
            self._events.append(MessageReceived(data))
        elif ctype is L.ContentType.DATA_FIRST:
            if self._reassembly is not None:
                raise _Fail(L.Alert.UNEXPECTED_MESSAGE, "fragment sequence restarted")
            self._reassembly = bytearray(data)
        elif ctype in (L.ContentType.DATA_MORE, L.ContentType.DATA_LAST):
            if self._reassembly is None:
                raise _Fail(L.Alert.UNEXPECTED_MESSAGE, "fragment without a first fragment")
            self._reassembly += data
            if len(self._reassembly) > limit:
                raise _Fail(L.Alert.TOO_LARGE, "reassembled message exceeds max_message_bytes")
            if ctype is L.ContentType.DATA_LAST:
                self._events.append(MessageReceived(bytes(self._reassembly)))
                self._reassembly = None
        elif ctype is L.ContentType.EPOCH_CONFIRM:
            if data:
                raise _Fail(L.Alert.DECODE_ERROR, "EPOCH_CONFIRM carries data")
        elif ctype is L.ContentType.CLOSE:
            code = data[0] if len(data) == 1 else L.Alert.CLOSE_NOTIFY
            try:
                alert = L.Alert(code)
            except ValueError:
                alert = L.Alert.CLOSE_NOTIFY
            self._finish(alert, "peer closed", by_peer=True)
        if self.params.role is Role.INITIATOR:
            self._maybe_budget_rekey(now)

    # --- timers and budgets -------------------------------------------------------------

    def _maybe_budget_rekey(self, now: float) -> None:
        if self.params.role is not Role.INITIATOR or self.state is not State.ESTABLISHED:
            return
        if self.rekey_phase is not RekeyPhase.IDLE or self._rk_next_retry is not None:
            return
        frac = L.REKEY_AT_FRACTION
        for st in (self._send, self._recv):
            if st is not None and (
                st.seq >= st.max_records * frac or st.bytes >= st.max_bytes * frac
            ):
                self._start_rekey(now)
                return

    def _on_timer(self, now: float) -> None:
        if self.state is State.CLOSED:
            return
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if self.rekey_phase is RekeyPhase.R_EXPECT_QKD_KEYS:
                raise _Fail(L.Alert.TIMEOUT, "QKD keys for the peer's rekey did not arrive in time")
            if self.state is State.ESTABLISHED and self.params.role is Role.INITIATOR:
                # a rekey exchange timed out: keep the current keys, try again shortly
                self._wipe_handshake()
                self.rekey_phase = RekeyPhase.IDLE
                self._rk_next_retry = now + L.REKEY_RETRY_SECONDS
                self._events.append(Alarm("rekey_failed", "rekey exchange timed out"))
            elif self.state is not State.ESTABLISHED:
                raise _Fail(L.Alert.TIMEOUT, f"handshake timed out in {self.state.name}")
        if self.state is not State.ESTABLISHED:
            return
        p = self.params
        if now >= self.epoch_started + p.rekey_interval * L.REJECT_AFTER_FACTOR:
            raise _Fail(L.Alert.KEYS_EXPIRED, "epoch too old; no rekey happened in time")
        if p.role is not Role.INITIATOR or self.rekey_phase is not RekeyPhase.IDLE:
            return
        retry_due = self._rk_next_retry is not None and now >= self._rk_next_retry
        if retry_due or (
            self._rk_next_retry is None and now >= self.epoch_started + p.rekey_interval
        ):
            self._start_rekey(now)

    def rekey_now(self, now: float) -> None:
        """Initiator: start a rekey immediately (operators, tests)."""
        if self.params.role is not Role.INITIATOR or self.state is not State.ESTABLISHED:
            raise LocalProtocolError("only an established initiator starts rekeys")
        if self.rekey_phase is RekeyPhase.IDLE:
            self._guard(now, self._start_rekey)

    @property
    def record_budget_left(self) -> int:
        return 0 if self._send is None else self._send.max_records - self._send.seq
