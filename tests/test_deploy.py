"""The Docker image and the compose file agree with the server they run.

No Docker engine runs here, so these tests read ``Dockerfile`` and ``docker-compose.yml``, check each command
line in them against the real ``rnnserve`` parser and the project's extras, and then run those same command
lines as plain processes: export the examples as the image build does, serve them as the compose service does,
probe the server with the compose healthcheck, and stop it with SIGTERM as ``docker stop`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from rnnserve.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
# The console script of the environment running the tests: the same entry point the image's PATH finds.
RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))
CPU_SERVICE = "rnnserve"
# Image targets by onnxruntime flavour: the distribution each must install, and the one it must not.
FLAVOURS = {"cpu": ("onnxruntime", "onnxruntime-gpu"), "gpu": ("onnxruntime-gpu", "onnxruntime")}


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


def gpu_service_name(compose: dict[str, Any]) -> str:
    names = [name for name, svc in compose["services"].items() if "gpu" in svc.get("profiles", [])]
    assert len(names) == 1, f"expected one service in the `gpu` profile, found {names}"
    return names[0]


def argv_of(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def service_argv(dockerfile: Dockerfile, service: dict[str, Any]) -> list[str]:
    """The full command a compose service's container runs: ENTRYPOINT + (compose command or CMD)."""
    target = service["build"]["target"]
    entrypoint = argv_of(service.get("entrypoint") or exec_form(dockerfile.last(target, "ENTRYPOINT"), "ENTRYPOINT"))
    command = service.get("command")
    return entrypoint + (argv_of(command) if command is not None else exec_form(dockerfile.last(target, "CMD"), "CMD"))


def service_healthcheck(service: dict[str, Any]) -> list[str]:
    test = argv_of(service["healthcheck"]["test"])
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    return test[1:] if test[0] == "CMD" else test


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def container_ports(service: dict[str, Any]) -> list[int]:
    ports = []
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            ports.append(int(spec["target"]))
        else:
            ports.append(int(str(spec).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def seconds(duration: str | int | float) -> float:
    """A compose duration (``1m30s``, ``20s``, ``500ms``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"([\d.]+)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


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


def drain_seconds(serve_argv: list[str], env: dict[str, str]) -> float:
    """How long `rnnserve serve` drains on SIGTERM: --grace, else RNNSERVE_GRACE, else the default."""
    from rnnserve.server.settings import ServerSettings

    default = ServerSettings.model_fields["grace"].default
    return float(option(serve_argv, "--grace") or env.get("RNNSERVE_GRACE", default))


def serve_settings() -> set[str]:
    """The settings ``rnnserve serve`` accepts, as argparse dests (each also read from RNNSERVE_<DEST>)."""
    return {k for k in vars(parse(["rnnserve", "serve"])) if not k.startswith("_") and k != "command"}


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- static checks ------------------------------------------------------------------------------------------
def test_services_build_the_matching_targets(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    services = compose["services"]
    cpu, gpu = services[CPU_SERVICE], services[gpu_service_name(compose)]
    assert cpu["build"]["target"] == "cpu" and "profiles" not in cpu
    assert gpu["build"]["target"] == "gpu"
    for service in (cpu, gpu):
        assert service["build"].get("context", ".") == ".", "the Dockerfile needs the repository as context"
        dockerfile.chain(service["build"]["target"])  # the target exists
    assert option(service_argv(dockerfile, gpu), "--device") == "cuda"
    assert option(service_argv(dockerfile, cpu), "--device") in (None, "cpu")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    # `docker build .` with no --target builds the last stage: make that the CPU image.
    assert list(dockerfile.stages)[-1] == "cpu"


def test_every_serve_command_parses(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    commands = [
        exec_form(dockerfile.last(t, "ENTRYPOINT"), "ENTRYPOINT") + exec_form(dockerfile.last(t, "CMD"), "CMD")
        for t in FLAVOURS
    ]
    commands += [service_argv(dockerfile, service) for service in compose["services"].values()]
    for argv in commands:
        assert argv[:2] == ["rnnserve", "serve"], argv
        parse(argv)


def test_every_healthcheck_parses_and_probes_the_served_port(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    checks = [(t, healthcheck_argv(dockerfile.last(t, "HEALTHCHECK")), None) for t in FLAVOURS]
    checks += [(s["build"]["target"], service_healthcheck(s), s) for s in compose["services"].values()]
    for target, argv, service in checks:
        assert argv[:2] == ["rnnserve", "health"], argv
        args = parse(argv)
        host, _, port = args.address.rpartition(":")
        # Inside the container the server listens on 0.0.0.0; the probe goes over loopback.
        assert host in ("127.0.0.1", "localhost"), argv
        serve_argv = (
            service_argv(dockerfile, service)
            if service
            else exec_form(dockerfile.last(target, "ENTRYPOINT"), "ENTRYPOINT")
            + exec_form(dockerfile.last(target, "CMD"), "CMD")
        )
        assert port == option(serve_argv, "--port"), (argv, serve_argv)


def test_ports_agree(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    for target in FLAVOURS:
        exposed = {int(p.split("/")[0]) for line in dockerfile.instructions(target, "EXPOSE") for p in line.split()}
        cmd = exec_form(dockerfile.last(target, "CMD"), "CMD")
        assert exposed == {int(option(cmd, "--port") or 0)}, (target, exposed, cmd)
    for name, service in compose["services"].items():
        port = option(service_argv(dockerfile, service), "--port")
        assert port is not None, f"{name}: pass --port explicitly, so the port mapping cannot drift"
        # The gRPC port, then the metrics port when the service turns metrics on.
        metrics = service_environment(service).get("RNNSERVE_METRICS_PORT")
        assert container_ports(service) == [int(port)] + ([int(metrics)] if metrics else []), name
        exposed = {int(p.split("/")[0]) for p in dockerfile.instructions(service["build"]["target"], "EXPOSE")}
        assert int(port) in exposed, name
    published = [str(p).rsplit(":", 1)[0] for s in compose["services"].values() for p in s["ports"]]
    assert len(published) == len(set(published)), f"two services publish the same host port: {published}"


def test_served_repository_is_the_exported_one(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    for target in FLAVOURS:
        exports = rnnserve_runs(dockerfile, target, "export")
        assert len(exports) == 1, f"{target}: expected one `rnnserve export` RUN, found {exports}"
        export_repo = option(exports[0], "--repository")
        parse(exports[0])
        assert export_repo and export_repo.startswith("/"), exports[0]
        assert option(exec_form(dockerfile.last(target, "CMD"), "CMD"), "--repository") == export_repo
        for name, service in compose["services"].items():
            if service["build"]["target"] == target:
                assert option(service_argv(dockerfile, service), "--repository") == export_repo, name


def test_compose_environment_names_serve_settings(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    settings = serve_settings()
    for name, service in compose["services"].items():
        env = {k: v for k, v in service_environment(service).items() if k.startswith("RNNSERVE_")}
        assert env, f"{name}: expected RNNSERVE_* settings"
        for key, value in env.items():
            setting = key.removeprefix("RNNSERVE_").lower()
            assert setting in settings, f"{name}: {key} is no `rnnserve serve` setting ({sorted(settings)})"
            # The value must be one the flag accepts (types and choices).
            parse(["rnnserve", "serve", f"--{setting.replace('_', '-')}", value])


def test_stop_grace_period_outlasts_the_drain(dockerfile: Dockerfile, compose: dict[str, Any]) -> None:
    # docker stop sends SIGTERM, then SIGKILL after stop_grace_period (default 10s): the server's drain
    # (--grace) must end before that, or in-flight calls are cut and the exit is not clean.
    for name, service in compose["services"].items():
        grace = drain_seconds(service_argv(dockerfile, service), service_environment(service))
        assert seconds(service.get("stop_grace_period", "10s")) > grace + 2, name
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name


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


def cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def wait_for_port(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text().strip() if path.exists() else ""
        if text.isdigit():  # written after the server listens; may be caught half-written
            return int(text)
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before listening:\n{log.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"server wrote no port file in {timeout}s:\n{log.read_text()}")


@pytest.mark.parametrize(
    "service_kind",
    ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA")])],
)
def test_compose_service_runs_as_plain_processes(
    dockerfile: Dockerfile, compose: dict[str, Any], exported_repository: Path, tmp_path: Path, service_kind: str
) -> None:
    service = compose["services"][CPU_SERVICE if service_kind == "cpu" else gpu_service_name(compose)]
    argv = service_argv(dockerfile, service)
    # The container's command, pointed at the exported folder and at a free port it reports in a file.
    port_file = tmp_path / "port"
    argv = with_option(argv, "--repository", str(exported_repository))
    argv = with_option(with_option(argv, "--port", "0"), "--port-file", str(port_file))
    argv = with_option(argv, "--host", "127.0.0.1")  # nothing outside this machine needs to reach it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env.update(service_environment(service))
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(local(argv), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        port = wait_for_port(port_file, proc, log)
        health = service_healthcheck(service)
        health = with_option(health, "--address", f"127.0.0.1:{port}")
        done = subprocess.run(local(health), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"healthcheck {shlex.join(health)} failed:\n{done.stdout}{done.stderr}"
        # The server serves every model the build exported.
        done = subprocess.run(
            local(["rnnserve", "models", "--address", f"127.0.0.1:{port}"]), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        exported = {p.parent.parent.name for p in exported_repository.glob("*/*/manifest.json")}
        assert [m for m in sorted(exported) if m not in done.stdout] == [], done.stdout
        # docker stop: SIGTERM, then the server drains for --grace seconds and exits 0.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=drain_seconds(argv, env) + 10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
