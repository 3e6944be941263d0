"""``rnnserve health`` / ``rnnserve models``, and the client working without torch, onnxruntime or pydantic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rnnserve.cli import main
from rnnserve.install import install_hint
from rnnserve.proto import rnnserve_pb2 as pb
from rnnserve.proto import rnnserve_pb2_grpc as pb_grpc

SERVICE = "rnnserve.v1.RnnServe"
LSTM = pb.ModelInfo(
    name="lstm",
    version=2,
    format="onnx",
    state="READY",
    inputs=[pb.TensorSpec(name="x", dtype=pb.FLOAT32, shape=[3])],
    outputs=[pb.TensorSpec(name="y", dtype=pb.FLOAT32, shape=[-1])],
    states=[pb.StateSpec(name="h", output_name="h_out", dtype=pb.FLOAT16, shape=[1, 8])],
    state_bytes=16,
)


class ModelsOnly(pb_grpc.RnnServeServicer):
    """Test double answering ListModels only."""

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[LSTM])


@pytest.fixture
def server() -> Iterator[tuple[str, health.HealthServicer]]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, srv)
    pb_grpc.add_RnnServeServicer_to_server(ModelsOnly(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    checker.set("", health_pb2.HealthCheckResponse.SERVING)
    checker.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    yield f"127.0.0.1:{port}", checker
    srv.stop(None)


def test_health_exit_codes(server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture) -> None:
    address, checker = server
    assert main(["health", "--address", address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"

    assert main(["health", "--address", address, "--service", SERVICE]) == 1
    assert f"service '{SERVICE}' at {address}: NOT_SERVING" in capsys.readouterr().err

    checker.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert main(["health", "--address", address, "--service", SERVICE]) == 0

    assert main(["health", "--address", address, "--service", "other"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_health_without_a_server_fails_fast(capsys: pytest.CaptureFixture) -> None:
    assert main(["health", "--address", "127.0.0.1:1", "--timeout", "3"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_health_address_from_environment(
    server: tuple[str, health.HealthServicer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RNNSERVE_ADDRESS", server[0])
    assert main(["health"]) == 0


def test_models_table_and_json(server: tuple[str, health.HealthServicer], capsys: pytest.CaptureFixture) -> None:
    address, _ = server
    assert main(["models", "--address", address]) == 0
    out = capsys.readouterr().out
    assert "lstm:2  READY  onnx" in out
    assert "inputs:  x: float32[3]" in out and "outputs: y: float32[?]" in out
    assert "states:  h: float16[1, 8]" in out

    assert main(["models", "--address", address, "--json"]) == 0
    (model,) = json.loads(capsys.readouterr().out)
    assert model["name"] == "lstm" and model["inputs"] == [{"name": "x", "dtype": "float32", "shape": [3]}]

    assert main(["models", "--address", "127.0.0.1:1", "--timeout", "3"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


# A client-only install, as far as imports go: the server's and exporter's dependencies cannot be imported.
BLOCK_HEAVY = textwrap.dedent(
    """
    import sys

    BLOCKED = {"torch", "onnxruntime", "onnx", "pydantic", "pydantic_settings"}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)  # as when not installed
            return None

    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        assert name.split(".")[0] not in BLOCKED, name
    """
)

NO_HEAVY_DEPS = BLOCK_HEAVY + textwrap.dedent(
    """
    import numpy as np
    import rnnserve.client
    from rnnserve.client import *  # noqa: F403
    from rnnserve.cli import main

    address = sys.argv[1]
    with Client(address, timeout=10) as c:
        assert c.health() == "SERVING"
        (m,) = c.list_models()
        assert m.name == "lstm" and m.inputs[0].dtype == "float32"
        try:
            c.open_session("lstm")
        except RnnServeError as err:
            assert err.code.name == "UNIMPLEMENTED", err
    assert main(["health", "--address", address]) == 0
    assert main(["models", "--address", address]) == 0
    loaded = sorted({n.split(".")[0] for n in sys.modules} & BLOCKED)
    assert not loaded, loaded
    print("client ok", len(rnnserve.client.__all__))
    """
)


def test_client_needs_no_torch_onnxruntime_or_pydantic(server: tuple[str, health.HealthServicer]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", NO_HEAVY_DEPS, server[0]], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "client ok" in proc.stdout


# Each command that needs the server and export extras, run on the client-only install above.
EXTRAS_COMMANDS = BLOCK_HEAVY + textwrap.dedent(
    """
    from rnnserve.cli import main

    for argv in (["demo"], ["bench", "--quick"], ["export", "--all-examples", "--repository", "r"], ["serve"]):
        print(argv[0], main(argv), file=sys.stderr)
    """
)


def test_commands_needing_the_extras_say_how_to_install_them_on_a_client_only_install(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", EXTRAS_COMMANDS], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    hint = install_hint()
    assert "pip install -c constraints.txt -e '.[server,export]'" in hint  # from a checkout, torch pinned
    for command in ("demo", "bench", "export", "serve"):
        assert f"\n{command} 2\n" in f"\n{proc.stderr}", proc.stderr
        assert f"rnnserve {command}: missing dependency (No module named " in proc.stderr
        assert f"It needs the server and export extras: {hint}" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # none of them got as far as writing anything
