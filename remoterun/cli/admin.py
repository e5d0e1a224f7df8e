"""The admin commands that work on the server's files: `archive verify`, `sign`, `token create`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remoterun import config

if TYPE_CHECKING:
    from remoterun.retention import Report


def add_archive_parser(sub: Any, server_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """`archive verify`'s arguments (`server_flags`: --config, --archive, --db)."""
    a = sub.add_parser("archive", help="check the output archive against the database")
    verify = a.add_subparsers(dest="action", required=True).add_parser(
        "verify", help="every row's files exist and decompress; no file without a row")
    verify.add_argument("--repair", action="store_true",
                        help="finalize what a crash left open; fix rows; adopt strays of "
                             "known tasks; delete pruned leftovers")
    server_flags(verify)


def archive_command(args: argparse.Namespace) -> int:
    """`archive verify [--repair]`: the database against the archive directory; 1 if wrong."""
    from remoterun.cli.backup import settings_from

    try:
        settings = settings_from(args)
    except config.ConfigError as exc:
        print(f"remoterun: config error: {exc}", file=sys.stderr)
        return 2
    if settings.cluster is None and not settings.db_path.is_file():
        print(f"remoterun: no database at {settings.db_path}", file=sys.stderr)
        return 2
    report = asyncio.run(_verify(settings, args.repair))
    for finding in report.findings:
        print(finding.line())
    left = sum(not f.repaired for f in report.findings)
    print(f"checked {report.segments} segment rows and {report.files} files under "
          f"{settings.archive_dir}: {len(report.findings)} problems, "
          f"{len(report.findings) - left} repaired, {left} left"
          + (" (a server is running: segments it is writing were not judged)"
             if report.live else ""))
    return 0 if report.ok else 1


async def _verify(settings: config.Settings, repair: bool) -> Report:
    from remoterun.retention import verify
    from remoterun.store import Database, Store

    db: Store = Database(settings.db_path)
    if settings.cluster is not None:  # the cluster's rows against the shared archive
        from remoterun.store.postgres import PostgresDatabase
        db = PostgresDatabase(settings.cluster.database_url)
    await db.open()
    try:
        return await verify(settings, db, repair=repair)
    finally:
        await db.close()



def add_sign_parser(sub: Any) -> None:
    """`sign`'s arguments."""
    g = sub.add_parser("sign", help="sign scripts for [integrity] public_keys (Ed25519)")
    g.add_argument("scripts", nargs="*", metavar="SCRIPT",
                   help="write SCRIPT.sig beside each (covering SCRIPT.toml too, if present)")
    mode = g.add_mutually_exclusive_group(required=True)
    mode.add_argument("--key", metavar="PRIVATE_KEY", help="the PEM private key to sign with")
    mode.add_argument("--new-key", metavar="PRIVATE_KEY",
                      help="make a new private key file (0600) and print its public key")


def sign_command(args: argparse.Namespace) -> int:
    """`remoterun sign --new-key KEY` / `remoterun sign --key KEY SCRIPT...`."""
    from remoterun.integrity import new_key, sign

    try:
        if args.new_key:
            public = new_key(Path(args.new_key))
            print(f"private key written to {args.new_key} (keep it off the server)")
            print(f'\nadd to config.toml:\n\n[integrity]\npublic_keys = ["{public}"]')
            for script in args.scripts:
                _say_signed(*sign(Path(args.new_key), Path(script)))
            return 0
        if not args.scripts:
            print("remoterun: sign: name the scripts to sign", file=sys.stderr)
            return 2
        for script in args.scripts:
            _say_signed(*sign(Path(args.key), Path(script)))
    except (OSError, ValueError, TypeError) as exc:
        print(f"remoterun: sign: {exc}", file=sys.stderr)
        return 1
    return 0


def _say_signed(sig: Path, public: str, sidecar: Path | None) -> None:
    """One line per signed script: its signature, and the sidecar it covers."""
    print(f"signed {sig}" + (f" (with its metadata {sidecar})" if sidecar else ""))


def add_token_parser(sub: Any) -> None:
    """`token create`'s arguments."""
    t = sub.add_parser("token", help="make API tokens")
    create = t.add_subparsers(dest="action", required=True).add_parser(
        "create", help="print a new token once, and the [[tokens]] lines (with its sha256)")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=config.ROLES)
    create.add_argument("--scripts", nargs="*", metavar="NAME_OR_GLOB",
                        help="limit it to these scripts (none given: no script at all)")
    create.add_argument("--expires", metavar="DURATION", help="e.g. 30d, 12h, 90m")


def token_command(args: argparse.Namespace) -> int:
    """`remoterun token create NAME --role R [--scripts ...] [--expires 30d]`."""
    from remoterun.auth import create_token, parse_duration

    try:
        expires = parse_duration(args.expires) if args.expires else None
        token, lines = create_token(args.name, args.role, args.scripts, expires)
    except ValueError as exc:
        print(f"remoterun: {exc}", file=sys.stderr)
        return 2
    print(f"token (shown once; give it to the client): {token}")
    print("\nadd to config.toml (it holds only the token's sha256):\n")
    print(lines, end="")
    return 0

