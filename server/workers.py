"""``rnnserve serve --workers N [--gateway-port P]``: N server processes on one machine, optionally behind the
nginx session-affinity gateway (rnnserve/gateway.py), under one supervisor.

One Python process is bound by one core's worth of gRPC, so a multi-core machine runs several. They are the
same replicas a multi-machine deployment runs: each its own `rnnserve serve` listening on ``port + i``, all
sharing the redis session store, and the gateway hashing each session onto one of them. The supervisor:

- passes every setting to the workers through ``RNNSERVE_*`` environment variables (so they get exactly
  what it was given, flags and environment alike), with each worker's own port and metrics port;
- restarts a worker that exits on its own, on the same port, after a backoff (1 s doubling to 30 s): its
  sessions go to the other workers meanwhile, through the gateway and the store;
- on SIGTERM or SIGINT, drains every worker (their own graceful shutdown) and stops nginx gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rnnserve import gateway
from rnnserve.server.settings import ServerSettings

log = logging.getLogger(__name__)

# Settings the supervisor gives each worker itself, or keeps for itself.
_OWN = {"workers", "gateway_port", "port", "port_file", "metrics_port"}
_BACKOFF_MAX = 30.0


def worker_environment(settings: ServerSettings) -> dict[str, str]:
    """Every setting that a worker shares, as the ``RNNSERVE_*`` variables pydantic-settings reads."""
    env = {}
    for field, value in settings.model_dump().items():
        if field in _OWN or value is None:
            continue
        env[f"RNNSERVE_{field.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


class Child:
    """One supervised process, restarted with backoff when it exits on its own."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.backoff = 1.0
        self.restart_at = 0.0
        self.started_at = 0.0

    def start(self) -> None:
        # Own session: a terminal's Ctrl-C reaches the supervisor only, which then drains the children in order.
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def check(self, now: float) -> None:
        """Restart it when it has exited (after its backoff)."""
        if self.proc is None or self.proc.poll() is None:
            return
        if not self.restart_at:
            # A worker that ran a while before dying gets a fresh backoff.
            if now - self.started_at > 60:
                self.backoff = 1.0
            self.restart_at = now + self.backoff
            log.warning("%s exited with %s; restarting it in %.0f s", self.name, self.proc.returncode, self.backoff)
            self.backoff = min(self.backoff * 2, _BACKOFF_MAX)
        elif now >= self.restart_at:
            self.restart_at = 0.0
            self.start()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, deadline: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time: killing it", self.name)
            self.proc.kill()
            self.proc.wait(5)


def _wait_for_ports(files: list[Path], children: list[Child], timeout: float = 300.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        texts = [f.read_text().strip() if f.exists() else "" for f in files]
        if all(texts):
            return [int(t) for t in texts]
        for child in children:
            if child.proc is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers did not listen within {timeout:.0f} s")
        time.sleep(0.05)


def supervise(settings: ServerSettings) -> int:
    """Run the workers (and the gateway) until SIGTERM/SIGINT; return the exit status."""
    if settings.workers > 1 and not settings.session_store.startswith(("redis://", "rediss://", "unix://")):
        print(
            "rnnserve serve: --workers needs a shared session store, so that a session can move between "
            "workers: add --session-store redis://HOST:PORT/DB (and --durability every-step)",
            file=sys.stderr,
        )
        return 2
    if settings.gateway_port is not None:
        try:
            nginx = gateway.find_nginx()
        except FileNotFoundError as exc:
            print(f"rnnserve serve: --gateway-port: {exc}", file=sys.stderr)
            return 2
    if settings.durability != "every-step":
        log.warning(
            "workers without --durability every-step: a session that moves to another worker (one died or "
            "restarted) resumes from its last write, or not at all"
        )
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    workdir = Path(tempfile.mkdtemp(prefix="rnnserve-workers-"))
    # The supervisor's own settings must not reach a worker through the environment either (a worker that read
    # RNNSERVE_WORKERS would start workers of its own).
    own = {f"RNNSERVE_{f.upper()}" for f in _OWN}
    inherited = {k: v for k, v in os.environ.items() if k not in own}
    base_env = {**inherited, **worker_environment(settings), "RNNSERVE_WORKERS": "1", "PYTHONUNBUFFERED": "1"}
    workers: list[Child] = []
    port_files = []
    for i in range(settings.workers):
        port = settings.port + i if settings.port else 0
        port_file = workdir / f"worker-{i}.port"
        port_files.append(port_file)
        env = dict(base_env)
        if settings.metrics_port is not None:
            env["RNNSERVE_METRICS_PORT"] = str(settings.metrics_port + i if settings.metrics_port else 0)
        cmd = [sys.executable, "-m", "rnnserve.cli", "serve", "--port", str(port), "--port-file", str(port_file)]
        workers.append(Child(f"worker {i}", cmd, env))
    for w in workers:
        w.start()
    children = list(workers)
    try:
        ports = _wait_for_ports(port_files, workers)
        # A restarted worker keeps its port: the gateway's ring names it.
        for w, port in zip(workers, ports, strict=True):
            w.cmd[w.cmd.index("--port") + 1] = str(port)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        replicas = [f"{host}:{p}" for p in ports]
        listening = ports
        if settings.gateway_port is not None:
            conf = gateway.write_config(workdir / "gateway", replicas, port=settings.gateway_port, fail_timeout_s=2.0)
            gateway.check_config(conf, nginx)
            gw = Child("gateway (nginx)", gateway.nginx_command(conf, nginx), dict(os.environ))
            gw.start()
            children.append(gw)
            listening = [settings.gateway_port]
        log.info(
            "workers on %s%s",
            ", ".join(replicas),
            f"; gateway on :{settings.gateway_port}" if settings.gateway_port is not None else "",
        )
        if settings.port_file is not None:
            # The gateway's port when there is one (clients connect there), else every worker's, one per line.
            tmp = settings.port_file.with_suffix(".tmp")
            tmp.write_text("".join(f"{p}\n" for p in listening))
            tmp.replace(settings.port_file)
        while not stop:
            now = time.monotonic()
            for child in children:
                child.check(now)
            time.sleep(0.2)
    except RuntimeError as exc:
        print(f"rnnserve serve: {exc}", file=sys.stderr)
        stop_all(children, settings.grace)
        return 1
    log.info("signal received: draining %d worker(s) for up to %.1fs", len(workers), settings.grace)
    stop_all(children, settings.grace)
    return 0


def stop_all(children: list[Child], grace: float) -> None:
    """Workers drain (SIGTERM: their graceful shutdown writes every session); nginx stops gracefully last."""
    workers = [c for c in children if not c.name.startswith("gateway")]
    gateways = [c for c in children if c.name.startswith("gateway")]
    for w in workers:
        w.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 10
    for w in workers:
        w.wait(deadline)
    for g in gateways:
        g.signal(signal.SIGQUIT)
        g.wait(time.monotonic() + 10)
