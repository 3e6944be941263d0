"""Regenerate the checked-in deployment files that are rendered from code: ``deploy/nginx/nginx.conf``, the
docker compose gateway's configuration, is ``rnnserve.gateway.render_nginx_config`` for the compose replicas.

tests/system/test_deploy.py fails when a checked-in file drifts from what this script writes, and checks that
docker-compose.yml's replica services and gateway port are the ones named here.

Usage: python scripts/gen_deploy.py [--check] [--root DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = Path("deploy/nginx/nginx.conf")
# docker-compose.yml's replica services (compose DNS names) and the port each serves gRPC on.
REPLICAS = ["rnnserve-1:50051", "rnnserve-2:50051", "rnnserve-3:50051"]
# The port nginx listens on inside the gateway container (compose publishes it as localhost:50051).
GATEWAY_PORT = 8001


def rendered() -> dict[Path, str]:
    """Each generated file (relative to the repository root) and the text it must have."""
    from rnnserve.gateway import render_nginx_config

    # prefix None: the nginx image's compiled-in pid and temp paths.
    return {NGINX_CONF: render_nginx_config(REPLICAS, port=GATEWAY_PORT)}


def stale(root: Path) -> list[Path]:
    """The generated files under ``root`` that are missing or differ from what this script writes."""
    return [
        path for path, text in rendered().items() if not (root / path).is_file() or (root / path).read_text() != text
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a checked-in file is stale; write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    outdated = stale(args.root)
    if args.check:
        if outdated:
            print(f"stale: {', '.join(map(str, outdated))}; run: python scripts/gen_deploy.py", file=sys.stderr)
            return 1
        print("deployment files are up to date")
        return 0
    for path, text in rendered().items():
        if path in outdated:
            (args.root / path).parent.mkdir(parents=True, exist_ok=True)
            (args.root / path).write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
