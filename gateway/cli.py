"""The ``qgw`` command line.

Exit codes: 0 success, 1 runtime failure, 2 user error (bad arguments or configuration).
User errors never print a Python traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from gateway import __version__
from gateway.errors import ConfigError, GatewayError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _print_problems(problems: list[tuple[str, str]], out: TextIO) -> None:
    for key, msg in problems:
        print(f"  {key}: {msg}" if key else f"  {msg}", file=out)


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.bridge.queue_check import queue_limit_warnings
    from gateway.config import check_files, load_settings, redacted_dump, to_toml
    from gateway.credentials import check_credentials
    from gateway.crypto import get_provider

    settings = load_settings(args.config)
    fc = check_files(settings)
    if fc.problems or (args.strict and fc.missing):
        problems = list(fc.problems)
        if args.strict:
            problems += [(m.key, f"file not found: {m.path}") for m in fc.missing]
        raise ConfigError(problems)
    report = None
    if not fc.missing:
        # The very code path `qgw run` uses to load credentials, as the same user.
        report = check_credentials(settings, get_provider(settings.crypto.provider))
        if report.problems:
            raise ConfigError(report.problems)
    print(f"# effective configuration of {args.config} (secrets redacted)")
    print(to_toml(redacted_dump(settings)))
    if report is not None:
        for line in report.lines:
            print(f"ok: {line}", file=sys.stderr)
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    # The local broker's queue against the outage tolerance (a warning, also under --strict:
    # the broker is not ours to fix, and like certificate expiry it does not stop `run`).
    for warning in queue_limit_warnings(settings.mqtt):
        print(f"warning: {warning}", file=sys.stderr)
    if fc.missing:
        print(f"warning: {len(fc.missing)} referenced file(s) do not exist yet:", file=sys.stderr)
        for m in fc.missing:
            print(f"  {m.key}: {m.path}", file=sys.stderr)
        print(
            "  create a complete demo set with `qgw init-demo DIR` (then point the config at DIR),\n"
            "  or issue real ones with `qgw pki init-ca`, `qgw pki issue`, `qgw pki psk`.\n"
            "  `qgw run` refuses to start until they exist; use --strict to make this an error.",
            file=sys.stderr,
        )
    print("configuration OK", file=sys.stderr)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgw",
        description="Hybrid post-quantum + QKD secure MQTT gateway (site to site).",
    )
    parser.add_argument("--version", action="version", version=f"qgw {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective configuration (secrets redacted)",
        description="Validate a config file: types, unknown keys, referenced files and their "
        "permissions, and the credentials loaded exactly as `qgw run` loads them (PEM parses, "
        "the key matches its certificate, the chain verifies to the CA, expiry, the KME client "
        "TLS files). Prints the effective configuration (file + QGW_* environment) with "
        "secrets redacted. Exit 0 when valid, 2 with every problem listed otherwise.",
    )
    p.add_argument("--config", "-c", type=Path, required=True, help="path to the TOML config file")
    p.add_argument("--strict", action="store_true", help="treat missing referenced files as errors")
    p.set_defaults(handler=cmd_check_config)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules add their subcommands here (kept as a list so the core CLI stays small).
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []


def _register_pki(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.pki import register

    register(sub)


_EXTRA_COMMANDS.append(_register_pki)


def _register_wot(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.wot import register

    register(sub)


_EXTRA_COMMANDS.append(_register_wot)


def _register_keysource(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.initdemo import register as init_demo
    from keysource.cli import register as kme

    init_demo(sub)
    kme(sub)


_EXTRA_COMMANDS.append(_register_keysource)


def _register_runtime(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from gateway.demo import register as demo
    from gateway.runtime import register as run
    from gateway.status import register as status

    run(sub)
    status(sub)
    demo(sub)


_EXTRA_COMMANDS.append(_register_runtime)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"qgw {args.command}: configuration error:", file=sys.stderr)
        _print_problems(exc.problems, sys.stderr)
        return EXIT_USAGE
    except GatewayError as exc:
        print(f"qgw {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
