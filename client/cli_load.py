"""``rnnserve load NAME [--version N]``: load or reload a model's version folder(s) on a running server.

Exits 1 when a version failed to (re)load; its error is printed (a version that was serving keeps serving).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rnnserve.client._cli import add_connection_arguments
from rnnserve.client.cli_models import format_models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model folder in the server's repository")
    parser.add_argument("--version", type=int, default=0, metavar="N", help="one version (default: every version)")
    add_connection_arguments(parser, timeout=120.0)  # a load runs the model's self-check: allow for big models
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    from rnnserve.client import Client, RnnServeError

    try:
        with Client(args.address, timeout=args.timeout) as client:
            models = client.load_model(args.name, args.version or None)
    except RnnServeError as err:
        print(f"rnnserve load: {args.address}: {err}", file=sys.stderr)
        return 1
    print(json.dumps([dataclasses.asdict(m) for m in models], indent=2) if args.json else format_models(models))
    failed = [m for m in models if not m.ready]
    for m in failed:
        print(f"rnnserve load: {m.name}:{m.version} failed: {m.error}", file=sys.stderr)
    return 1 if failed else 0
