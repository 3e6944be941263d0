"""The code blocks of the README and the docs pages, and a runner for a walkthrough: write its files, run its
``rnnserve export`` commands, start its ``rnnserve serve`` command as a process, then run its Python blocks in
order as one script, as a reader would (tests/system/test_readme.py, tests/system/test_docs.py)."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ADDRESS = "localhost:50051"  # what the examples connect to; tests point it at a server of their own

# A Python block that awaits runs inside this prelude: the names the asyncio examples leave to the reader.
ASYNC_PRELUDE = """\
import asyncio
import numpy as np

x = np.zeros(16, np.float32)


async def readings():
    for _ in range(5):
        yield np.ones(16, np.float32)


async def main():
"""


def code_blocks(path: Path, section: str | None = None) -> list[tuple[str, str]]:
    """Every fenced block of a markdown file (or of its ``## section``) as ``(language, body)``, in order."""
    text = path.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def block(path: Path, starts_with: str, lang: str = "python") -> str:
    for found, body in code_blocks(path):
        if found == lang and body.lstrip().startswith(starts_with):
            return body
    raise AssertionError(f"{path.name} has no {lang} block starting with {starts_with!r}")


def commands(body: str) -> list[str]:
    """A shell block's commands, without comments and continuation lines joined."""
    lines = [line.split("#")[0].strip() for line in body.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line]


def is_async(body: str) -> bool:
    return bool(re.search(r"^(async with|async for|await |\S.*\bawait )", body, flags=re.M))


def python_script(bodies: list[str], address: str) -> str:
    """The blocks as one script, in order, pointed at ``address``; a block that awaits runs in an event loop."""
    parts = []
    for body in bodies:
        body = body.replace(ADDRESS, address)
        if is_async(body):
            inner = "".join(f"    {line}\n" for line in body.splitlines())
            body = ASYNC_PRELUDE + inner + "\n\nasyncio.run(main())\n"
        parts.append(body)
    return "\n".join(parts)


def run_python(script: str, cwd: Path, name: str) -> str:
    """Run ``script`` as a file in ``cwd`` (so the reader's own modules import); return its stdout."""
    path = cwd / f"{name}.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, path.name], cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def rnnserve(argv: list[str]) -> list[str]:
    """A documented ``rnnserve ...`` command as this interpreter runs it (no PATH lookup)."""
    assert argv[0] == "rnnserve", argv
    return [sys.executable, "-m", "rnnserve.cli", *argv[1:]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    from rnnserve.client import Client, RnnServeError

    deadline = time.monotonic() + timeout
    with Client(address, timeout=2, retries=0) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"rnnserve serve exited with {proc.returncode}"
            try:
                if client.health() == "SERVING":
                    return
            except RnnServeError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"no server answered at {address} within {timeout} s")


class Walkthrough:
    """A page's walkthrough (the whole page, or its ``## section``) in ``workdir``: its ``# FILE.py`` blocks
    written, its ``rnnserve export`` commands run, and its ``rnnserve serve`` command running as a process on a
    free port, until ``stop``."""

    def __init__(self, page: Path, workdir: Path, section: str | None = None) -> None:
        self.page, self.workdir = page, workdir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server: subprocess.Popen | None = None
        self.python: list[str] = []
        for lang, body in code_blocks(page, section):
            first = body.lstrip().splitlines()[0] if body.strip() else ""
            if lang == "python" and re.fullmatch(r"# \w+\.py", first):
                (workdir / first[2:]).write_text(body)
            elif lang == "python":
                self.python.append(body)
            elif lang == "bash":
                for command in commands(body):
                    self._shell(command)

    def _shell(self, command: str) -> None:
        argv = command.replace("50051", str(self.port)).split()
        if argv[:2] == ["rnnserve", "export"]:
            done = subprocess.run(rnnserve(argv), cwd=self.workdir, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        elif argv[:2] == ["rnnserve", "serve"]:
            assert self.server is None, "one server per walkthrough"
            log = (self.workdir / "serve.log").open("wb")
            self.server = subprocess.Popen(rnnserve(argv), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
            wait_serving(self.address, self.server)
        else:
            raise AssertionError(f"{self.page.name}: no runner for the command {command!r}")

    def run_python(self) -> str:
        """The page's Python blocks, in order, as one script against the walkthrough's server."""
        return run_python(python_script(self.python, self.address), self.workdir, "walkthrough")

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
