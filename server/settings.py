"""Server settings: command-line flags and ``RNNSERVE_*`` environment variables (flags win)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RNNSERVE_"

# The groups settings fall in, in the order ``rnnserve serve --help`` and the configuration reference show
# them: name -> what its settings are about. Each setting names its group next to its definition (``in_group``).
GROUPS: dict[str, str] = {
    "network": "Where the server listens, how it stops, what it logs.",
    "models": "The model repository, and overrides of what the models' manifests say about batching.",
    "compute": "Where model calls run and how many at once.",
    "sessions": "How many sessions, for how long, and where their state is kept.",
    "limits": "What one client, session, stream or message may ask for; past a limit the call gets RESOURCE_EXHAUSTED.",
    "processes": "Several server processes on this machine, behind a gateway.",
    "security": "TLS and bearer tokens.",
    "metrics": "Prometheus metrics over plain HTTP.",
}


def in_group(group: str) -> dict[str, Any]:
    """A setting's ``json_schema_extra``: the group (of ``GROUPS``) it is listed under."""
    if group not in GROUPS:
        raise ValueError(f"unknown settings group {group!r}: expected one of {', '.join(GROUPS)}")
    return {"group": group}


class ServerSettings(BaseSettings):
    # use_attribute_docstrings: the docstring under each field is its description (and its --help text).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", use_attribute_docstrings=True)

    repository: Path = Field(Path("model_repository"), json_schema_extra=in_group("models"))
    """Model repository: ``REPO/NAME/VERSION/manifest.json`` plus the artifact."""

    host: str = Field("0.0.0.0", json_schema_extra=in_group("network"))
    """Address to listen on."""

    port: int = Field(default=50051, ge=0, le=65535, json_schema_extra=in_group("network"))
    """gRPC port; 0 picks a free one (``--port-file`` tells which)."""

    port_file: Path | None = Field(None, json_schema_extra=in_group("network"))
    """Where to write the bound port once the server listens (useful with ``--port 0``)."""

    max_sessions: int = Field(default=100_000, ge=1, json_schema_extra=in_group("sessions"))
    """Open sessions allowed across all models; past it OpenSession gets RESOURCE_EXHAUSTED."""

    session_ttl: float = Field(default=600.0, gt=0, json_schema_extra=in_group("sessions"))
    """Seconds a session may stay idle before it is closed and its state freed."""

    session_store: str = Field("memory", json_schema_extra=in_group("sessions"))
    """Where durable sessions are written: ``memory`` (this process) or ``redis://HOST:PORT/DB``, which keeps
    them through a restart. What is written, and when, is each model's durability (``--durability``, or its
    manifest's ``durability``)."""

    @field_validator("session_store")
    @classmethod
    def _store_address(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected 'memory' or redis://HOST:PORT/DB, got {value!r}")
        return value

    concurrent_batches: int | None = Field(default=None, ge=1, json_schema_extra=in_group("compute"))
    """Batches of one model version computing at once, each on its own worker thread, over disjoint sessions,
    for models whose manifest does not say. Above 1, ready sessions are split across the free ones, so on a
    multi-core CPU the model's calls overlap each other and the event loop's work. Unset: 2 for a CPU model
    when the process may run on 2 or more cores (its CPU affinity), else 1 (a GPU wants one large batch)."""

    inline_budget_us: int = Field(default=1000, ge=0, json_schema_extra=in_group("compute"))
    """A CPU model whose small batches (at most 4 sessions) compute in under this many microseconds runs them on
    the event loop, with no worker-thread hop, while nothing else of the model computes and it is lightly
    loaded: a lone session's step then skips two thread wakeups. 0: every batch runs on a worker thread. A
    larger budget lets a slower model's small batches stall the event loop (and every other stream) longer."""

    durability: Literal["none", "every-step"] | None = Field(None, json_schema_extra=in_group("sessions"))
    """Durability of every model whose manifest does not set its own: ``every-step`` writes each batch's new
    states to the session store before answering, which is what lets another replica behind a gateway take
    a session over with no step lost. Unset: each manifest's (default ``none``)."""

    workers: int = Field(default=1, ge=1, json_schema_extra=in_group("processes"))
    """Server processes to run on this machine, listening on ``--port``, ``--port`` + 1, ...; with more than
    one they must share a redis ``--session-store``, and ``--gateway-port`` puts nginx in front of them."""

    gateway_port: int | None = Field(default=None, ge=0, le=65535, json_schema_extra=in_group("processes"))
    """With ``--workers``: also run nginx on this port, routing each session by its ``x-session-id`` to one
    worker (needs nginx on PATH)."""

    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, json_schema_extra=in_group("limits"))
    """Largest gRPC message accepted or sent; larger requests get RESOURCE_EXHAUSTED."""

    replay_window: int = Field(default=8, ge=0, json_schema_extra=in_group("sessions"))
    """Applied steps per session whose responses are kept to answer a retry with the same ``step_index``
    (exactly-once); it should cover the client's pipelining window. Only sessions that number their steps
    keep them. 0: a retry of an applied step gets FAILED_PRECONDITION."""

    max_pending_steps: int = Field(default=1024, ge=1, json_schema_extra=in_group("limits"))
    """Steps one session may have queued; more get RESOURCE_EXHAUSTED (backpressure, not unbounded memory)."""

    max_stream_inflight: int = Field(default=256, ge=1, json_schema_extra=in_group("limits"))
    """Request messages one stream may have in flight before the server stops reading it."""

    max_tensor_elements: int = Field(default=4_194_304, ge=1, json_schema_extra=in_group("limits"))
    """Elements one request tensor may hold; larger ones get RESOURCE_EXHAUSTED before they are decoded."""

    max_steps_per_message: int = Field(default=16_384, ge=1, json_schema_extra=in_group("limits"))
    """Steps one Step or StreamStep message may carry (chunk lengths and StepBatch rows added up); more get
    RESOURCE_EXHAUSTED."""

    max_queued_steps: int = Field(default=131_072, ge=1, json_schema_extra=in_group("limits"))
    """Steps queued per model version across all its sessions; past it new steps get RESOURCE_EXHAUSTED."""

    max_sessions_per_client: int | None = Field(default=None, ge=1, json_schema_extra=in_group("limits"))
    """Open sessions one client may hold (the token's principal; without auth, the peer's IP address);
    past it OpenSession gets RESOURCE_EXHAUSTED. Unset: no per-client limit."""

    device: Literal["cpu", "cuda"] = Field("cpu", json_schema_extra=in_group("compute"))
    """Where models run. ``cuda`` needs onnxruntime-gpu (ONNX) or a CUDA build of torch (TorchScript)."""

    intra_op_threads: int = Field(default=1, ge=0, json_schema_extra=in_group("compute"))
    """Threads one model call may use (0: the runtime's default). One leaves a core for gRPC."""

    max_batch_size: int | None = Field(default=None, ge=1, json_schema_extra=in_group("models"))
    """Override every model manifest's ``max_batch_size``."""

    max_queue_delay_us: int | None = Field(default=None, ge=0, json_schema_extra=in_group("models"))
    """Override every model manifest's ``max_queue_delay_us``."""

    watch_interval: float = Field(default=0.0, ge=0, json_schema_extra=in_group("models"))
    """Poll the repository every this many seconds: load new versions, reload changed ones, unload removed ones
    without open sessions (0: off)."""

    grace: float = Field(default=5.0, ge=0, json_schema_extra=in_group("network"))
    """Seconds in-flight calls get to finish on SIGTERM/SIGINT."""

    log_level: str = Field("INFO", json_schema_extra=in_group("network"))
    """Python logging level."""

    reflection: bool = Field(True, json_schema_extra=in_group("network"))
    """Register the gRPC server reflection service."""

    tls_cert: Path | None = Field(None, json_schema_extra=in_group("security"))
    """PEM certificate chain of the server: serve TLS instead of plaintext (with ``--tls-key``)."""

    tls_key: Path | None = Field(None, json_schema_extra=in_group("security"))
    """PEM private key of ``--tls-cert``."""

    tls_client_ca: Path | None = Field(None, json_schema_extra=in_group("security"))
    """PEM CA bundle: require every client to present a certificate it signed (mutual TLS)."""

    auth_tokens: Path | None = Field(None, json_schema_extra=in_group("security"))
    """Token file, one ``TOKEN PRINCIPAL`` per line (``#`` comments): every RPC but health needs
    ``authorization: Bearer TOKEN``."""

    tokens: str | None = Field(None, json_schema_extra=in_group("security"))
    """``TOKEN PRINCIPAL`` pairs separated by ``;`` or newlines, added to those of ``--auth-tokens``. An
    environment variable only, with no flag: secrets stay off the command line."""

    admin_principals: str | None = Field(None, json_schema_extra=in_group("security"))
    """Comma-separated principals allowed to call LoadModel/UnloadModel when auth is on (unset: any)."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535, json_schema_extra=in_group("metrics"))
    """Serve Prometheus metrics on this HTTP port at /metrics (0: a free port; unset: no metrics server)."""

    metrics_host: str | None = Field(None, json_schema_extra=in_group("metrics"))
    """Address the metrics port listens on. It is plain HTTP without a token, and shows model names and session
    counts: unset, it is 127.0.0.1 when TLS or tokens protect the gRPC port (scrape it from this host, or set
    this to the address a firewalled scrape network reaches), else ``--host``."""

    @property
    def metrics_address(self) -> str:
        """Where the metrics port listens (``metrics_host``, or its default)."""
        if self.metrics_host is not None:
            return self.metrics_host
        return "127.0.0.1" if self.tls_cert or self.auth_tokens or self.tokens else self.host


def group_of(name: str) -> str:
    """The group (a key of ``GROUPS``) setting ``name`` is listed under."""
    extra = ServerSettings.model_fields[name].json_schema_extra
    if not isinstance(extra, dict) or "group" not in extra:
        raise KeyError(f"setting {name!r} names no group: give it json_schema_extra=in_group(...)")
    return str(extra["group"])
