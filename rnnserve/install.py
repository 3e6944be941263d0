"""How to install rnnserve, worded once for every message that says what is missing.

rnnserve is not on PyPI: it installs from a checkout of its repository, or from a wheel built there. Extras
that bring torch go through the checkout's constraints file, which pins the torch build to install.
Imports nothing heavy: the client SDK and ``rnnserve --help`` use it on the base install.
"""

from __future__ import annotations

from rnnserve import __version__

SERVER_EXTRAS = "server,export"
"""The extras that ``rnnserve export``, ``serve``, ``demo`` and ``bench`` need beyond the client SDK."""


def install_hint(extras: str = SERVER_EXTRAS) -> str:
    """The pip commands that install rnnserve with ``extras`` ("" for the client SDK alone), from a checkout
    or from a wheel built in one; with the constraints file whenever extras are asked for (they bring torch)."""
    spec = f"[{extras}]" if extras else ""
    pins = "-c constraints.txt " if extras else ""
    wheel = f"dist/rnnserve-{__version__}-py3-none-any.whl"
    return (
        f"in a checkout of rnnserve run `pip install {pins}-e '.{spec}'`, or build a wheel there "
        f"(`pip wheel --no-deps -w dist .`) and run `pip install {pins}'{wheel}{spec}'`"
    )
