"""The docs pages' code runs as written: every Python block (one script per page, in order), the walkthrough's
commands with a real server process, the documented unload commands, the manifest examples and the scale-out
command. Servers are shared per module: the built-in examples in process, the walkthrough's as a process."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from markdown_blocks import DOCS, Walkthrough, block, code_blocks, commands, python_script, rnnserve, run_python

# The pages whose Python blocks the tests below run, every block of each.
RUN_PAGES = {"walkthrough.md", "exporting.md", "client.md", "predict.md", "kserve.md"}
# Pages whose Python blocks another module runs: manifest.md's streaming VAD example needs the models of
# tests/streaming_models.py (tests/integration/test_streaming_models.py runs it as written).
RUN_ELSEWHERE = {"manifest.md"}


def page_python(name: str) -> list[str]:
    return [body for lang, body in code_blocks(DOCS / name) if lang == "python"]


@pytest.fixture(scope="module")
def examples_server(tmp_path_factory: pytest.TempPathFactory):
    from conftest import ServerHandle

    from rnnserve.export import export_examples

    repo = tmp_path_factory.mktemp("docs-repo")
    export_examples(repo, ["onnx"], names=["gru2", "bilstm_classifier"], steps=5, progress=False)
    handle = ServerHandle(repo)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walkthrough]:
    walk = Walkthrough(DOCS / "walkthrough.md", tmp_path_factory.mktemp("walkthrough"))
    yield walk
    walk.stop()


def test_every_python_block_is_on_a_page_that_runs() -> None:
    with_python = {page.name for page in DOCS.glob("*.md") if page_python(page.name)}
    assert with_python <= RUN_PAGES | RUN_ELSEWHERE, "run the new page's Python blocks in this module"


def test_walkthrough_runs_as_written(walkthrough: Walkthrough) -> None:
    pytest.importorskip("tritonclient.grpc")
    out = walkthrough.run_python()
    (error,) = re.findall(r"max abs error (\S+)", out)
    assert float(error) <= 1e-5
    assert (walkthrough.workdir / "model_repository" / "tagger" / "1" / "model.onnx").is_file()


def test_exporting_page_runs_in_the_walkthrough_folder(walkthrough: Walkthrough) -> None:
    repo = walkthrough.workdir / "model_repository" / "tagger"
    before = {p.name for p in repo.iterdir()}
    # --all-examples exports every example: tests/system/test_examples.py runs that command.
    (command,) = [c for c in commands(block(DOCS / "exporting.md", "rnnserve export", "bash")) if "--all" not in c]
    done = subprocess.run(rnnserve(command.split()), cwd=walkthrough.workdir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run_python(python_script(page_python("exporting.md"), walkthrough.address), walkthrough.workdir, "exporting")
    # The command and the Python form each added the next free version: ONNX, then TorchScript.
    new = sorted({p.name for p in repo.iterdir()} - before, key=int)
    assert len(new) == 2
    assert (repo / new[0] / "model.onnx").is_file() and (repo / new[1] / "model.pt").is_file()


def test_client_page_runs_as_written(examples_server, tmp_path: Path) -> None:
    # The sync example, a session from initial_state=, and the asyncio example (run with x and readings()).
    bodies = page_python("client.md")
    assert any("initial_state=" in b for b in bodies) and any("AsyncClient" in b for b in bodies)
    run_python(python_script(bodies, examples_server.address), tmp_path, "client")


def test_predict_page_runs_as_written(examples_server, tmp_path: Path) -> None:
    check = (
        "\nassert probs.shape == (3, 1) and r.outputs.shape == (2, 20, 4)"
        "\nassert r.final_state['h'].shape == (2, 2, 32) and not r.outputs[1, 7:].any()\n"
    )
    run_python(python_script(page_python("predict.md"), examples_server.address) + check, tmp_path, "predict")


def test_kserve_page_runs_as_written(examples_server, tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc")
    # Both streamed sequences got the same inputs as the synchronous one: the same outputs, step for step.
    check = """
assert [y.shape for y in ys] == [(1, 4)] * 10
by_id = {r.get_response().id: r.as_numpy("y") for r in results}
assert len(by_id) == 20
for seq in ("1", "user-7"):
    np.testing.assert_allclose(np.concatenate([by_id[f"{seq}/{t}"] for t in range(10)]), np.concatenate(ys))
"""
    run_python(python_script(page_python("kserve.md"), examples_server.address) + check, tmp_path, "kserve")


def test_unload_commands_do_what_the_page_says(server_factory, tmp_path: Path) -> None:
    """Without --force an unload is refused while a session is open, and changes nothing; with --force it ends
    that session, whose next call says the model was unloaded."""
    import grpc
    import numpy as np

    from rnnserve.client import Client, RnnServeError
    from rnnserve.export import export_examples

    export_examples(tmp_path, ["onnx"], names=["gru2"], steps=5, progress=False)
    server = server_factory(tmp_path)
    refused, forced = commands(block(DOCS / "repository.md", "rnnserve unload", "bash"))
    env = {**os.environ, "RNNSERVE_ADDRESS": server.address}

    def run(command: str) -> subprocess.CompletedProcess[str]:
        argv = shlex.split(command.replace("HOST:PORT", server.address))
        return subprocess.run(rnnserve(argv), env=env, capture_output=True, text=True, timeout=60)

    with Client(server.address) as client:
        s = client.session("gru2", version=1)
        done = run(refused)
        assert done.returncode == 1 and "FAILED_PRECONDITION" in done.stderr and "open session" in done.stderr
        s.step(np.zeros(16, np.float32))  # nothing changed: the session still steps
        done = run(forced)
        assert done.returncode == 0 and "ended 1 open session(s)" in done.stdout, done.stdout + done.stderr
        with pytest.raises(RnnServeError) as err:
            s.step(np.zeros(16, np.float32))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "was unloaded (forced); open a new session" in err.value.message


def test_manifest_examples_are_valid_manifests() -> None:
    from rnnserve.manifest import Durability, ModelManifest

    examples = [json.loads(body) for lang, body in code_blocks(DOCS / "manifest.md") if lang == "json"]
    assert [m["name"] for m in examples] == ["gru2", "vendor", "vad"]
    for example in examples:
        ModelManifest.model_validate(example)
    fragments = [body for lang, body in code_blocks(DOCS / "durability.md") if lang == "json"]
    for line in "".join(fragments).splitlines():
        Durability.model_validate(json.loads("{" + line + "}")["durability"])


def test_scale_out_command_parses_as_written() -> None:
    """The one-machine scale-out command is valid `rnnserve serve` syntax and means what the page says: 4 workers
    from port 50061, nginx on 50051, a shared redis store, every-step durability."""
    from rnnserve.cli import build_parser
    from rnnserve.server.cli import settings_from_args

    body = block(DOCS / "deployment.md", "redis-server --daemonize yes", "bash")
    line = next(c for c in commands(body) if c.startswith("rnnserve serve"))
    args = build_parser(only="serve").parse_args(shlex.split(line)[1:])
    settings = settings_from_args(args)
    assert (settings.workers, settings.port, settings.gateway_port) == (4, 50061, 50051)
    assert settings.session_store == "redis://127.0.0.1:6379/0" and settings.durability == "every-step"


def test_models_listing_is_what_the_command_prints(examples_server) -> None:
    """The `rnnserve models` listing on the repository page is the command's output for those two examples."""
    shown = block(DOCS / "repository.md", "bilstm_classifier:1", "text")
    argv = ["rnnserve", "models", "--address", examples_server.address]
    done = subprocess.run(rnnserve(argv), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Open sessions depend on what the other tests left open; the rest is the listing as documented.
    assert re.sub(r"sessions=\d+", "sessions=0", done.stdout) == shown
