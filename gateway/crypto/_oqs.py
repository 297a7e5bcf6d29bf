"""ML-KEM / ML-DSA (and KEMs OpenSSL lacks) from liboqs-python. Optional: extra ``[oqs]``.

Never download, never build
---------------------------
``import oqs`` (liboqs-python, checked against 0.16.0.1) looks for the liboqs shared library
with ``ctypes.util.find_library`` and in ``$OQS_INSTALL_PATH/lib{,64}`` (default
``~/_oqs``); when it finds none it *clones liboqs from GitHub and builds it with cmake*, at
import time. It honours no environment variable that turns this off (``PYOQS_VERSION`` only
chooses which version it would fetch). We therefore never let it get there:

1. :func:`locate_liboqs` finds and ``dlopen``-checks the library ourselves, without running
   any subprocess (``find_library`` runs ``ldconfig``/``gcc``), in ``$OQS_INSTALL_PATH``,
   ``~/_oqs``, ``$LD_LIBRARY_PATH``, the ``ld.so.conf`` directories and the usual system
   directories. If there is none we raise :class:`ProviderUnavailable` and ``oqs`` is never
   imported.
2. When importing ``oqs`` we point ``OQS_INSTALL_PATH`` (for the duration of the import only)
   at a private directory whose ``lib/liboqs.so`` is a symlink to the library we found, so
   liboqs-python's own search cannot miss it.
3. Belt and braces: during that import an audit hook (``sys.addaudithook``) refuses every
   process start except the helpers ``find_library`` uses (ldconfig, gcc/cc, ld, objdump),
   and every socket connection or name lookup. A git clone or cmake run would raise, and we
   report ProviderUnavailable instead.

Seeds
-----
* ML-KEM keygen is deterministic from the 64-byte ``d || z`` when liboqs exposes
  ``OQS_KEM_keypair_derand`` (liboqs >= 0.13 with liboqs-python >= 0.14:
  ``KeyEncapsulation.generate_keypair_seed``). With an older liboqs, ``kem_keygen`` raises
  ProviderUnavailable rather than silently ignoring the seed (``seeded_kem_keygen`` tells).
* ML-DSA: liboqs-python exposes no seeded keygen. ``sig_keygen`` checks the seed length and
  then IGNORES the seed: the key comes from liboqs' own randomness (``seeded_sig_keygen`` is
  False). Cross-provider interop is about encapsulate/decapsulate and sign/verify, which do
  not depend on how a key was generated; long-term ML-DSA keys come from PEM files anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from gateway.crypto import (
    CORE_KEMS,
    KEM_SEED_LEN,
    KEM_SIZES,
    KEM_SS_LENS,
    SIG_SEED_LEN,
    SIG_SIZES,
    KemAlg,
    KemPrivateKey,
    SigAlg,
    SigPrivateKey,
)
from gateway.errors import AuthenticationError, CryptoError, ProviderUnavailable

INSTALL_HINT = (
    "install liboqs (build it from a release tarball with cmake -DBUILD_SHARED_LIBS=ON, "
    "or a distribution package where one exists; set OQS_INSTALL_PATH to its prefix if it "
    "is not in a standard library directory) and `pip install qgw[oqs]`"
)
PIP_HINT = "the liboqs-python module `oqs` is not installed: `pip install qgw[oqs]`"

# No hand list of extra algorithms: :meth:`OqsProvider.kem_algorithms` and
# :meth:`OqsProvider.sig_algorithms` report what *this* liboqs build enables
# (``oqs.get_enabled_kem_mechanisms()``), under liboqs' own names (``HQC-1/3/5`` since 0.15,
# ``FrodoKEM-976-AES``, ``SLH_DSA_PURE_SHA2_128S``...).

# Search switches; tests turn the system search off to simulate a machine without liboqs.
SEARCH_SYSTEM_DIRS = True
_SYSTEM_DIRS: tuple[str, ...] = (
    "/usr/local/lib",
    "/usr/local/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
)
_LIB_NAMES = ("liboqs.so",)  # the unversioned name is what liboqs-python itself loads

# find_library() helpers that may run while liboqs-python imports; nothing else may.
_ALLOWED_HELPERS = frozenset({"ldconfig", "ldconfig.real", "gcc", "cc", "ld", "objdump"})
_BLOCKED_EVENTS = frozenset(
    {
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "socket.connect",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "urllib.Request",
    }
)


class ForbiddenDuringImport(RuntimeError):
    """Raised by the audit hook when importing liboqs-python tries to run or fetch something."""


_guard = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if not getattr(_guard, "active", False):
        return
    if event == "subprocess.Popen":
        executable, argv = args[0], args[1]
        prog = executable if executable else (argv[0] if isinstance(argv, list | tuple) else argv)
        name = os.path.basename(os.fsdecode(prog)) if prog else ""
        if name in _ALLOWED_HELPERS:
            return
        raise ForbiddenDuringImport(f"importing liboqs-python tried to run {name!r}")
    if event in _BLOCKED_EVENTS:
        raise ForbiddenDuringImport(f"importing liboqs-python tried {event}")


def _install_hook() -> None:
    global _hook_installed  # noqa: PLW0603  (one process-wide hook, installed once)
    with _hook_lock:
        if not _hook_installed:
            sys.addaudithook(_audit_hook)
            _hook_installed = True


@contextlib.contextmanager
def _no_fetch_no_build() -> Iterator[None]:
    _install_hook()
    _guard.active = True
    try:
        yield
    finally:
        _guard.active = False


# --- locating the shared library -----------------------------------------------------------


def _ld_so_conf_dirs(conf: Path = Path("/etc/ld.so.conf"), depth: int = 0) -> list[str]:
    """Directories listed in ld.so.conf (and its ``include`` globs); parsed, not executed."""
    out: list[str] = []
    if depth > 3:
        return out
    try:
        lines = conf.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include"):
            pattern = line.split(None, 1)[1] if " " in line else ""
            base = Path(pattern) if pattern.startswith("/") else conf.parent / pattern
            for inc in sorted(base.parent.glob(base.name)):
                out += _ld_so_conf_dirs(inc, depth + 1)
        elif line.startswith("/"):
            out.append(line)
    return out


def _search_dirs() -> list[Path]:
    dirs: list[Path] = []
    prefix = os.environ.get("OQS_INSTALL_PATH")
    for base in ([Path(prefix)] if prefix else []) + [Path.home() / "_oqs"]:
        dirs += [base / "lib", base / "lib64"]
    if SEARCH_SYSTEM_DIRS:
        dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        dirs += [Path(p) for p in _ld_so_conf_dirs()]
        dirs += [Path(p) for p in _SYSTEM_DIRS]
        multiarch = f"{os.uname().machine}-linux-gnu" if hasattr(os, "uname") else ""
        if multiarch:
            dirs += [Path("/usr/lib") / multiarch, Path("/lib") / multiarch]
    seen: set[Path] = set()
    unique = []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def _loads(path: Path) -> bool:
    """True if ``path`` is a loadable liboqs (dlopen; runs no process)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return False
    return hasattr(lib, "OQS_KEM_new") and hasattr(lib, "OQS_SIG_new")


def locate_liboqs() -> Path:
    """Return the path of a loadable liboqs shared library, or raise ProviderUnavailable.

    Runs no subprocess and touches no network: only ``stat`` and ``dlopen``.
    """
    searched = _search_dirs()
    for d in searched:
        for name in _LIB_NAMES:
            candidate = d / name
            if candidate.exists() and _loads(candidate):
                return candidate.resolve()
        # A library installed without the unversioned dev symlink (liboqs.so.N only).
        with contextlib.suppress(OSError):
            for candidate in sorted(d.glob("liboqs.so.*")):
                if _loads(candidate):
                    return candidate.resolve()
    raise ProviderUnavailable(
        f"liboqs shared library not found (searched {len(searched)} directories, "
        f"e.g. {', '.join(str(d) for d in searched[:3])}); {INSTALL_HINT}"
    )


class _QuietInfo(logging.Filter):
    """liboqs-python logs INFO lines to stdout at import; keep warnings and above only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _import_oqs(lib: Path) -> ModuleType:
    if "oqs" in sys.modules:
        return sys.modules["oqs"]
    if importlib.util.find_spec("oqs") is None:
        raise ProviderUnavailable(PIP_HINT)
    logging.getLogger("oqs.oqs").addFilter(_QuietInfo())
    saved = os.environ.get("OQS_INSTALL_PATH")
    with tempfile.TemporaryDirectory(prefix="qgw-oqs-") as tmp:
        (Path(tmp) / "lib").mkdir()
        (Path(tmp) / "lib" / "liboqs.so").symlink_to(lib)
        os.environ["OQS_INSTALL_PATH"] = tmp
        try:
            with _no_fetch_no_build():
                return importlib.import_module("oqs")
        except (Exception, SystemExit) as exc:  # liboqs-python exits on load failure
            sys.modules.pop("oqs", None)
            sys.modules.pop("oqs.oqs", None)
            raise ProviderUnavailable(f"liboqs-python could not load {lib}: {exc}") from exc
        finally:
            if saved is None:
                os.environ.pop("OQS_INSTALL_PATH", None)
            else:
                os.environ["OQS_INSTALL_PATH"] = saved


def load_oqs() -> ModuleType:
    """Locate liboqs, then import liboqs-python safely. Raises ProviderUnavailable."""
    if "oqs" in sys.modules:
        return sys.modules["oqs"]
    return _import_oqs(locate_liboqs())


# --- keys --------------------------------------------------------------------------------


class _OqsKemKey:
    """A decapsulation key inside a liboqs ``KeyEncapsulation`` object (freed on wipe/GC)."""

    __slots__ = ("__weakref__", "_fin", "_kem", "_public", "alg")

    def __init__(self, alg: KemAlg, kem: Any, public: bytes) -> None:
        self.alg = alg
        self._kem = kem
        self._public = public
        self._fin = weakref.finalize(self, kem.free)

    def public_bytes(self) -> bytes:
        return self._public

    def wipe(self) -> None:
        self._fin()  # OQS_MEM_cleanse + OQS_KEM_free, once

    def __repr__(self) -> str:
        return "<secret>"


class OqsExtraKemKey(_OqsKemKey):
    """A key for a KEM outside the KemAlg menu (FrodoKEM, HQC, Classic McEliece...)."""

    __slots__ = ("name",)

    def __init__(self, name: str, kem: Any, public: bytes) -> None:
        super().__init__(KemAlg.MLKEM768, kem, public)  # alg unused for extras
        self.name = name


class _OqsSigKey:
    __slots__ = ("__weakref__", "_fin", "_public", "_sig", "alg")

    def __init__(self, alg: SigAlg, sig: Any, public: bytes) -> None:
        self.alg = alg
        self._sig = sig
        self._public = public
        self._fin = weakref.finalize(self, sig.free)

    def public_bytes(self) -> bytes:
        return self._public

    def wipe(self) -> None:
        self._fin()

    def __repr__(self) -> str:
        return "<secret>"


class OqsProvider:
    """Provider backed by liboqs-python. Construction raises ProviderUnavailable, quickly and
    without network or subprocess, when liboqs or liboqs-python is missing."""

    name = "oqs"

    def __init__(self) -> None:
        self._oqs = load_oqs()
        enabled_kems = set(self._oqs.get_enabled_kem_mechanisms())
        enabled_sigs = set(self._oqs.get_enabled_sig_mechanisms())
        missing = [a.value for a in sorted(CORE_KEMS) if a.value not in enabled_kems]
        missing += [a.value for a in SigAlg if a.value not in enabled_sigs]
        if missing:
            raise ProviderUnavailable(
                f"this liboqs lacks {', '.join(missing)} (needs liboqs >= 0.12); {INSTALL_HINT}"
            )
        self._enabled_kems = frozenset(enabled_kems)
        self._enabled_sigs = frozenset(enabled_sigs)
        probe = self._oqs.KeyEncapsulation(KemAlg.MLKEM768.value)
        try:
            self.seeded_kem_keygen: bool = (
                hasattr(probe, "generate_keypair_seed")
                and int(getattr(probe, "length_keypair_seed", 0)) == KEM_SEED_LEN
            )
        finally:
            probe.free()
        self.seeded_sig_keygen: bool = False  # liboqs-python has no seeded ML-DSA keygen
        self._has_ctx = hasattr(self._oqs.Signature, "sign_with_ctx_str")

    # -- KEM --------------------------------------------------------------------------------

    def kem_algorithms(self) -> frozenset[str]:
        """Every KEM this liboqs build enables, discovered at run time, under liboqs' names."""
        return self._enabled_kems

    def sig_algorithms(self) -> frozenset[str]:
        """Every signature scheme this liboqs build enables (discovered at run time)."""
        return self._enabled_sigs

    def kem_keygen(self, alg: KemAlg, seed: bytes) -> KemPrivateKey:
        if len(seed) != KEM_SEED_LEN:
            raise CryptoError("KEM seed must be 64 bytes")
        if alg not in CORE_KEMS:
            return self._random_kem_keygen(alg)
        if not self.seeded_kem_keygen:
            raise ProviderUnavailable(
                "this liboqs has no seeded ML-KEM keygen (needs liboqs >= 0.13, "
                "liboqs-python >= 0.14)"
            )
        kem = self._oqs.KeyEncapsulation(alg.value)
        try:
            public = bytes(kem.generate_keypair_seed(seed))
        except (RuntimeError, ValueError) as exc:
            kem.free()
            raise CryptoError(f"{alg} keygen failed") from exc
        return _OqsKemKey(alg, kem, public)

    def _random_kem_keygen(self, alg: KemAlg) -> KemPrivateKey:
        """FrodoKEM: liboqs 0.16 has no derandomised keygen for it (``length_keypair_seed``
        is 0), so the key comes from liboqs' randomness and the caller's seed is IGNORED
        (length-checked only), as for ML-DSA. Only this side ever holds the private key."""
        if alg.value not in self._enabled_kems:
            raise ProviderUnavailable(f"this liboqs build does not enable {alg}")
        kem = self._oqs.KeyEncapsulation(alg.value)
        try:
            public = bytes(kem.generate_keypair())
        except (RuntimeError, ValueError) as exc:
            kem.free()
            raise CryptoError(f"{alg} keygen failed") from exc
        return _OqsKemKey(alg, kem, public)

    def encapsulate(self, alg: KemAlg, public: bytes) -> tuple[bytes, bytes]:
        if alg.value not in self._enabled_kems:
            raise ProviderUnavailable(f"this liboqs build does not enable {alg}")
        if len(public) != KEM_SIZES[alg][0]:
            raise AuthenticationError(f"{alg} encapsulation key has the wrong length")
        ct, shared = self._encaps(alg.value, public, f"{alg} encapsulation key is malformed")
        if len(ct) != KEM_SIZES[alg][1] or len(shared) != KEM_SS_LENS[alg]:
            raise CryptoError(f"{alg}: this liboqs build has unexpected sizes")
        return ct, shared

    def decapsulate(self, key: KemPrivateKey, ciphertext: bytes) -> bytes:
        if not isinstance(key, _OqsKemKey) or isinstance(key, OqsExtraKemKey):
            raise CryptoError("key does not belong to the oqs provider")
        if len(ciphertext) != KEM_SIZES[key.alg][1]:
            raise AuthenticationError(f"{key.alg} ciphertext has the wrong length")
        return self._decaps(key, ciphertext, f"{key.alg} ciphertext is malformed")

    def _encaps(self, name: str, public: bytes, what: str) -> tuple[bytes, bytes]:
        with self._oqs.KeyEncapsulation(name) as kem:
            try:
                ct, shared = kem.encap_secret(public)
            except (RuntimeError, ValueError) as exc:  # input check of FIPS 203 7.2 failed
                raise AuthenticationError(what) from exc
        if not isinstance(ct, bytes) or not isinstance(shared, bytes):  # liboqs-python < 0.12
            raise AuthenticationError(what)
        return ct, shared

    def _decaps(self, key: _OqsKemKey, ciphertext: bytes, what: str) -> bytes:
        if not key._fin.alive:
            raise CryptoError("KEM key was wiped")
        try:
            shared = key._kem.decap_secret(ciphertext)
        except (RuntimeError, ValueError) as exc:
            raise AuthenticationError(what) from exc
        if not isinstance(shared, bytes):
            raise AuthenticationError(what)
        return shared

    # Extra KEMs outside KemAlg (HQC, Classic McEliece...: experiments and benchmarks).

    def extra_kem_keygen(self, name: str) -> OqsExtraKemKey:
        """Random keygen for a KEM in :meth:`kem_algorithms` outside KemAlg."""
        if name not in self.kem_algorithms() or name in {a.value for a in KemAlg}:
            raise ProviderUnavailable(f"KEM {name!r} is not an extra KEM of this liboqs")
        kem = self._oqs.KeyEncapsulation(name)
        return OqsExtraKemKey(name, kem, bytes(kem.generate_keypair()))

    def extra_encapsulate(self, name: str, public: bytes) -> tuple[bytes, bytes]:
        if name not in self.kem_algorithms():
            raise ProviderUnavailable(f"KEM {name!r} is not available")
        with self._oqs.KeyEncapsulation(name) as kem:
            if len(public) != int(kem.details["length_public_key"]):
                raise AuthenticationError(f"{name} public key has the wrong length")
        return self._encaps(name, public, f"{name} public key is malformed")

    def extra_decapsulate(self, key: OqsExtraKemKey, ciphertext: bytes) -> bytes:
        if len(ciphertext) != int(key._kem.details["length_ciphertext"]):
            raise AuthenticationError(f"{key.name} ciphertext has the wrong length")
        return self._decaps(key, ciphertext, f"{key.name} ciphertext is malformed")

    # -- signatures ---------------------------------------------------------------------------

    def sig_keygen(self, alg: SigAlg, seed: bytes) -> SigPrivateKey:
        """ML-DSA keygen from liboqs' randomness; ``seed`` is length-checked and IGNORED."""
        if len(seed) != SIG_SEED_LEN:
            raise CryptoError("ML-DSA seed must be 32 bytes")
        sig = self._oqs.Signature(alg.value)
        try:
            public = bytes(sig.generate_keypair())
        except RuntimeError as exc:
            sig.free()
            raise CryptoError(f"{alg} keygen failed") from exc
        return _OqsSigKey(alg, sig, public)

    def sign(self, key: SigPrivateKey, message: bytes, context: bytes) -> bytes:
        if not isinstance(key, _OqsSigKey):
            # A long-term key from a PEM file (x509.load_signing_key) is held by pyca:
            # liboqs-python can import neither a FIPS 204 seed nor OpenSSL's PKCS#8 form.
            # Pure ML-DSA signatures are the same whoever computes them (FIPS 204; tested
            # across providers), so this one place signs with whichever provider holds it.
            return _sign_with_holder(key, message, context)
        if not key._fin.alive:
            raise CryptoError("signing key was wiped")
        if len(context) > 255:
            raise CryptoError("ML-DSA context must be at most 255 bytes")
        if not self._has_ctx and context:
            raise ProviderUnavailable("this liboqs-python cannot sign with a context string")
        try:
            if self._has_ctx:
                signature = key._sig.sign_with_ctx_str(message, context)
            else:
                signature = key._sig.sign(message)
        except RuntimeError as exc:
            raise CryptoError(f"{key.alg} signing failed") from exc
        return bytes(signature)

    def verify(
        self, alg: SigAlg, public: bytes, message: bytes, signature: bytes, context: bytes
    ) -> bool:
        if len(public) != SIG_SIZES[alg][0] or len(signature) != SIG_SIZES[alg][1]:
            return False
        if len(context) > 255:
            return False
        with self._oqs.Signature(alg.value) as sig:
            try:
                if self._has_ctx:
                    return bool(sig.verify_with_ctx_str(message, signature, context, public))
                return not context and bool(sig.verify(message, signature, public))
            except (RuntimeError, ValueError):
                return False


def _sign_with_holder(key: SigPrivateKey, message: bytes, context: bytes) -> bytes:
    from gateway.crypto._pyca import PycaProvider  # noqa: PLC0415 -- only for PEM-loaded keys

    return PycaProvider().sign(key, message, context)
