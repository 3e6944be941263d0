"""Regenerate the checked-in gRPC/protobuf code under proto/ from the .proto sources.

The generated code is committed (so a plain install needs no grpcio-tools); tests/system/test_protos.py fails when
it drifts from the sources. The sources are compiled with ``rnnserve/proto`` as their virtual proto root,
so generated imports read ``from rnnserve.proto import ...`` and need no patching.

Usage: python scripts/gen_protos.py [--check]
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
VIRTUAL_ROOT = "rnnserve/proto"


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto/*.proto into out_dir; return the generated files."""
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    sources = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{VIRTUAL_ROOT}={PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[f"{VIRTUAL_ROOT}/{p.name}" for p in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    return sorted((out_dir / VIRTUAL_ROOT).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = [
            p.name
            for p in generated
            if not (PROTO_DIR / p.name).exists() or not filecmp.cmp(p, PROTO_DIR / p.name, shallow=False)
        ]
        if args.check:
            if stale:
                print(f"stale generated code: {', '.join(stale)}; run: python scripts/gen_protos.py")
                return 1
            print("generated code is up to date")
            return 0
        for p in generated:
            shutil.copyfile(p, PROTO_DIR / p.name)
        print(f"wrote {len(generated)} files to {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
