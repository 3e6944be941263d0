"""``rnnserve serve --help``: flags under their settings' groups, help that names flags (not settings), each
thing said once."""

from __future__ import annotations

import argparse
import re

import pytest

from rnnserve.manifest import ModelManifest
from rnnserve.server import cli
from rnnserve.server.settings import GROUPS, ServerSettings, group_of, in_group


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnserve serve")
    cli.add_arguments(parser)
    return parser


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_flag_is_listed_under_its_settings_group() -> None:
    parser = serve_parser()
    listed = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    for action in flag_actions(parser):
        assert listed[action.dest] == group_of(action.dest), action.option_strings
    # The groups in GROUPS' order, none empty, nothing left in argparse's catch-all group but --help.
    titles = [g.title for g in parser._action_groups if g.title in GROUPS]
    assert titles == list(GROUPS)
    others = [a.dest for g in parser._action_groups if g.title not in GROUPS for a in g._group_actions]
    assert others == ["help"]
    for name in ServerSettings.model_fields:
        assert group_of(name) in GROUPS  # every setting has a home, flag or not


def test_help_names_flags_not_settings() -> None:
    parser = serve_parser()
    texts = [a.help or "" for a in flag_actions(parser)] + [g.description or "" for g in parser._action_groups]
    texts.append(parser.epilog or "")
    # A manifest field of the same name (max_batch_size, ...) may be named: it is the manifest's, not a flag.
    names = [n for n in ServerSettings.model_fields if "_" in n and n not in ModelManifest.model_fields]
    assert "port_file" in names and "tls_key" in names
    for text in texts:
        assert "``" not in text, text
        for name in names:
            assert not re.search(rf"\b{name}\b", text), (name, text)
    help_of = {a.dest: a.help or "" for a in flag_actions(parser)}
    assert "--port-file" in help_of["port"] and "--tls-key" in help_of["tls_cert"]
    # Settings without a flag are still told, by their environment variable.
    assert "RNNSERVE_TOKENS" in (parser.epilog or "")


@pytest.mark.parametrize("dest", ["port", "metrics_port"])
def test_each_flag_says_a_thing_once(dest: str) -> None:
    text = next(a.help or "" for a in flag_actions(serve_parser()) if a.dest == dest)
    assert len(re.findall(r"\b0\b", text)) == 1, text  # what port 0 does, once


def test_a_setting_names_a_known_group() -> None:
    with pytest.raises(ValueError, match="unknown settings group 'nope'"):
        in_group("nope")
