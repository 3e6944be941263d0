"""``rnnserve serve``: serve a model repository until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from pydantic import ValidationError

from rnnserve.server.settings import ServerSettings

# flag -> settings field; every flag also reads RNNSERVE_<FIELD> from the environment.
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--repository": ("repository", {"metavar": "DIR"}),
    "--host": ("host", {}),
    "--port": ("port", {"type": int, "help": "0 picks a free port"}),
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
    "--log-level": ("log_level", {}),
    "--tls-cert": ("tls_cert", {"metavar": "PEM"}),
    "--tls-key": ("tls_key", {"metavar": "PEM"}),
    "--tls-client-ca": ("tls_client_ca", {"metavar": "PEM"}),
    "--auth-tokens": ("auth_tokens", {"metavar": "FILE"}),
    "--admin-principals": ("admin_principals", {"metavar": "NAMES"}),
    "--metrics-port": ("metrics_port", {"type": int, "metavar": "PORT", "help": "0 picks a free port"}),
    "--metrics-host": ("metrics_host", {"metavar": "ADDRESS"}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (field, kwargs) in FLAGS.items():
        doc = ServerSettings.model_fields[field].description or ""
        default = ServerSettings.model_fields[field].default
        help_text = kwargs.pop("help", "") if "help" in kwargs else ""
        parser.add_argument(
            flag,
            dest=field,
            default=None,
            help=f"{doc} {help_text} (env RNNSERVE_{field.upper()}, default {default})".replace("  ", " "),
            **kwargs,
        )
    parser.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        default=None,
        help="do not register gRPC server reflection",
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
