"""``rnnserve serve``: serve a model repository until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from typing import Any

from pydantic import ValidationError

from rnnserve.server.settings import ENV_PREFIX, GROUPS, ServerSettings, group_of

# flag -> settings field; every flag also reads RNNSERVE_<FIELD> from the environment. --help lists them under
# their settings' groups, in this order within a group.
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--repository": ("repository", {"metavar": "DIR"}),
    "--host": ("host", {}),
    "--port": ("port", {"type": int}),
    "--port-file": ("port_file", {"metavar": "FILE"}),
    "--max-sessions": ("max_sessions", {"type": int, "metavar": "N"}),
    "--session-ttl": ("session_ttl", {"type": float, "metavar": "SECONDS"}),
    "--session-store": ("session_store", {"metavar": "memory|redis://HOST:PORT/DB"}),
    "--durability": ("durability", {"choices": ["none", "every-step"]}),
    "--workers": ("workers", {"type": int, "metavar": "N"}),
    "--gateway-port": ("gateway_port", {"type": int, "metavar": "PORT"}),
    "--max-message-bytes": ("max_message_bytes", {"type": int, "metavar": "N"}),
    "--max-pending-steps": ("max_pending_steps", {"type": int, "metavar": "N"}),
    "--replay-window": ("replay_window", {"type": int, "metavar": "N"}),
    "--max-stream-inflight": ("max_stream_inflight", {"type": int, "metavar": "N"}),
    "--max-tensor-elements": ("max_tensor_elements", {"type": int, "metavar": "N"}),
    "--max-steps-per-message": ("max_steps_per_message", {"type": int, "metavar": "N"}),
    "--max-queued-steps": ("max_queued_steps", {"type": int, "metavar": "N"}),
    "--max-sessions-per-client": ("max_sessions_per_client", {"type": int, "metavar": "N"}),
    "--max-batch-size": ("max_batch_size", {"type": int, "metavar": "N"}),
    "--max-queue-delay-us": ("max_queue_delay_us", {"type": int, "metavar": "US"}),
    "--device": ("device", {"choices": ["cpu", "cuda"]}),
    "--intra-op-threads": ("intra_op_threads", {"type": int, "metavar": "N"}),
    "--concurrent-batches": ("concurrent_batches", {"type": int, "metavar": "N"}),
    "--inline-budget-us": ("inline_budget_us", {"type": int, "metavar": "US"}),
    "--watch": (
        "watch_interval",
        {"type": float, "nargs": "?", "const": 2.0, "metavar": "SECONDS", "help": "(--watch alone: every 2 s)"},
    ),
    "--grace": ("grace", {"type": float, "metavar": "SECONDS"}),
    "--log-level": ("log_level", {"metavar": "LEVEL"}),
    "--tls-cert": ("tls_cert", {"metavar": "PEM"}),
    "--tls-key": ("tls_key", {"metavar": "PEM"}),
    "--tls-client-ca": ("tls_client_ca", {"metavar": "PEM"}),
    "--auth-tokens": ("auth_tokens", {"metavar": "FILE"}),
    "--admin-principals": ("admin_principals", {"metavar": "NAMES"}),
    "--metrics-port": ("metrics_port", {"type": int, "metavar": "PORT"}),
    "--metrics-host": ("metrics_host", {"metavar": "ADDRESS"}),
}


def _help(text: str) -> str:
    """A setting's description as help text: ``code`` marks are for the docs; a terminal shows them bare."""
    return re.sub(r"``(.+?)``", r"\1", " ".join(text.split()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fields = ServerSettings.model_fields
    groups = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
    # Settings without a flag (secrets: environment only) are told after the flags.
    flagged = {field for field, _ in FLAGS.values()} | {"reflection"}
    env_only = [f"{ENV_PREFIX}{f.upper()} (environment only): {_help(fields[f].description or '')}"
                for f in fields if f not in flagged]  # fmt: skip
    parser.epilog = "\n".join(env_only) or None
    for flag, (field, kwargs) in FLAGS.items():
        info = fields[field]
        default = "" if info.default is None else f", default {info.default}"
        groups[group_of(field)].add_argument(
            flag,
            dest=field,
            default=None,
            help=_help(f"{info.description or ''} {kwargs.get('help', '')} (env {ENV_PREFIX}{field.upper()}{default})"),
            **{k: v for k, v in kwargs.items() if k != "help"},
        )
    groups[group_of("reflection")].add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=None,
        help=f"do not register the gRPC server reflection service (env {ENV_PREFIX}REFLECTION=false)",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    given = {f: getattr(args, f) for f, _ in FLAGS.values() if getattr(args, f, None) is not None}
    if getattr(args, "reflection", None) is not None:
        given["reflection"] = args.reflection
    return ServerSettings(**given)


async def serve(settings: ServerSettings) -> None:
    from rnnserve.server.app import RnnServer

    server = RnnServer(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("signal received: draining for up to %.1fs", settings.grace)
    await server.stop()


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            print(
                f"rnnserve serve: --{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}",
                file=sys.stderr,
            )
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.workers > 1 or settings.gateway_port is not None:
        from rnnserve.server.workers import supervise

        return supervise(settings)
    try:
        asyncio.run(serve(settings))
    except FileNotFoundError as exc:
        print(f"rnnserve serve: {exc}", file=sys.stderr)
        return 1
    return 0
