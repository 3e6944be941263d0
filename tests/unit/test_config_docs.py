"""docs/configuration.md is what scripts/gen_config_docs.py generates from the server's settings and flags."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from rnnserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
assert _spec is not None and _spec.loader is not None
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def test_page_is_what_the_code_generates() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == gen.render(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


def test_every_setting_and_flag_is_on_the_page() -> None:
    page = gen.render()
    for name in ServerSettings.model_fields:
        assert f"`RNNSERVE_{name.upper()}`" in page, name
    for action in gen.serve_parser()._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in page, flag


def test_each_argument_group_is_a_section() -> None:
    parser = argparse.ArgumentParser()
    network = parser.add_argument_group("network", "Where the server listens.")
    network.add_argument("--port", dest="port", type=int, metavar="PORT")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-sessions", dest="max_sessions", type=int, metavar="N")
    page = gen.render(parser)
    assert "## Network\n\nWhere the server listens.\n\n| flag |" in page
    assert "| `--port PORT` | `RNNSERVE_PORT` | `50051` | gRPC port;" in page
    assert page.index("## Network") < page.index("## Limits") < page.index("`--max-sessions N`")
    # The settings no flag of this parser sets are listed by their environment variable alone.
    assert "| `RNNSERVE_HOST` | `0.0.0.0` |" in page.split("## Environment only")[1]
