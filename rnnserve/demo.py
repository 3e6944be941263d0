"""``rnnserve demo``: the whole flow on the built-in examples.

Exports every example model (verified against eager PyTorch) into a repository, starts ``rnnserve serve`` on
a free port as a separate process, streams one session per model through the client SDK one timestep at a
time, prints the outputs and checks them against the eager module run over the whole sequence.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("demo_repository"),
        help="where to export the examples (default ./demo_repository; re-exported each run)",
    )
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument("--steps", type=int, default=10, help="timesteps to stream per model (default 10)")
    parser.add_argument("--model", action="append", help="only these examples (repeatable; default all)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rnnserve.bench.procs import rnnserve_server
    from rnnserve.client import Client
    from rnnserve.examples import EXAMPLES
    from rnnserve.export import export_examples

    names = args.model or list(EXAMPLES)
    print(f"[1/3] exporting {len(names)} example(s) to {args.repository} ({args.format})", file=sys.stderr)
    export_examples(args.repository, [args.format], names=names, version=1, overwrite=True)

    print("[2/3] starting rnnserve serve (a separate process)", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="rnnserve-demo-"))
    server = rnnserve_server(args.repository, workdir, tag="demo", max_sessions=1000).start()
    address = server.address
    worst = 0.0
    try:
        print(f"[3/3] streaming {args.steps} steps per model from {address}\n", file=sys.stderr)
        with Client(address) as client:
            for name in names:
                exportable = EXAMPLES[name]()
                info = client.model(name)
                shape = info.inputs[0].shape
                xs = torch.randn((1, args.steps, *shape), generator=torch.Generator().manual_seed(0))
                expected = exportable.reference(xs)[0][0].detach().numpy()
                with client.session(name) as session:
                    ys = np.stack(list(session.stream(xs[0].numpy())))
                err = float(np.abs(ys - expected).max())
                worst = max(worst, err)
                print(
                    f"== {name}: input {list(shape)} -> output {list(info.outputs[0].shape)}, "
                    f"state {info.state_bytes} bytes/session"
                )
                with np.printoptions(precision=4, suppress=True, linewidth=120, threshold=40, edgeitems=3):
                    for t in (0, 1, args.steps - 1):
                        if 0 <= t < args.steps:
                            print(f"   step {t:3d}: {ys[t].reshape(-1)}")
                print(f"   max |server - eager PyTorch| over {args.steps} steps: {err:.2e}\n")
    finally:
        server.stop(grace=10)
    ok = worst <= 1e-5
    print(
        f"{'OK' if ok else 'MISMATCH'}: every streamed output equals eager PyTorch (worst {worst:.2e}, tolerance 1e-5)"
    )
    return 0 if ok else 1
