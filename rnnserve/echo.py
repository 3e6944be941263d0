"""Quoting client-given values in messages, bounded. Shared by the server's statuses and the wire tensor codec
(rnnserve.tensors), which the client SDK uses too, so it lives outside the server package."""

from __future__ import annotations

from collections.abc import Iterable

ECHO_CHARS = 80
"""How much of one client-given value (an id, a name, a version string) a message quotes."""
ECHO_ITEMS = 8
"""How many items of a client-given list (tensor names...) a message quotes."""


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A client-given value as an error message quotes it: at most ``limit`` characters, the cut marked.
    A status message travels in a response header, which clients cap at a few kB: a message that quoted
    a 100 kB session id in full would reach the client as RESOURCE_EXHAUSTED from its own transport."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"


def echo_names(names: Iterable[object]) -> str:
    """A client-given list of names as a message quotes it: the first ``ECHO_ITEMS``, each echoed, and
    how many there are in all."""
    items = list(names)
    shown = ", ".join(repr(echo(n)) for n in items[:ECHO_ITEMS])
    more = f", ... {len(items)} in all" if len(items) > ECHO_ITEMS else ""
    return f"[{shown}{more}]"
