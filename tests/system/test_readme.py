"""The README's walkthrough runs as written: its factory file, export and serve commands (a real server process)
and its Python blocks, the SDK and tritonclient streams checked against eager PyTorch. Its links lead to pages
that exist. (The docs pages' code: tests/system/test_docs.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from markdown_blocks import ROOT, Walkthrough, block, commands

README = ROOT / "README.md"


def test_walkthrough_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc")
    walk = Walkthrough(README, tmp_path, "Walkthrough: your own model")
    try:
        out = walk.run_python()
    finally:
        walk.stop()
    assert (tmp_path / "model_repository" / "tagger" / "1" / "model.onnx").is_file()
    # The script's own asserts compared the SDK's and tritonclient's streams with eager PyTorch; it got there.
    (error,) = re.findall(r"max abs error (\S+)", out)
    assert float(error) <= 1e-5


def test_quick_start_has_the_command_ci_runs() -> None:
    quick = commands(block(README, "./scripts/demo.sh", "bash"))
    assert "./scripts/test.sh" in quick
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_links_lead_to_files_that_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert "docs/walkthrough.md" in local
    assert [link for link in local if not (ROOT / link).is_file()] == []
