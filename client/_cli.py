"""Shared options of the client subcommands (``rnnserve health``, ``rnnserve models``)."""

from __future__ import annotations

import argparse
import os

DEFAULT_ADDRESS = "localhost:50051"


def add_connection_arguments(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RNNSERVE_ADDRESS", DEFAULT_ADDRESS),
        metavar="HOST:PORT",
        help=f"server address (default: $RNNSERVE_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="S",
        help=f"seconds to wait for the answer (default: {timeout:g})",
    )
