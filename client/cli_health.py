"""``rnnserve health``: exit 0 when the server (or one service) is SERVING, 1 otherwise.

Meant for container health checks, so it needs only the client install and says why it failed.
"""

from __future__ import annotations

import argparse
import sys

from rnnserve.client._cli import add_connection_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser, timeout=5.0)
    parser.add_argument(
        "--service",
        default="",
        metavar="NAME",
        help="service to check, e.g. rnnserve.v1.RnnServe (default: the whole server)",
    )


def run(args: argparse.Namespace) -> int:
    from rnnserve.client import Client, RnnServeError

    target = f"service {args.service!r}" if args.service else "server"
    try:
        with Client(args.address, timeout=args.timeout) as client:
            status = client.health(args.service)
    except RnnServeError as err:
        print(f"{target} at {args.address}: {err}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{target} at {args.address}: {status}", file=sys.stderr)
        return 1
    print(status)
    return 0
