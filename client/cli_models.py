"""``rnnserve models``: list the models a server knows, with their signatures."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable

from rnnserve.client._cli import add_connection_arguments
from rnnserve.client._types import ModelInfo, StateSpec, TensorSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser, timeout=10.0)
    parser.add_argument("--name", default="", help="only models with this name")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args: argparse.Namespace) -> int:
    from rnnserve.client import Client, RnnServeError

    try:
        with Client(args.address, timeout=args.timeout) as client:
            models = client.list_models(args.name)
    except RnnServeError as err:
        print(f"rnnserve models: {args.address}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
    else:
        print(format_models(models))
    return 0


def _specs(specs: Iterable[TensorSpec | StateSpec]) -> str:
    def dims(shape: tuple[int, ...]) -> str:
        return ", ".join("?" if d < 0 else str(d) for d in shape)

    return ", ".join(f"{s.name}: {s.dtype}[{dims(s.shape)}]" for s in specs) or "-"


def format_models(models: list[ModelInfo]) -> str:
    """A human-readable listing: one header line per model version, then its per-session signature:
    what a client sends and gets, the state the server keeps, the parameters a session may give at
    ``open_session(parameters=...)`` and the constants the server feeds from the model's config."""
    if not models:
        return "no models"
    lines = []
    for m in models:
        head = f"{m.name}:{m.version}  {m.state}  {m.format}"
        if m.kind != "step":
            head += f"  {m.kind} (Predict only)"
        if m.device:
            head += f"  {m.device}"
        head += f"  sessions={m.open_sessions}  state={m.state_bytes}B/session"
        lines.append(head)
        if m.error:
            lines.append(f"  error:   {m.error}")
        lines += [
            f"  inputs:  {_specs(m.inputs)}",
            f"  outputs: {_specs(m.outputs)}",
            f"  states:  {_specs(m.states)}",
            f"  parameters: {_specs(m.parameters)}",
            f"  constants:  {_specs(m.constants)}",
        ]
    return "\n".join(lines)
