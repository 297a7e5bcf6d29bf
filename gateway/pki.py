"""``qgw pki``: the gateway PKI (ML-DSA site CA, gateway certificates) and PSK files.

::

    qgw pki init-ca --out DIR [--name NAME] [--days N] [--force]
        ML-DSA-87 site CA -> DIR/ca.crt (0644), DIR/ca.key (0600)
    qgw pki issue --ca-dir DIR --name NAME --out DIR [--alg ML-DSA-65] [--days N] [--force]
        gateway certificate for DNS name NAME -> DIR/NAME.crt (0644), DIR/NAME.key (0600)
    qgw pki psk --out FILE
        32 random bytes, created 0600 and never over an existing file; never printed

Every file is written atomically: a temporary file in the same directory (O_EXCL, final
mode from the start), fsync, then ``link`` (refuses an existing name) or, with ``--force``,
``rename`` over it. A reader never sees a half-written key, and a key is never readable by
group or others, not even for a moment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from gateway.crypto import SigAlg
from gateway.crypto import x509 as gx509
from gateway.errors import ConfigError, CryptoError

PSK_LEN = 32  # bytes; the protocol's PSK length
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
DEMO_PKI_DIR = "gw-pki"
DEFAULT_CA_NAME = "qgw site CA"


def write_file_atomic(
    path: Path, data: bytes, mode: int, *, overwrite: bool = False, hint: str = " (use --force)"
) -> None:
    """Write ``data`` to ``path`` atomically with ``mode`` from the first byte on.

    Without ``overwrite`` an existing ``path`` is refused (ConfigError), race-free.
    """
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([(str(directory), f"cannot create directory: {exc.strerror}")]) from exc
    refusal = f"already exists; refusing to overwrite{hint}"
    if not overwrite and path.exists():
        raise ConfigError([(str(path), refusal)])
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot write: {exc.strerror}")]) from exc
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want (never added any)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: no clobbering
            except FileExistsError as exc:
                raise ConfigError([(str(path), refusal)]) from exc
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot write: {exc.strerror}")]) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the new directory entry durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError([(str(path), f"{what} not found")]) from exc
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read {what}: {exc.strerror}")]) from exc


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Check every target first, so that a refusal leaves nothing half-written."""
    if force:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        raise ConfigError(
            [(str(p), "already exists; refusing to overwrite (use --force)") for p in existing]
        )


def init_ca(
    out: Path, name: str = DEFAULT_CA_NAME, days: int = 3650, *, force: bool = False
) -> tuple[Path, Path]:
    """Create an ML-DSA-87 CA in ``out``: returns (ca.crt path, ca.key path)."""
    cert_path, key_path = Path(out) / CA_CERT, Path(out) / CA_KEY
    _refuse_existing([cert_path, key_path], force)
    cert, key = gx509.create_ca(name, SigAlg.MLDSA87, days)
    write_file_atomic(key_path, key, SECRET_MODE, overwrite=force)
    write_file_atomic(cert_path, cert, PUBLIC_MODE, overwrite=force)
    return cert_path, key_path


def issue(
    ca_dir: Path,
    name: str,
    out: Path,
    alg: SigAlg = SigAlg.MLDSA65,
    days: int = 365,
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue a gateway certificate for ``name`` with the CA in ``ca_dir``: (NAME.crt, NAME.key)."""
    try:
        gx509.check_name(name)
    except CryptoError as exc:
        raise ConfigError([("--name", str(exc))]) from exc
    ca_cert = _read(Path(ca_dir) / CA_CERT, "CA certificate")
    ca_key = _read(Path(ca_dir) / CA_KEY, "CA private key")
    cert_path, key_path = Path(out) / f"{name}.crt", Path(out) / f"{name}.key"
    _refuse_existing([cert_path, key_path], force)
    cert, key = gx509.issue_cert(ca_cert, ca_key, name, alg, days)
    write_file_atomic(key_path, key, SECRET_MODE, overwrite=force)
    write_file_atomic(cert_path, cert, PUBLIC_MODE, overwrite=force)
    return cert_path, key_path


def new_psk(out: Path) -> Path:
    """Write a fresh 32-byte PSK to ``out`` (0600); an existing file is never replaced."""
    write_file_atomic(Path(out), secrets.token_bytes(PSK_LEN), SECRET_MODE, hint="")
    return Path(out)


def write_gateway_pki(dir: Path, names: list[str], *, force: bool = False) -> None:  # noqa: A002
    """Write ``dir/gw-pki/{ca.crt,ca.key,<name>.crt,<name>.key}`` for each gateway name.

    Used by ``qgw init-demo``: one ML-DSA-87 demo CA and an ML-DSA-65 certificate per name.
    """
    if not names or len(set(names)) != len(names):
        raise ConfigError([("names", "need one or more distinct gateway names")])
    for n in names:
        try:
            gx509.check_name(n)
        except CryptoError as exc:
            raise ConfigError([("names", str(exc))]) from exc
    pki_dir = Path(dir) / DEMO_PKI_DIR
    targets = [pki_dir / CA_CERT, pki_dir / CA_KEY]
    targets += [pki_dir / f"{n}.{ext}" for n in names for ext in ("crt", "key")]
    _refuse_existing(targets, force)
    try:
        pki_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError([(str(pki_dir), f"cannot create directory: {exc.strerror}")]) from exc
    init_ca(pki_dir, "qgw demo CA", force=force)
    for n in names:
        issue(pki_dir, n, pki_dir, force=force)


# --- command line -------------------------------------------------------------------------


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not 1 <= value <= 36500:
        raise argparse.ArgumentTypeError("days must be between 1 and 36500")
    return value


def cmd_init_ca(args: argparse.Namespace) -> int:
    cert, key = init_ca(args.out, args.name, args.days, force=args.force)
    print(f"wrote {cert} (ML-DSA-87 CA certificate)")
    print(f"wrote {key} (CA private key, mode 0600: keep it offline)")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    cert, key = issue(
        args.ca_dir, args.name, args.out, SigAlg(args.alg), args.days, force=args.force
    )
    print(f"wrote {cert} ({args.alg} certificate for {args.name})")
    print(f"wrote {key} (private key, mode 0600)")
    return 0


def cmd_psk(args: argparse.Namespace) -> int:
    path = new_psk(args.out)
    print(f"wrote {path} ({PSK_LEN}-byte pre-shared key, mode 0600; copy it to the peer securely)")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``qgw pki ...`` to the CLI (called from gateway.cli)."""
    p = sub.add_parser(
        "pki",
        help="gateway PKI: ML-DSA site CA, gateway certificates, PSK files",
        description="Create the bootstrap credentials: an ML-DSA-87 site CA, ML-DSA gateway "
        "certificates (the gateway's name in the SAN), or a pre-shared key file.",
    )
    psub = p.add_subparsers(dest="pki_command", metavar="PKI_COMMAND", required=True)

    c = psub.add_parser("init-ca", help="create an ML-DSA-87 CA: DIR/ca.crt, DIR/ca.key (0600)")
    c.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    c.add_argument("--name", default=DEFAULT_CA_NAME, help="CA common name")
    c.add_argument("--days", type=_days, default=3650, help="validity in days (default 3650)")
    c.add_argument("--force", action="store_true", help="overwrite existing files")
    c.set_defaults(handler=cmd_init_ca)

    i = psub.add_parser("issue", help="issue a gateway certificate: DIR/NAME.crt, DIR/NAME.key")
    i.add_argument("--ca-dir", type=Path, required=True, metavar="DIR", help="holds ca.crt, ca.key")
    i.add_argument(
        "--name", required=True, help="gateway DNS name (SAN); the peer's auth.peer_name"
    )
    i.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    i.add_argument(
        "--alg",
        choices=[a.value for a in SigAlg],
        default=SigAlg.MLDSA65.value,
        help="ML-DSA parameter set of the gateway key (default ML-DSA-65)",
    )
    i.add_argument("--days", type=_days, default=365, help="validity in days (default 365)")
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.set_defaults(handler=cmd_issue)

    k = psub.add_parser("psk", help="create a 32-byte pre-shared key file (0600)")
    k.add_argument("--out", type=Path, required=True, metavar="FILE", help="PSK file to create")
    k.set_defaults(handler=cmd_psk)
