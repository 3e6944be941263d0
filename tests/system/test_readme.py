"""The README's examples run as written (paths and addresses pointed at temporary ones)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _block(starts_with: str, lang: str = "python") -> str:
    for body in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S):
        if body.lstrip().startswith(starts_with):
            return body
    raise AssertionError(f"README has no {lang} block starting with {starts_with!r}")


def test_export_example_runs_as_written(tmp_path: Path):
    (tmp_path / "my_models.py").write_text(_block("# my_models.py"))
    commands = [line.split("#")[0].strip() for line in _block("rnnserve export my_models.py", "bash").splitlines()]
    first = commands[0]
    assert first == "rnnserve export my_models.py:tagger --repository model_repository --format onnx"
    subprocess.run(first.split(), cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "model_repository" / "tagger" / "1" / "model.onnx").is_file()
    # The Python form of the same export (the next free version, TorchScript).
    script = _block("import torch\nfrom rnnserve.export import export")
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True)
    assert (tmp_path / "model_repository" / "tagger" / "2" / "model.pt").is_file()


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory):
    from conftest import ServerHandle

    from rnnserve.export import export_examples

    repo = tmp_path_factory.mktemp("readme-repo")
    export_examples(repo, ["onnx"], names=["gru2", "bilstm_classifier"], steps=5, progress=False)
    handle = ServerHandle(repo)
    yield handle
    handle.stop()


def test_client_examples_run_as_written(examples_server):
    sync = _block("import numpy as np\nfrom rnnserve.client import Client").replace(
        "localhost:50051", examples_server.address
    )
    # The loop bodies are `...` placeholders: the snippet must run as it stands.
    exec(compile(sync, "README-client", "exec"), {})
    aio = _block("from rnnserve.client import AsyncClient").replace("localhost:50051", examples_server.address)
    prelude = (
        "import asyncio, numpy as np\n"
        "x = np.zeros(16, np.float32)\n"
        "async def readings():\n    for _ in range(5):\n        yield np.ones(16, np.float32)\n"
        "async def main():\n"
    )
    body = "".join(f"    {line}\n" for line in aio.splitlines())
    exec(compile(prelude + body + "asyncio.run(main())\n", "README-async", "exec"), {})


def test_predict_example_runs_as_written(examples_server):
    script = _block("import numpy as np\nfrom rnnserve.client import Client\n\ntokens").replace(
        "localhost:50051", examples_server.address
    )
    scope: dict = {}
    exec(compile(script, "README-predict", "exec"), scope)
    assert scope["probs"].shape == (3, 1) and scope["r"].outputs.shape == (2, 20, 4)
    assert scope["r"].final_state["h"].shape == (2, 2, 32) and not scope["r"].outputs[1, 7:].any()


def test_tritonclient_example_runs_as_written(examples_server):
    pytest.importorskip("tritonclient.grpc")
    script = _block("import numpy as np\nimport tritonclient.grpc").replace("localhost:50051", examples_server.address)
    scope: dict = {}
    exec(compile(script, "README-tritonclient", "exec"), scope)
    ys, results = scope["ys"], scope["results"]
    assert [y.shape for y in ys] == [(1, 4)] * 10
    # Both streamed sequences got the same inputs as the synchronous one: the same outputs, step for step.
    by_id = {r.get_response().id: r.as_numpy("y") for r in results}
    assert len(by_id) == 20
    for seq in ("1", "user-7"):
        np.testing.assert_allclose(np.concatenate([by_id[f"{seq}/{t}"] for t in range(10)]), np.concatenate(ys))


def test_scale_out_command_parses_as_written():
    """The one-machine scale-out command (README: Scaling out) is valid `rnnserve serve` syntax and means what
    the text says: 4 workers from port 50061, nginx on 50051, a shared redis store, every-step durability."""
    import shlex

    from rnnserve.cli import build_parser
    from rnnserve.server.cli import settings_from_args

    block = _block("redis-server --daemonize yes", "bash").replace("\\\n", " ")
    line = next(ln.split("#")[0] for ln in block.splitlines() if ln.startswith("rnnserve serve"))
    args = build_parser(only="serve").parse_args(shlex.split(line)[1:])
    settings = settings_from_args(args)
    assert (settings.workers, settings.port, settings.gateway_port) == (4, 50061, 50051)
    assert settings.session_store == "redis://127.0.0.1:6379/0" and settings.durability == "every-step"
