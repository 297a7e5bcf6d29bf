"""``qgw wot``: web-of-trust credentials (auth mode ``wot``, README "Web of trust").

    qgw wot init-introducer --out DIR [--name NAME]    DIR/introducer.crt, DIR/introducer.key (0600)
    qgw wot keygen --out DIR --name NAME               DIR/NAME.key (0600), DIR/NAME.pub
    qgw wot endorse --introducer DIR --name NAME --key PUB [--days N] [--out FILE]
    qgw wot show FILE [--config CONFIG] [--name NAME]  who vouches, validity, policy verdict

An endorsement is an X.509 certificate the introducer issues for the gateway's ML-DSA public key
(see ``gateway.crypto.wot``). A gateway's ``auth.endorsements`` file is the concatenation of the
endorsements it collected (``cat a.pem b.pem > site-a.endorsements.pem``), at most four.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from gateway.crypto import SigAlg, wot, x509
from gateway.errors import AuthenticationError, ConfigError, CryptoError
from gateway.pki import PUBLIC_MODE, SECRET_MODE, _days, _read, _refuse_existing, write_file_atomic

DEMO_WOT_DIR = "wot"
# qgw init-demo --auth wot: one full and three marginal introducers (GnuPG's default policy
# is then met by the full one alone, or by the three marginal ones together).
DEMO_INTRODUCERS = (
    ("full-1", wot.Trust.FULL),
    ("marginal-1", wot.Trust.MARGINAL),
    ("marginal-2", wot.Trust.MARGINAL),
    ("marginal-3", wot.Trust.MARGINAL),
)


def _crypto(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except CryptoError as exc:
        raise ConfigError([(what, str(exc))]) from None


def init_introducer(
    out: Path, name: str, days: int = 3650, *, force: bool = False
) -> tuple[Path, Path]:
    cert_path, key_path = Path(out) / "introducer.crt", Path(out) / "introducer.key"
    _refuse_existing([cert_path, key_path], force)
    cert, key = _crypto("--name", wot.create_introducer, name, days)
    write_file_atomic(key_path, key, SECRET_MODE, overwrite=force)
    write_file_atomic(cert_path, cert, PUBLIC_MODE, overwrite=force)
    return cert_path, key_path


def keygen(
    out: Path, name: str, alg: SigAlg = SigAlg.MLDSA65, *, force: bool = False
) -> tuple[Path, Path]:
    _crypto("--name", x509.check_name, name)
    key_path, pub_path = Path(out) / f"{name}.key", Path(out) / f"{name}.pub"
    _refuse_existing([key_path, pub_path], force)
    key, pub = wot.create_gateway_key(alg)
    write_file_atomic(key_path, key, SECRET_MODE, overwrite=force)
    write_file_atomic(pub_path, pub, PUBLIC_MODE, overwrite=force)
    return key_path, pub_path


def endorse(introducer: Path, name: str, key: Path, days: int = 365) -> bytes:
    """The introducer in DIR endorses the public key in ``key`` as gateway ``name`` (PEM)."""
    icert = _read(Path(introducer) / "introducer.crt", "introducer certificate")
    ikey = _read(Path(introducer) / "introducer.key", "introducer key")
    pub = _crypto(str(key), wot.public_key_of, _read(key, "public key"))
    return bytes(_crypto("--introducer", wot.endorse, icert, ikey, name, pub, days))


def show(path: Path, config: Path | None, name: str | None, out: Any = sys.stdout) -> int:
    """Print what an endorsement file holds; with ``config``, whether its policy accepts it."""
    chain = _crypto(str(path), wot.load_endorsements, _read(path, "endorsement file"))
    now = datetime.datetime.now(datetime.UTC)
    names: set[str] = set()
    for n, der in enumerate(chain):
        info = _crypto(str(path), _describe, der, n)
        names.update(info.names)
        state = (
            "not yet valid"
            if now < info.not_before
            else "EXPIRED"
            if now > info.not_after
            else f"valid, {(info.not_after - now).days} days left"
        )
        print(
            f"endorsement {n}: {info.issuer!r} vouches for {', '.join(info.names) or 'no name'}\n"
            f"  key          {info.algorithm} sha256 {info.key_fingerprint}\n"
            f"  validity     {info.not_before:%Y-%m-%d %H:%M} .. {info.not_after:%Y-%m-%d %H:%M} "
            f"UTC ({state})\n"
            f"  fingerprint  {info.fingerprint}  (what auth.revoked lists)",
            file=out,
        )
    if config is None:
        print(
            "policy: not evaluated (pass --config to judge it by a gateway's introducers)", file=out
        )
        return 0
    from gateway.config import AuthMode, load_settings  # noqa: PLC0415 -- only with --config
    from gateway.credentials import load_wot_policy, make_wot_evaluator  # noqa: PLC0415

    settings = load_settings(config)
    if settings.auth.mode is not AuthMode.WOT:
        raise ConfigError(
            [("auth.mode", f"{config} is in mode {settings.auth.mode.value!r}, not 'wot'")]
        )
    expected = name or (names.pop() if len(names) == 1 else settings.auth.peer_name)
    verdict = make_wot_evaluator(load_wot_policy(settings))(tuple(chain), expected, now)
    word = "ACCEPTED" if verdict.accepted else "REFUSED"
    print(f"policy of {config}: {word}: {verdict.summary()}", file=out)
    return 0 if verdict.accepted else 1


def _describe(der: bytes, n: int) -> wot.EndorsementInfo:
    try:
        return wot.describe(der, n)
    except AuthenticationError as exc:
        raise CryptoError(str(exc)) from None


def write_demo_wot(root: Path, sites: list[str], *, force: bool = False) -> dict[str, Any]:
    """``init-demo --auth wot``: four introducers, a key per gateway, each endorsed by all four.

    Returns the ``[auth]`` keys the site configs use (relative to ``root``), per site.
    """
    base = Path(root) / DEMO_WOT_DIR
    intro_dirs = []
    for label, _ in DEMO_INTRODUCERS:
        init_introducer(base / "introducers" / label, label, force=force)
        intro_dirs.append(base / "introducers" / label)
    out: dict[str, Any] = {}
    for site in sites:
        _, pub = keygen(base, site, force=force)
        pems = b"".join(endorse(d, site, pub) for d in intro_dirs)
        write_file_atomic(base / f"{site}.endorsements.pem", pems, PUBLIC_MODE, overwrite=force)
        out[site] = {
            "mode": "wot",
            "key": f"{DEMO_WOT_DIR}/{site}.key",
            "endorsements": f"{DEMO_WOT_DIR}/{site}.endorsements.pem",
            "full_needed": 1,
            "marginals_needed": 3,
            "revoked": f"{DEMO_WOT_DIR}/revoked.txt",
            "introducers": [
                {"file": f"{DEMO_WOT_DIR}/introducers/{label}/introducer.crt", "trust": t.value}
                for label, t in DEMO_INTRODUCERS
            ],
        }
    write_file_atomic(
        base / "revoked.txt",
        b"# revoked endorsements: one SHA-256 fingerprint per line (`qgw wot show FILE`)\n",
        PUBLIC_MODE,
        overwrite=force,
    )
    return out


# --- command line -------------------------------------------------------------------------------


def cmd_init_introducer(args: argparse.Namespace) -> int:
    cert, key = init_introducer(args.out, args.name, args.days, force=args.force)
    print(f"wrote {cert} (self-signed ML-DSA-87 introducer certificate: give it to the gateways)")
    print(f"wrote {key} (introducer private key, mode 0600: keep it offline)")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    key, pub = keygen(args.out, args.name, SigAlg(args.alg), force=args.force)
    print(f"wrote {key} ({args.alg} private key, mode 0600: auth.key)")
    print(f"wrote {pub} (its public key: take it to the introducers for `qgw wot endorse`)")
    return 0


def cmd_endorse(args: argparse.Namespace) -> int:
    pem = endorse(args.introducer, args.name, args.key, args.days)
    if args.out is None:
        sys.stdout.write(pem.decode())
    else:
        write_file_atomic(args.out, pem, PUBLIC_MODE, overwrite=args.force)
        print(f"wrote {args.out} (endorsement of {args.name}'s key, {args.days} days)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    return show(args.file, args.config, args.name)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``qgw wot ...`` to the CLI (called from gateway.cli)."""
    p = sub.add_parser(
        "wot",
        help='web of trust: introducers, gateway keys, endorsements (auth.mode = "wot")',
        description="Create and inspect web-of-trust credentials: ML-DSA-87 introducers, a "
        "gateway's ML-DSA key, and endorsements (X.509 certificates an introducer issues for a "
        "gateway's key).",
    )
    wsub = p.add_subparsers(dest="wot_command", metavar="WOT_COMMAND", required=True)

    i = wsub.add_parser(
        "init-introducer", help="create DIR/introducer.crt and DIR/introducer.key (0600)"
    )
    i.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    i.add_argument("--name", default="qgw introducer", help="introducer common name")
    i.add_argument("--days", type=_days, default=3650, help="validity in days (default 3650)")
    i.add_argument("--force", action="store_true", help="overwrite existing files")
    i.set_defaults(handler=cmd_init_introducer)

    k = wsub.add_parser("keygen", help="create a gateway key: DIR/NAME.key (0600), DIR/NAME.pub")
    k.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    k.add_argument("--name", required=True, help="gateway DNS name (the peer's auth.peer_name)")
    k.add_argument(
        "--alg",
        choices=[a.value for a in (SigAlg.MLDSA65, SigAlg.MLDSA87)],
        default=SigAlg.MLDSA65.value,
        help="ML-DSA parameter set (default ML-DSA-65)",
    )
    k.add_argument("--force", action="store_true", help="overwrite existing files")
    k.set_defaults(handler=cmd_keygen)

    e = wsub.add_parser("endorse", help="endorse a gateway's public key as NAME (PEM to stdout)")
    e.add_argument(
        "--introducer", type=Path, required=True, metavar="DIR", help="holds introducer.crt/.key"
    )
    e.add_argument("--name", required=True, help="the gateway's DNS name")
    e.add_argument(
        "--key", type=Path, required=True, metavar="PUB", help="the gateway's public key (PEM)"
    )
    e.add_argument("--days", type=_days, default=365, help="validity in days (default 365)")
    e.add_argument("--out", type=Path, default=None, metavar="FILE", help="write here, not stdout")
    e.add_argument("--force", action="store_true", help="overwrite --out")
    e.set_defaults(handler=cmd_endorse)

    s = wsub.add_parser(
        "show", help="who vouches in an endorsement file, validity, and (--config) the verdict"
    )
    s.add_argument("file", type=Path, help="endorsement PEM file (one or more certificates)")
    s.add_argument(
        "--config", type=Path, default=None, help="judge by this gateway config's wot policy"
    )
    s.add_argument("--name", default=None, help="expected gateway name (default: the one named)")
    s.set_defaults(handler=cmd_show)
