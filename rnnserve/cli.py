"""The ``rnnserve`` command. Each subcommand lives with the package it drives and is imported lazily, so
``rnnserve --help`` works on a client-only install (no torch, no onnxruntime)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from rnnserve import __version__
from rnnserve.install import install_hint

# subcommand -> (module that provides add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("rnnserve.export.cli", "export a PyTorch recurrent model to a model repository"),
    "serve": ("rnnserve.server.cli", "serve a model repository over gRPC"),
    "demo": ("rnnserve.demo", "export the built-in examples, serve them and stream a demo session"),
    "health": ("rnnserve.client.cli_health", "check a server's gRPC health (exit 0 when SERVING)"),
    "models": ("rnnserve.client.cli_models", "list a server's models and their signatures"),
    "load": ("rnnserve.client.cli_load", "load or reload a model's version(s) on a running server"),
    "unload": ("rnnserve.client.cli_unload", "unload a model's version(s) from a running server"),
    "gateway": ("rnnserve.gateway", "run nginx as a session-affinity gateway in front of rnnserve replicas"),
    "bench": ("rnnserve.bench.cli", "measure rnnserve against a floor (and Triton) on pinned CPUs"),
}

# The subcommands that run torch, onnx or onnxruntime, and the modules of the server and export extras they need.
# Some import them only once running (bench, so that its --help works anywhere): they are looked for before any
# of these runs, so that a client-only install gets the install hint instead of a ModuleNotFoundError half-way.
NEEDS_EXTRAS = frozenset({"export", "serve", "demo", "bench"})
EXTRA_MODULES = ("torch", "onnx", "onnxruntime", "pydantic_settings")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` set, one whose other subcommands are listed but not loaded.

    ``main`` loads only the chosen subcommand: importing ``rnnserve.export.cli`` pulls in torch, which a
    health check (run every few seconds by a container) must not pay for.
    """
    parser = argparse.ArgumentParser(
        prog="rnnserve", description="rnnserve: export and serve stateful recurrent models over gRPC"
    )
    parser.add_argument("--version", action="version", version=f"rnnserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        if only is not None and name != only:
            continue
        try:
            importlib.import_module(module).add_arguments(sp)
        except ImportError as exc:
            # A client-only install lacks torch/onnxruntime: keep the command listed and say what to install.
            sp.set_defaults(_missing=exc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(only=chosen)
    args, _ = parser.parse_known_args(argv)
    missing = getattr(args, "_missing", None) or _missing_extra(args.command)
    if missing is not None:
        print(
            f"rnnserve {args.command}: missing dependency ({missing}). It needs the server and export extras: "
            f"{install_hint()}",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(argv)  # strict now, so a bad flag is reported against its subcommand
    return int(importlib.import_module(args._module).run(args) or 0)


def _missing_extra(command: str) -> str | None:
    """What an extras-needing ``command`` lacks here, worded as Python's ImportError; None when nothing."""
    if command not in NEEDS_EXTRAS:
        return None
    for module in EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # an import hook that refuses the name: as absent as not found
            found = False
        if not found:
            return f"No module named {module!r}"
    return None


if __name__ == "__main__":
    sys.exit(main())
