"""Every constant and KDF label of the wire protocol, in one place (docs/protocol.md §2, §4).

All labels are rooted in one protocol string; HKDF ``info`` is built by
:func:`gateway.core.schedule.hkdf_label` as ``u16(L) || u8(len) || "qgw1 " + label || u8(len) || context``
(TLS 1.3 ``HkdfLabel`` shape, RFC 8446 §7.1).
"""

from __future__ import annotations

from enum import IntEnum

PROTOCOL = b"qgw/1 ML-KEM+X25519+QKD HKDF-SHA384 AES-256-GCM"
LABEL_PREFIX = b"qgw1 "
VERSION = 1

# --- sizes (bytes) ---
NONCE_LEN = 32
KEY_ID_LEN = 16  # a UUID in binary
QKD_IKM_LEN = 32  # QKD key bytes entering the schedule (fixed length)
PSK_LEN = 32
ADMISSION_LEN = 32
FINISHED_LEN = 48  # HMAC-SHA384
REKEY_MAC_LEN = 48
CHAIN_LEN = 48  # chain key chain_e (SHA-384 hash length, §4)
WC_TAG_LEN = 16  # Poly1305
REKEY_QKD_KEYS = 3  # [0] schedule input, [1] pad for REKEY_INIT, [2] pad for REKEY_RESP
BOOTSTRAP_QKD_KEYS = 1
FRAME_HEADER_LEN = 5  # u32 length || u8 type
RECORD_HEADER_LEN = FRAME_HEADER_LEN + 4 + 8  # + epoch u32 + seq u64
MAX_FRAME_LEN = 256 * 1024  # largest frame body accepted (certificates included)
MAX_RECORD_PLAINTEXT = 60 * 1024  # fragment size of application data
MAX_NAME_LEN = 63

# --- timing (seconds) ---
REKEY_AFTER_SECONDS = 120.0  # WireGuard REKEY_AFTER_TIME, Rosenpass key renewal
REKEY_RETRY_SECONDS = 5.0  # QKD key missing at rekey time: try again after this
HANDSHAKE_TIMEOUT_SECONDS = 15.0  # one bootstrap or rekey exchange
REJECT_AFTER_FACTOR = 3.0  # an epoch older than 3 x interval is refused (fail closed)
REKEY_AT_FRACTION = 0.75  # rekey when 3/4 of the record or byte budget is used

# --- admission (bootstrap DoS limits, per association) ---
BOOTSTRAP_BURST = 5
BOOTSTRAP_PER_SECOND = 0.5
REPLAY_CACHE_SIZE = 4096
# A global budget over all source addresses on the bootstrap INITs that cost a dec_keys call and
# an ML-DSA signature without being authenticated (pki mode): 250 addresses cost no more than this.
GLOBAL_BOOTSTRAP_BURST = 10
GLOBAL_BOOTSTRAP_PER_SECOND = 2.0

# --- pre-handshake admission (docs/protocol.md §3.5) ---
COOKIE_LEN = 32  # CHALLENGE cookie: fresh random per TCP connection
HELLO_NONCE_LEN = 32  # HELLO n_hello: the initiator's fresh random per connection (ADMIT freshness)
ADMISSION_PROOF_LEN = 32  # HELLO / ADMIT proof: HMAC-SHA384 truncated to 32 bytes


class FrameType(IntEnum):
    INIT = 0x01
    RESP = 0x02
    CONFIRM = 0x03
    REKEY_INIT = 0x04
    REKEY_RESP = 0x05
    CHALLENGE = 0x06  # R -> I, first frame of every connection (§3.5, AD1)
    HELLO = 0x07  # I -> R (AD2)
    ADMIT = 0x08  # R -> I (AD4)
    RECORD = 0x10
    ALERT = 0x30


class HelloKind(IntEnum):
    """What the initiator wants to do on this connection (HELLO, §3.5)."""

    BOOTSTRAP = 0x00
    RESUME = 0x01


class ContentType(IntEnum):
    """First byte of a record's plaintext."""

    DATA = 0x01  # a whole application message
    DATA_FIRST = 0x02  # first fragment of a larger message
    DATA_MORE = 0x03  # middle fragment
    DATA_LAST = 0x04  # last fragment
    EPOCH_CONFIRM = 0x05  # empty; first record under a new epoch (confirms the rekey)
    CLOSE = 0x06  # authenticated close: u8 alert code


class SuiteId(IntEnum):
    MLKEM768_X25519_AES256GCM_SHA384 = 0x01
    MLKEM1024_X25519_AES256GCM_SHA384 = 0x02
    FRODOKEM976AES_X25519_AES256GCM_SHA384 = 0x03  # needs crypto.provider = "oqs"


class AuthModeId(IntEnum):
    PKI = 0x01
    PSK = 0x02
    WOT = 0x03  # web of trust: ML-DSA key endorsed by configured introducers (§3.6)


class QkdPolicyId(IntEnum):
    OFF = 0x00
    PREFERRED = 0x01
    REQUIRED = 0x02


class Alert(IntEnum):
    CLOSE_NOTIFY = 0
    DECODE_ERROR = 1
    UNSUPPORTED_VERSION = 2
    SUITE_MISMATCH = 3
    AUTH_MODE_MISMATCH = 4
    QKD_POLICY_MISMATCH = 5
    QKD_UNAVAILABLE = 6
    ADMISSION_FAILED = 7
    REPLAY = 8
    BAD_CERTIFICATE = 9
    WRONG_IDENTITY = 10
    AUTHENTICATION_FAILED = 11
    UNEXPECTED_MESSAGE = 12
    RECORD_FAILURE = 13
    BUDGET_EXHAUSTED = 14
    KEYS_EXPIRED = 15
    NO_SESSION = 16
    RATE_LIMITED = 17
    TIMEOUT = 18
    INTERNAL_ERROR = 19
    TOO_LARGE = 20
    INSUFFICIENT_TRUST = 21  # wot: fewer endorsements than the local policy needs


# --- KDF labels (docs/protocol.md §4); context in brackets ---
L_DERIVED = b"derived"  # chaining between Extract steps
L_ADMISSION_PSK = b"init admission"  # psk mode: key of INIT's admission MAC
L_ADMISSION_MAC1 = (
    b"qgw1 mac1"  # pki and wot modes: hashed with the responder name -> admission key
)
L_PSK_AUTH_R = b"r psk auth"  # [TH2]
L_PSK_AUTH_I = b"i psk auth"  # [TH3a]
L_FINISHED_R = b"r finished"  # [TH2s]
L_FINISHED_I = b"i finished"  # [TH3s]
L_MASTER = b"master"  # [TH3] / [TH_rk]
L_KEY_I2R = b"i2r key"
L_IV_I2R = b"i2r iv"
L_KEY_R2I = b"r2i key"
L_IV_R2I = b"r2i iv"
L_CHAIN = b"chain"
L_REKEY_MAC_I = b"rekey i mac"  # [u32 new epoch]
L_REKEY_MAC_R = b"rekey r mac"  # [u32 new epoch]
L_HELLO_RESUME = b"resume hello"  # [u32 epoch]: key of a resuming HELLO's proof (chain MAC)
L_ADMIT_RESUME = b"resume admit"  # [u32 epoch]: key of the responder's ADMIT proof
L_HELLO_PSK = b"bootstrap hello"  # psk mode, from S0: key of a bootstrap HELLO's proof
L_ADMIT_PSK = b"bootstrap admit"  # psk mode, from S0: key of the ADMIT proof
SIG_CONTEXT = b"qgw/1 handshake"  # FIPS 204 ctx string for ML-DSA signatures
SIG_ROLE_R = b"qgw/1 responder signs TH2"
SIG_ROLE_I = b"qgw/1 initiator signs TH3a"
