"""The deployment files agree with the server they run: ``Dockerfile``, ``docker-compose.yml`` and ``deploy/``.

No Docker engine or Kubernetes cluster runs here, so these tests read the files and check them against the real
``rnnserve`` parser and settings: every server command line parses, and the ports, paths and names that one file
gives another agree (replica port = healthcheck and probe port = gateway upstream port; metrics port = Prometheus
target; the session store's host = the redis service). deploy/nginx/nginx.conf must be what
``scripts/gen_deploy.py`` renders. Then the compose commands run as plain processes: redis, the three replicas
on it, and nginx with the same gateway configuration in front of them, probed with the compose healthchecks and
stopped with SIGTERM as ``docker stop`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from rnnserve.cli import build_parser
from rnnserve.gateway import HEADER, check_config, find_nginx, nginx_command, render_nginx_config, write_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
ENVOY = DEPLOY / "envoy" / "envoy.yaml"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
# The console script of the environment running the tests: the same entry point the image's PATH finds.
RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))
REPLICAS = 3
# Image targets by onnxruntime flavour: the distribution each must install, and the one it must not.
FLAVOURS = {"cpu": ("onnxruntime", "onnxruntime-gpu"), "gpu": ("onnxruntime-gpu", "onnxruntime")}
# Envoy retry conditions under which the request never reached a replica (so a resend cannot apply it twice).
SAFE_RETRY_ON = {"connect-failure", "refused-stream", "reset-before-request"}


# ---- reading the Dockerfile ---------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, rest of the line)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARG defaults (before the first FROM)
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stages a build of ``target`` runs, base first (instructions are inherited along FROM)."""
        stages: list[Stage] = []
        name: str | None = target
        while name in self.stages:
            stages.insert(0, self.stages[name])
            name = self.stages[name].base
        assert stages, f"Dockerfile has no stage {target!r}"
        return stages

    def instructions(self, target: str, keyword: str) -> list[str]:
        return [rest for stage in self.chain(target) for kw, rest in stage.instructions if kw == keyword]

    def last(self, target: str, keyword: str) -> str:
        found = self.instructions(target, keyword)
        assert found, f"Dockerfile target {target!r} has no {keyword}"
        return found[-1]

    def expand(self, target: str, text: str) -> str:
        """Substitute ``$NAME``/``${NAME}`` with the ARG/ENV defaults visible in ``target``."""
        values = dict(self.args)
        for stage in self.chain(target):
            for kw, rest in stage.instructions:
                if kw == "ARG" and "=" in rest:
                    name, _, default = rest.partition("=")
                    values[name.strip()] = default.strip().strip("\"'")
                elif kw == "ARG":
                    values.setdefault(rest.strip(), "")
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):  # comments may sit inside a continued instruction too
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = words[0]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            current = stages[name] = Stage(name, base)
        elif current is None:
            assert keyword == "ARG", f"only ARG may precede FROM: {line}"
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip("\"'")
        else:
            current.instructions.append((keyword, rest))
    return Dockerfile(args, stages)


def exec_form(text: str, what: str) -> list[str]:
    """A JSON-array (exec form) instruction argument. Shell form would make /bin/sh PID 1, and sh does not
    pass docker stop's SIGTERM on to the server."""
    assert text.startswith("["), f"{what} must use the exec form (a JSON array), not: {text}"
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), what
    return argv


def healthcheck_argv(text: str) -> list[str]:
    """The command of ``HEALTHCHECK [--option=value ...] CMD ...``."""
    m = re.search(r"(?:^|\s)CMD\s+(.*)$", text)
    assert m, f"HEALTHCHECK without CMD: {text}"
    return exec_form(m[1], "HEALTHCHECK CMD")


def shell_commands(run: str) -> Iterator[list[str]]:
    """The simple commands of a RUN line (split on && ; | and redirections dropped)."""
    for part in re.split(r"&&|\|\||;|\|", run):
        argv = shlex.split(part)
        for i, word in enumerate(argv):
            if word.startswith((">", "<")):
                argv = argv[:i]
                break
        if argv:
            yield argv


@dataclass
class PipInstall:
    requirements: list[str]
    options: dict[str, str]


# pip install options that take a value (the others are flags).
PIP_VALUE_OPTIONS = {
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--progress-bar",
    "--platform",
    "--python-version",
}


def pip_installs(dockerfile: Dockerfile, target: str) -> list[PipInstall]:
    found = []
    for run in dockerfile.instructions(target, "RUN"):
        for argv in shell_commands(dockerfile.expand(target, run)):
            words = argv[2:] if argv[:2] == ["python", "-m"] else argv
            if words[:2] != ["pip", "install"]:
                continue
            requirements, options, words = [], {}, words[2:]
            while words:
                word = words.pop(0)
                if word in PIP_VALUE_OPTIONS:
                    options[word] = words.pop(0)
                elif word.startswith("--") and "=" in word:
                    name, _, value = word.partition("=")
                    options[name] = value
                elif word.startswith("-"):
                    options[word] = ""
                else:
                    requirements.append(word)
            found.append(PipInstall(requirements, options))
    return found


def rnnserve_runs(dockerfile: Dockerfile, target: str, subcommand: str) -> list[list[str]]:
    return [
        argv
        for run in dockerfile.instructions(target, "RUN")
        for argv in shell_commands(dockerfile.expand(target, run))
        if argv[:2] == ["rnnserve", subcommand]
    ]


# ---- reading docker-compose.yml -----------------------------------------------------------------------------
def load_compose() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(compose, dict) and "services" in compose
    return compose


def server_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the Dockerfile: the rnnserve servers."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def replica_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The servers behind the gateway: those in no profile."""
    return {name: svc for name, svc in server_services(compose).items() if not svc.get("profiles")}


def gpu_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {name: svc for name, svc in compose["services"].items() if "gpu" in svc.get("profiles", [])}
    assert found, "expected a service in the `gpu` profile"
    return found


def argv_of(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def image_argv(dockerfile: Dockerfile, target: str) -> list[str]:
    """What a container of ``target`` runs with no command given: ENTRYPOINT + CMD."""
    return exec_form(dockerfile.last(target, "ENTRYPOINT"), "ENTRYPOINT") + exec_form(
        dockerfile.last(target, "CMD"), "CMD"
    )


def service_argv(dockerfile: Dockerfile, service: dict[str, Any]) -> list[str]:
    """The full command a compose service's container runs: ENTRYPOINT + (compose command or CMD)."""
    target = service["build"]["target"]
    entrypoint = argv_of(service.get("entrypoint") or exec_form(dockerfile.last(target, "ENTRYPOINT"), "ENTRYPOINT"))
    command = service.get("command")
    return entrypoint + (argv_of(command) if command is not None else exec_form(dockerfile.last(target, "CMD"), "CMD"))


def service_healthcheck(service: dict[str, Any]) -> list[str]:
    test = argv_of(service["healthcheck"]["test"])
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    return test[1:] if test[0] == "CMD" else test


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of each ``ports`` entry."""
    found = {}
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            found[int(spec["target"])] = int(spec["published"])
        else:
            host, _, container = str(spec).split("/")[0].rpartition(":")
            found[int(container)] = int(host.rsplit(":", 1)[-1])
    return found


def container_ports(service: dict[str, Any]) -> set[int]:
    """The ports a service's container offers: its ``expose`` and published ``ports``."""
    return {int(str(p).split("/")[0]) for p in service.get("expose", [])} | set(published(service))


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (host path or volume, read-only) of each short-syntax volume."""
    found = {}
    for spec in service.get("volumes", []):
        source, target, *mode = str(spec).split(":")
        found[target] = (source, "ro" in mode)
    return found


def seconds(duration: str | int | float) -> float:
    """A compose or Envoy duration (``1m30s``, ``20s``, ``500ms``, ``0s``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"([\d.]+)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---- reading deploy/ ----------------------------------------------------------------------------------------
def load_kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def load_k8s() -> list[dict[str, Any]]:
    """Every object of the manifests deploy/kustomization.yaml lists."""
    docs = []
    for resource in load_kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / resource).read_text()) if d]
    return docs


def k8s_object(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


WORKLOADS = ("Deployment", "StatefulSet")


def selected_workloads(docs: list[dict[str, Any]], service: dict[str, Any]) -> list[str]:
    """The workloads whose pods a Service's selector picks."""
    selector = service["spec"]["selector"].items()
    return [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] in WORKLOADS and selector <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def only_container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A Service targetPort or probe port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]], (port, container["ports"])
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def k8s_argv(dockerfile: Dockerfile, container: dict[str, Any]) -> list[str]:
    """What a rnnserve container runs: ``command`` or the image's ENTRYPOINT, then ``args`` or its CMD."""
    target = container["image"].rpartition(":")[2]
    assert target in FLAVOURS, f"{container['image']}: expected rnnserve:<target>"
    entrypoint = container.get("command") or exec_form(dockerfile.last(target, "ENTRYPOINT"), "ENTRYPOINT")
    return [*entrypoint, *(container.get("args") or exec_form(dockerfile.last(target, "CMD"), "CMD"))]


def k8s_environment(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", [])}


def load_envoy() -> dict[str, Any]:
    return yaml.safe_load(ENVOY.read_text())


def envoy_parts(envoy: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The listener, its HttpConnectionManager, its one route and the cluster that route names."""
    (listener,) = envoy["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm_filter,) = chain["filters"]
    hcm = hcm_filter["typed_config"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    return listener, hcm, route, clusters[route["route"]["cluster"]]


def load_gen_deploy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_deploy", ROOT / "scripts" / "gen_deploy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the real command line -----------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``rnnserve ...`` with the real parser; fail with argparse's message instead of exiting."""
    assert argv[0] == "rnnserve", f"not an rnnserve command: {argv}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` is rejected by the rnnserve parser: {stderr.getvalue().strip()}")
    missing = getattr(args, "_missing", None)
    assert missing is None, f"`rnnserve {args.command}` is unavailable here: {missing}"
    return args


def settings_of(argv: list[str], env: dict[str, str]) -> Any:
    """The ServerSettings `rnnserve serve` builds from ``argv`` in a container whose environment is ``env``."""
    from rnnserve.server.cli import settings_from_args

    assert argv[:2] == ["rnnserve", "serve"], argv
    args = parse(argv)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return settings_from_args(args)


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one wins, as in argparse)."""
    value = None
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word.split("=", 1)[1]
    return value


def with_option(argv: list[str], name: str, value: str) -> list[str]:
    """``argv`` with every ``--name`` value replaced by ``value`` (appended when absent)."""
    out, i, seen = [], 0, False
    while i < len(argv):
        if argv[i] == name:
            out += [name, value]
            i, seen = i + 2, True
            continue
        if argv[i].startswith(name + "="):
            out.append(f"{name}={value}")
            seen = True
        else:
            out.append(argv[i])
        i += 1
    return out if seen else [*out, name, value]


def serve_settings() -> set[str]:
    """The settings ``rnnserve serve`` accepts, as argparse dests (each also read from RNNSERVE_<DEST>)."""
    return {k for k in vars(parse(["rnnserve", "serve"])) if not k.startswith("_") and k != "command"}


def check_environment_names(where: str, env: dict[str, str]) -> None:
    settings = serve_settings()
    env = {k: v for k, v in env.items() if k.startswith("RNNSERVE_")}
    assert env, f"{where}: expected RNNSERVE_* settings"
    for key, value in env.items():
        setting = key.removeprefix("RNNSERVE_").lower()
        assert setting in settings, f"{where}: {key} is no `rnnserve serve` setting ({sorted(settings)})"
        # The value must be one the flag accepts (types and choices).
        parse(["rnnserve", "serve", f"--{setting.replace('_', '-')}", value])


def check_replica_settings(where: str, settings: Any, store_hosts: dict[str, int]) -> None:
    """What a server behind a gateway needs: a shared redis store written on every step, one process."""
    store = urlsplit(settings.session_store)
    assert store.scheme == "redis", f"{where}: replicas must share a redis session store, not {store.geturl()}"
    assert store.hostname in store_hosts, f"{where}: {store.hostname} is not the redis service ({store_hosts})"
    assert (store.port or 6379) == store_hosts[store.hostname], f"{where}: redis port {store.port}"
    assert re.fullmatch(r"/\d+", store.path), f"{where}: {store.geturl()} names no database"
    # Another replica takes a session over from the store: it must hold every applied step.
    assert settings.durability == "every-step", where
    # One server process per container; the replicas are the containers.
    assert settings.workers == 1 and settings.gateway_port is None, where
    assert settings.metrics_port, f"{where}: Prometheus scrapes every replica: pass --metrics-port"


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return load_k8s()


@pytest.fixture(scope="module")
def envoy() -> dict[str, Any]:
    return load_envoy()


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def compose_settings(dockerfile: Dockerfile, service: dict[str, Any]) -> Any:
    return settings_of(service_argv(dockerfile, service), service_environment(service))


def compose_redis(compose: dict[str, Any]) -> dict[str, int]:
    """The compose services running redis, and the port each listens on."""
    found = {}
    for name, svc in compose["services"].items():
        if str(svc.get("image", "")).split(":")[0] == "redis":
            found[name] = int(option(argv_of(svc.get("command", [])), "--port") or 6379)
    assert found, "expected a redis service"
    return found


def rnnserve_deployment(k8s: list[dict[str, Any]]) -> dict[str, Any]:
    return k8s_object(k8s, "Deployment", "rnnserve")


# ---- the Dockerfile and the compose servers -----------------------------------------------------------------
def test_services_build_the_matching_targets(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    replicas, gpus = replica_services(compose), gpu_services(compose)
    for name, service in server_services(compose).items():
        target = service["build"]["target"]
        assert service["build"].get("context", ".") == ".", f"{name}: the Dockerfile needs the repository as context"
        dockerfile.chain(target)  # the target exists
        assert service["image"] == f"rnnserve:{target}", name
        assert name in replicas or name in gpus, f"{name}: a server in a profile other than gpu"
    for name, service in replicas.items():
        assert service["build"]["target"] == "cpu", name
        assert option(service_argv(dockerfile, service), "--device") in (None, "cpu"), name
    for name, service in gpus.items():
        assert service["build"]["target"] == "gpu", name
        assert compose_settings(dockerfile, service).device == "cuda", name
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    # `docker build .` with no --target builds the last stage: make that the CPU image.
    assert list(dockerfile.stages)[-1] == "cpu"


def test_compose_runs_three_identical_replicas(compose: dict[str, Any]) -> None:
    replicas = replica_services(compose)
    assert sorted(replicas) == [f"rnnserve-{i}" for i in range(1, REPLICAS + 1)]
    # One definition (the x-rnnserve anchor): replicas that differ would answer a moved session differently.
    first, *others = replicas.values()
    assert all(other == first for other in others), "the replicas' definitions differ"


def test_every_serve_command_parses(dockerfile: Dockerfile, compose: dict[str, Any], k8s: list[dict[str, Any]]) -> None:
    commands = [image_argv(dockerfile, t) for t in FLAVOURS]
    commands += [service_argv(dockerfile, service) for service in server_services(compose).values()]
    commands += [k8s_argv(dockerfile, only_container(rnnserve_deployment(k8s)))]
    for argv in commands:
        assert argv[:2] == ["rnnserve", "serve"], argv
        parse(argv)


def test_every_healthcheck_parses_and_probes_the_served_port(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    checks = [(healthcheck_argv(dockerfile.last(t, "HEALTHCHECK")), image_argv(dockerfile, t)) for t in FLAVOURS]
    checks += [(service_healthcheck(s), service_argv(dockerfile, s)) for s in server_services(compose).values()]
    for argv, serve_argv in checks:
        assert argv[:2] == ["rnnserve", "health"], argv
        args = parse(argv)
        host, _, port = args.address.rpartition(":")
        # Inside the container the server listens on 0.0.0.0; the probe goes over loopback.
        assert host in ("127.0.0.1", "localhost"), argv
        assert port == option(serve_argv, "--port"), (argv, serve_argv)
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"


def test_compose_servers_are_replicas_of_one_store(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    stores = compose_redis(compose)
    for name, service in server_services(compose).items():
        check_replica_settings(name, compose_settings(dockerfile, service), stores)
        # redis answers its healthcheck before a server starts: a server refuses to start without its store.
        assert set(service["depends_on"]) >= {urlsplit(compose_settings(dockerfile, service).session_store).hostname}
        assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values()), name


def test_redis_keeps_the_sessions(compose: dict[str, Any]) -> None:
    for name in compose_redis(compose):
        redis = compose["services"][name]
        argv = argv_of(redis["command"])
        assert argv[0] == "redis-server" and option(argv, "--appendonly") == "yes", f"{name}: turn on the AOF"
        assert "/data" in mounts(redis), f"{name}: keep /data (the AOF) in a volume"
        assert "redis-cli" in " ".join(service_healthcheck(redis)), name


def test_ports_agree(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    for target in FLAVOURS:
        exposed = {int(p.split("/")[0]) for line in dockerfile.instructions(target, "EXPOSE") for p in line.split()}
        cmd = exec_form(dockerfile.last(target, "CMD"), "CMD")
        assert exposed == {int(option(cmd, "--port") or 0)}, (target, exposed, cmd)
    for name, service in server_services(compose).items():
        assert option(service_argv(dockerfile, service), "--port"), f"{name}: pass --port, so ports cannot drift"
        settings = compose_settings(dockerfile, service)
        assert container_ports(service) == {settings.port, settings.metrics_port}, name
        exposed = {int(p.split("/")[0]) for p in dockerfile.instructions(service["build"]["target"], "EXPOSE")}
        assert settings.port in exposed, name
    for name in replica_services(compose):
        assert not published(compose["services"][name]), f"{name}: clients reach the replicas through the gateway"
    hosts = [host for s in compose["services"].values() for host in published(s).values()]
    assert len(hosts) == len(set(hosts)), f"two services publish the same host port: {hosts}"


def test_served_repository_is_the_exported_one(
    dockerfile: Dockerfile, compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    k8s_container = only_container(rnnserve_deployment(k8s))
    for target in FLAVOURS:
        exports = rnnserve_runs(dockerfile, target, "export")
        assert len(exports) == 1, f"{target}: expected one `rnnserve export` RUN, found {exports}"
        export_repo = option(exports[0], "--repository")
        parse(exports[0])
        assert export_repo and export_repo.startswith("/"), exports[0]
        assert option(exec_form(dockerfile.last(target, "CMD"), "CMD"), "--repository") == export_repo
        for name, service in server_services(compose).items():
            if service["build"]["target"] == target:
                assert option(service_argv(dockerfile, service), "--repository") == export_repo, name
        if k8s_container["image"].endswith(f":{target}"):
            assert option(k8s_argv(dockerfile, k8s_container), "--repository") == export_repo


def test_environment_names_serve_settings(compose: dict[str, Any], k8s: list[dict[str, Any]]) -> None:
    for name, service in server_services(compose).items():
        check_environment_names(name, service_environment(service))
    check_environment_names("deploy/k8s Deployment rnnserve", k8s_environment(only_container(rnnserve_deployment(k8s))))


def test_stop_grace_period_outlasts_the_drain(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    # docker stop sends SIGTERM, then SIGKILL after stop_grace_period (default 10s): the server's drain
    # (--grace) must end before that, or in-flight calls are cut and the exit is not clean.
    for name, service in server_services(compose).items():
        grace = compose_settings(dockerfile, service).grace
        assert seconds(service.get("stop_grace_period", "10s")) > grace + 2, name
    for name, service in compose["services"].items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


# ---- the compose gateway and Prometheus ---------------------------------------------------------------------
def test_compose_gateway_routes_to_every_replica(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert str(gateway["image"]).startswith("nginx:"), gateway["image"]
    assert mounts(gateway)["/etc/nginx/nginx.conf"] == ("./" + str(NGINX_CONF.relative_to(ROOT)), True)
    (listen,) = published(gateway)
    # Clients keep the address a single server had.
    assert published(gateway) == {listen: 50051}
    replicas = replica_services(compose)
    addresses = sorted(f"{name}:{compose_settings(dockerfile, svc).port}" for name, svc in replicas.items())
    assert NGINX_CONF.read_text() == render_nginx_config(addresses, port=listen), (
        "deploy/nginx/nginx.conf is stale: python scripts/gen_deploy.py"
    )
    gen = load_gen_deploy()
    assert (addresses, listen) == (gen.REPLICAS, gen.GATEWAY_PORT)
    # nginx resolves the replicas' names when it starts: start it after them.
    assert set(gateway["depends_on"]) == set(replicas)
    assert all(d["condition"] == "service_healthy" for d in gateway["depends_on"].values())
    # Its healthcheck connects to the port nginx listens on.
    (port,) = re.findall(r"/dev/tcp/127\.0\.0\.1/(\d+)", " ".join(service_healthcheck(gateway)))
    assert int(port) == listen


def test_nginx_conf_routes_by_the_session_header_and_outlasts_idle_sessions(
    dockerfile: Dockerfile, compose: dict[str, Any]
) -> None:
    text = NGINX_CONF.read_text()
    assert f"hash $http_{HEADER.replace('-', '_')} consistent;" in text
    ttl = max(compose_settings(dockerfile, s).session_ttl for s in replica_services(compose).values())
    for directive in ("grpc_read_timeout", "grpc_send_timeout", "keepalive_timeout"):
        for value in re.findall(rf"{directive} (\w+);", text):
            assert seconds(value) >= ttl, f"{directive} {value} would cut a session idle for its TTL ({ttl} s)"


def test_gen_deploy_check_fails_on_drift(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_deploy.py"), "--check"], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    gen = load_gen_deploy()
    copy = tmp_path / NGINX_CONF.relative_to(ROOT)
    copy.parent.mkdir(parents=True)
    copy.write_text(NGINX_CONF.read_text().replace("rnnserve-3:", "rnnserve-4:"))
    assert gen.main(["--check", "--root", str(tmp_path)]) == 1
    assert gen.main(["--root", str(tmp_path)]) == 0 and copy.read_text() == NGINX_CONF.read_text()


def test_prometheus_scrapes_every_replica(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    expected = {
        ("/metrics", f"{name}:{compose_settings(dockerfile, svc).metrics_port}")
        for name, svc in replica_services(compose).items()
    }
    assert targets == expected
    prometheus = compose["services"]["prometheus"]
    assert str(prometheus["image"]).startswith("prom/prometheus:")
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == ("./" + str(PROMETHEUS.relative_to(ROOT)), True)
    assert published(prometheus) == {9090: 9090}


def test_grafana_shows_the_stacks_prometheus(compose: dict[str, Any]) -> None:
    """Grafana's provisioning (deploy/grafana/provisioning) gives it the compose Prometheus as its data source and
    the dashboard folder compose mounts; every panel and variable asks that data source. (Which metrics the
    panels name: tests/integration/test_dashboard.py.)"""
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    assert str(grafana["image"]).startswith("grafana/grafana:")
    volumes = mounts(grafana)
    provisioning = "/etc/grafana/provisioning"
    assert volumes[provisioning] == ("./" + str((GRAFANA / "provisioning").relative_to(ROOT)), True)
    dashboards_at = next(target for target, (source, _) in volumes.items() if source == "./deploy/grafana/dashboards")
    assert volumes[dashboards_at][1], "read-only"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"

    (datasource,) = [
        d
        for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml"))
        for d in yaml.safe_load(path.read_text())["datasources"]
    ]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus" and url.hostname == "prometheus"
    assert url.port in container_ports(prometheus)
    scrape = yaml.safe_load(PROMETHEUS.read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape  # what $__rate_interval is built from

    (provider,) = [
        p
        for path in sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yml"))
        for p in yaml.safe_load(path.read_text())["providers"]
    ]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_at
    files = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert [f.name for f in files] == ["rnnserve.json"]
    home = service_environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_at}/rnnserve.json"

    dashboard = json.loads(files[0].read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    asked = [p["datasource"] for p in panels] + [t["datasource"] for p in panels for t in p["targets"]]
    asked += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert all(d == {"type": "prometheus", "uid": datasource["uid"]} for d in asked), asked
    # Panels tile a 24-column grid without overlapping.
    cells = [(x, y) for p in dashboard["panels"] for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]  # fmt: skip
    assert len(cells) == len(set(cells)) and all(0 <= x < 24 for x, _ in cells)

    # Healthy = Grafana answers on the port it publishes (on this host only: anonymous viewers may read it).
    assert published(grafana) == {3000: 3000} and grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert f"http://127.0.0.1:{next(iter(published(grafana)))}/api/health" in service_healthcheck(grafana)


# ---- Kubernetes ---------------------------------------------------------------------------------------------
def test_kustomization_builds_everything_from_the_checked_in_files(k8s: list[dict[str, Any]]) -> None:
    kustomization = load_kustomization()
    assert sorted(kustomization["resources"]) == sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.glob("k8s/*.yaml"))
    # The gateway's ConfigMap is generated from deploy/envoy/envoy.yaml itself, so there is no copy to drift.
    (generator,) = kustomization["configMapGenerator"]
    (file_spec,) = generator["files"]
    key, _, path = file_spec.rpartition("=")
    assert (DEPLOY / path).resolve() == ENVOY.resolve()
    gateway = k8s_object(k8s, "Deployment", "rnnserve-gateway")
    pod = gateway["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == generator["name"]]
    container = only_container(gateway)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert option(container["args"], "-c") == f"{mount['mountPath']}/{key or Path(path).name}"


def test_k8s_replicas_run_the_compose_replicas_settings(
    dockerfile: Dockerfile, compose: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    deployment = rnnserve_deployment(k8s)
    container = only_container(deployment)
    assert deployment["spec"]["replicas"] == REPLICAS
    (compose_replica, *_) = replica_services(compose).values()
    assert container["image"] == compose_replica["image"], "Kubernetes runs the image compose builds"
    settings = settings_of(k8s_argv(dockerfile, container), k8s_environment(container))
    # The same server configuration as docker compose's (the redis Service has the compose service's name).
    assert settings == compose_settings(dockerfile, compose_replica)
    stores = {}
    for service in (d for d in k8s if d["kind"] == "Service"):
        if selected_workloads(k8s, service) == ["redis"]:
            stores[service["metadata"]["name"]] = service["spec"]["ports"][0]["port"]
    check_replica_settings("deploy/k8s Deployment rnnserve", settings, stores)
    redis = only_container(k8s_object(k8s, "StatefulSet", "redis"))
    assert option(redis["args"], "--appendonly") == "yes"
    redis_service = k8s_object(k8s, "Service", urlsplit(settings.session_store).hostname)
    assert container_port(redis, redis_service["spec"]["ports"][0]["targetPort"]) == 6379


def test_k8s_ports_probes_and_annotations_agree(dockerfile: Dockerfile, k8s: list[dict[str, Any]]) -> None:
    deployment = rnnserve_deployment(k8s)
    container = only_container(deployment)
    settings = settings_of(k8s_argv(dockerfile, container), k8s_environment(container))
    assert container_port(container, "grpc") == settings.port
    assert container_port(container, "metrics") == settings.metrics_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The kubelet's gRPC probe asks grpc.health.v1 for the whole server, as `rnnserve health` does.
        assert container_port(container, container[probe]["grpc"]["port"]) == settings.port, probe
        assert not container[probe]["grpc"].get("service"), probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    headless = k8s_object(k8s, "Service", "rnnserve-headless")
    assert headless["spec"]["clusterIP"] == "None" and selected_workloads(k8s, headless) == ["rnnserve"]
    ports = {p["name"]: p for p in headless["spec"]["ports"]}
    assert ports["grpc"]["port"] == container_port(container, ports["grpc"]["targetPort"]) == settings.port
    assert ports["metrics"]["port"] == container_port(container, ports["metrics"]["targetPort"])


def test_k8s_pods_stop_cleanly_as_the_image_user(dockerfile: Dockerfile, k8s: list[dict[str, Any]]) -> None:
    pod = rnnserve_deployment(k8s)["spec"]["template"]["spec"]
    container = only_container(rnnserve_deployment(k8s))
    settings = settings_of(k8s_argv(dockerfile, container), k8s_environment(container))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    # The kubelet runs preStop, then sends SIGTERM; SIGKILL comes terminationGracePeriodSeconds after the start.
    assert pod["terminationGracePeriodSeconds"] > pause + settings.grace + 2
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(dockerfile.instructions("cpu", "RUN")))
    assert uid and pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": int(uid[1])}


def test_k8s_gateway_serves_envoy_on_the_client_port(k8s: list[dict[str, Any]], envoy: dict[str, Any]) -> None:
    gateway = k8s_object(k8s, "Deployment", "rnnserve-gateway")
    container = only_container(gateway)
    image, _, tag = container["image"].rpartition(":")
    assert image == "envoyproxy/envoy"
    version = re.match(r"v(\d+)\.(\d+)", tag)
    # reset-before-request (the retry condition envoy.yaml relies on) came in Envoy 1.31.
    assert version and (int(version[1]), int(version[2])) >= (1, 31), tag
    listener, *_ = envoy_parts(envoy)
    service = k8s_object(k8s, "Service", "rnnserve-gateway")
    assert selected_workloads(k8s, service) == ["rnnserve-gateway"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 50051, "clients keep the address a single server had"
    listen = listener["address"]["socket_address"]["port_value"]
    assert container_port(container, port["targetPort"]) == listen
    assert container_port(container, container["readinessProbe"]["tcpSocket"]["port"]) == listen


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_envoy_config_into_the_gateway(k8s: list[dict[str, Any]]) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    (config_map,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert config_map["data"] == {"envoy.yaml": ENVOY.read_text()}
    gateway = k8s_object(rendered, "Deployment", "rnnserve-gateway")
    names = [v["configMap"]["name"] for v in gateway["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert names == [config_map["metadata"]["name"]]
    # Nothing else changes on the way through kustomize.
    assert len(rendered) == len(k8s) + 1


# ---- Envoy --------------------------------------------------------------------------------------------------
def test_envoy_hashes_sessions_onto_the_replicas(
    dockerfile: Dockerfile, envoy: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    _, hcm, route, cluster = envoy_parts(envoy)
    assert hcm["codec_type"] in ("AUTO", "HTTP2")
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    assert route["match"] == {"prefix": "/"}
    assert route["route"]["hash_policy"] == [{"header": {"header_name": HEADER}}]
    assert cluster["lb_policy"] == "RING_HASH"
    # Every ready replica pod is a host: the headless Service's DNS name, at the replicas' gRPC port.
    assert cluster["type"] == "STRICT_DNS"
    (endpoints,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = endpoints["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = k8s_object(k8s, "Service", address["address"])
    assert headless["spec"]["clusterIP"] == "None"
    container = only_container(rnnserve_deployment(k8s))
    settings = settings_of(k8s_argv(dockerfile, container), k8s_environment(container))
    assert address["port_value"] == settings.port
    assert any(p["port"] == settings.port for p in headless["spec"]["ports"])
    # gRPC upstream: HTTP/2, health from grpc.health.v1 (the whole server).
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert not check["grpc_health_check"].get("service_name")


def test_envoy_keeps_idle_sessions_and_retries_only_unsent_requests(
    dockerfile: Dockerfile, envoy: dict[str, Any], k8s: list[dict[str, Any]]
) -> None:
    _, hcm, route, cluster = envoy_parts(envoy)
    deployment = rnnserve_deployment(k8s)
    container = only_container(deployment)
    settings = settings_of(k8s_argv(dockerfile, container), k8s_environment(container))
    # No deadline on a call (a stream lives as long as its session), and no idle cut shorter than the TTL.
    assert seconds(route["route"]["timeout"]) == 0
    for value in (route["route"]["idle_timeout"], hcm["stream_idle_timeout"]):
        assert seconds(value) >= settings.session_ttl, value
    # A request a replica may have applied is never resent by Envoy (the SDK resends it with its step index).
    policy = route["route"]["retry_policy"]
    assert set(policy["retry_on"].split(",")) <= SAFE_RETRY_ON, policy["retry_on"]
    assert "retriable_status_codes" not in policy and "retriable_headers" not in policy
    # Every open session stream is a request in flight: the circuit breaker must not cap them below what the
    # replicas accept.
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] >= deployment["spec"]["replicas"] * settings.max_sessions


def flavour_distributions(install: PipInstall, pyproject: dict[str, Any]) -> set[str]:
    """The onnxruntime distributions a pip install asks for, with the project's extras expanded."""
    extras = pyproject["project"]["optional-dependencies"]
    project = pyproject["project"]["name"]

    def expand(requirement: str) -> set[str]:
        m = re.match(r"^([^\[<>=!~;\s]*)(?:\[([^\]]*)\])?", requirement)
        assert m, requirement
        name, wanted = m[1].lower().replace("_", "-"), [e.strip() for e in (m[2] or "").split(",") if e.strip()]
        is_project = name == project or name.startswith(("/", ".")) or name == ""
        if not is_project:
            return {name} if name.startswith("onnxruntime") else set()
        found: set[str] = set()
        for extra in wanted:
            assert extra in extras, f"{requirement}: no extra {extra!r} in pyproject"
            for dep in extras[extra]:
                found |= expand(dep)
        return found

    return set().union(*(expand(r) for r in install.requirements))


@pytest.mark.parametrize("target", sorted(FLAVOURS))
def test_each_target_installs_one_onnxruntime_flavour(
    dockerfile: Dockerfile, pyproject: dict[str, Any], target: str
) -> None:
    installs = pip_installs(dockerfile, target)
    assert installs, f"{target}: no pip install"
    wanted, other = FLAVOURS[target]
    flavours = set().union(*(flavour_distributions(i, pyproject) for i in installs))
    assert wanted in flavours and other not in flavours, (target, flavours)
    for install in installs:
        assert install.options.get("-c", install.options.get("--constraint", "")).endswith("constraints.txt"), (
            f"{target}: every pip install takes the project's pins (-c constraints.txt): {install}"
        )
    cpu_index = [i for i in installs if i.options.get("--index-url", "").rstrip("/").endswith("/whl/cpu")]
    if target == "cpu":
        # torch first, from PyTorch's CPU index: resolved from PyPI as a dependency of the project it would
        # be the multi-GB CUDA build.
        assert installs[0].requirements == ["torch"] and cpu_index == installs[:1], installs
    else:
        # --device cuda keeps session state in CUDA tensors: the GPU image needs a CUDA torch.
        assert cpu_index == [], f"the gpu target must not install the CPU build of torch: {cpu_index}"


def test_images_run_as_a_non_root_user(dockerfile: Dockerfile) -> None:
    for target in FLAVOURS:
        assert dockerfile.last(target, "USER") not in ("root", "0"), target


def test_dockerignore_keeps_what_the_build_needs(pyproject: dict[str, Any]) -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]

    def ignored(path: str) -> bool:
        # .dockerignore excludes a folder with everything under it; later `!pattern` lines re-include.
        parents = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
        result = False
        for pattern in patterns:
            negate, pat = pattern.startswith("!"), pattern.lstrip("!").strip("/")
            matches = any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in parents)
            if matches:
                result = not negate
        return result

    needed = ["pyproject.toml", "constraints.txt", pyproject["project"]["readme"]]
    needed += [f"{folder}/__init__.py" for folder in pyproject["tool"]["setuptools"]["package-dir"].values()]
    assert [p for p in needed if ignored(p)] == []
    # Never send the host's virtualenv or git history to the daemon.
    assert ignored(".venv/bin/python") and ignored(".git/HEAD")


# ---- the same commands as plain processes -------------------------------------------------------------------
def local(argv: list[str]) -> list[str]:
    assert argv[0] == "rnnserve", argv
    return [RNNSERVE, *argv[1:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def exported_repository(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image build's `rnnserve export ...`, into a temporary folder instead of /models."""
    (argv,) = rnnserve_runs(dockerfile, "cpu", "export")
    repository = tmp_path_factory.mktemp("models")
    done = subprocess.run(
        local(with_option(argv, "--repository", str(repository))), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}"
    assert list(repository.glob("*/*/manifest.json")), f"{shlex.join(argv)} exported nothing"
    return repository


def wait_for_healthcheck(argv: list[str], proc: subprocess.Popen[bytes], what: str, timeout: float = 10) -> None:
    """Run a healthcheck until it passes, as docker does, failing if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while subprocess.run(argv, capture_output=True).returncode != 0:
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what}: healthcheck `{shlex.join(argv)}` still fails after {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def compose_redis_server(compose: dict[str, Any], tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The compose redis service's command on a free loopback port; its healthcheck must pass. Yields
    (service name, port)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (scripts/setup.sh --system installs it)")
    (name,) = compose_redis(compose)
    service = compose["services"][name]
    port = free_port()
    argv = [*argv_of(service["command"]), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        health = [re.sub(r"\bredis-cli\b", f"redis-cli -p {port}", word) for word in service_healthcheck(service)]
        wait_for_healthcheck(health, proc, shlex.join(argv))
        yield name, port
    finally:
        stop(proc)


def cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    argv: list[str]
    port_file: Path
    log: Path
    metrics_port: int
    port: int = 0

    def wait_for_port(self, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text.isdigit():  # written after the server listens; may be caught half-written
                self.port = int(text)
                return self.port
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} before listening:\n{self.log.read_text()}")
            time.sleep(0.1)
        pytest.fail(f"server wrote no port file in {timeout}s:\n{self.log.read_text()}")


def start_server(
    dockerfile: Dockerfile, service: dict[str, Any], repository: Path, redis_url: str, workdir: Path
) -> Server:
    """A compose service's container command as a process: pointed at the exported folder, at a free gRPC port
    it reports in a file, at a free metrics port, and at the local redis (the database the service names)."""
    workdir.mkdir()
    argv = service_argv(dockerfile, service)
    store = urlsplit(compose_settings(dockerfile, service).session_store)
    metrics_port = free_port()
    argv = with_option(argv, "--repository", str(repository))
    argv = with_option(with_option(argv, "--port", "0"), "--port-file", str(workdir / "port"))
    argv = with_option(argv, "--host", "127.0.0.1")  # nothing outside this machine needs to reach it
    argv = with_option(argv, "--metrics-port", str(metrics_port))
    argv = with_option(argv, "--session-store", f"{redis_url}{store.path}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env.update(service_environment(service))
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(local(argv), stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(proc, argv, workdir / "port", log, metrics_port)


def healthy(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{what}: `{shlex.join(argv)}` failed:\n{done.stdout}{done.stderr}"


def serves_every_model(address: str, repository: Path) -> None:
    done = subprocess.run(
        local(["rnnserve", "models", "--address", address]), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    exported = {p.parent.parent.name for p in repository.glob("*/*/manifest.json")}
    assert [m for m in sorted(exported) if m not in done.stdout] == [], done.stdout


def drains_and_exits_cleanly(server: Server, grace: float) -> None:
    # docker stop: SIGTERM, then the server drains for --grace seconds and exits 0.
    assert stop(server.proc, signal.SIGTERM, timeout=grace + 10) == 0, server.log.read_text()


@pytest.fixture
def nginx() -> str:
    try:
        return find_nginx()
    except FileNotFoundError:
        pytest.skip("nginx is not installed (scripts/setup.sh --system installs it)")


def test_nginx_accepts_the_gateway_config(nginx: str, tmp_path: Path) -> None:
    # deploy/nginx/nginx.conf names compose's hosts, which do not resolve here; the same render with loopback
    # addresses and a private prefix (pid, temp files) is what nginx -t can check.
    gen = load_gen_deploy()
    replicas = [f"127.0.0.1:{free_port()}" for _ in gen.REPLICAS]
    check_config(write_config(tmp_path, replicas, port=gen.GATEWAY_PORT), nginx)
    with pytest.raises(ValueError, match="nginx refused"):
        broken = tmp_path / "broken"
        conf = write_config(broken, replicas, port=gen.GATEWAY_PORT)
        conf.write_text(conf.read_text().replace("grpc_pass", "grpc_passs"))
        check_config(conf, nginx)


def test_compose_stack_runs_as_plain_processes(
    dockerfile: Dockerfile,
    compose: dict[str, Any],
    exported_repository: Path,
    compose_redis_server: tuple[str, int],
    nginx: str,
    tmp_path: Path,
) -> None:
    """redis, the three replicas and the gateway as compose runs them, on loopback ports."""
    redis_name, redis_port = compose_redis_server
    replicas = replica_services(compose)
    servers: dict[str, Server] = {}
    gateway_proc = None
    try:
        for name, service in replicas.items():
            assert urlsplit(compose_settings(dockerfile, service).session_store).hostname == redis_name
            servers[name] = start_server(
                dockerfile, service, exported_repository, f"redis://127.0.0.1:{redis_port}", tmp_path / name
            )
        for name, server in servers.items():
            port = server.wait_for_port()
            healthy(local(with_option(service_healthcheck(replicas[name]), "--address", f"127.0.0.1:{port}")), name)
            # What Prometheus scrapes.
            with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
                assert b"rnnserve_sessions" in response.read(), name
        # The gateway: the compose config's render, with the replicas' loopback ports for their compose names.
        gateway = compose["services"]["gateway"]
        (listen,) = published(gateway)
        port = free_port()
        conf = write_config(tmp_path / "gateway", [f"127.0.0.1:{s.port}" for s in servers.values()], port=port)
        check_config(conf, nginx)
        gateway_log = tmp_path / "gateway.log"
        with gateway_log.open("wb") as out:
            gateway_proc = subprocess.Popen(nginx_command(conf, nginx), stdout=out, stderr=subprocess.STDOUT)
        # The compose healthcheck of the gateway, at this port.
        health = [word.replace(f"/{listen}", f"/{port}") for word in service_healthcheck(gateway)]
        wait_for_healthcheck(health, gateway_proc, f"the gateway (log: {gateway_log})")
        # gRPC through the gateway: health, and every exported model.
        healthy(local(["rnnserve", "health", "--address", f"127.0.0.1:{port}"]), "gateway")
        serves_every_model(f"127.0.0.1:{port}", exported_repository)
        for name, server in servers.items():
            grace = compose_settings(dockerfile, replicas[name]).grace
            drains_and_exits_cleanly(server, grace)
    finally:
        for server in servers.values():
            stop(server.proc, signal.SIGKILL)
        if gateway_proc is not None:
            stop(gateway_proc, signal.SIGQUIT)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDA")
def test_gpu_service_runs_as_a_plain_process(
    dockerfile: Dockerfile,
    compose: dict[str, Any],
    exported_repository: Path,
    compose_redis_server: tuple[str, int],
    tmp_path: Path,
) -> None:
    _, redis_port = compose_redis_server
    for name, service in gpu_services(compose).items():
        server = start_server(
            dockerfile, service, exported_repository, f"redis://127.0.0.1:{redis_port}", tmp_path / name
        )
        try:
            port = server.wait_for_port()
            healthy(local(with_option(service_healthcheck(service), "--address", f"127.0.0.1:{port}")), name)
            serves_every_model(f"127.0.0.1:{port}", exported_repository)
            drains_and_exits_cleanly(server, compose_settings(dockerfile, service).grace)
        finally:
            stop(server.proc, signal.SIGKILL)
