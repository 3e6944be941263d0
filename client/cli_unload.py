"""``rnnserve unload NAME [--version N] [--force]``: unload a model's version(s) from a running server.

Refused while a version has open sessions, unless ``--force``, which ends them.
"""

from __future__ import annotations

import argparse
import sys

from rnnserve.client._cli import add_connection_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model name")
    parser.add_argument("--version", type=int, default=0, metavar="N", help="one version (default: every version)")
    parser.add_argument("--force", action="store_true", help="unload even with open sessions (their next call fails)")
    add_connection_arguments(parser, timeout=30.0)


def run(args: argparse.Namespace) -> int:
    from rnnserve.client import Client, RnnServeError

    try:
        with Client(args.address, timeout=args.timeout) as client:
            result = client.unload_model(args.name, args.version or None, force=args.force)
    except RnnServeError as err:
        print(f"rnnserve unload: {args.address}: {err}", file=sys.stderr)
        return 1
    for m in result.models:
        print(f"unloaded {m.name}:{m.version}")
    if result.closed_sessions:
        print(f"ended {result.closed_sessions} open session(s)")
    return 0
