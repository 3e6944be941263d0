"""``rnnserve demo``: the whole flow on the built-in examples.

Exports every example model (verified against eager PyTorch) into a repository, starts ``rnnserve serve`` on
a free port as a separate process, streams one session per step model through the client SDK one timestep at a
time (a whole-sequence model gets a batch of sequences through Predict instead), prints the outputs and checks
them against the eager module run over the whole sequence.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from rnnserve.bench.procs import rnnserve_server
from rnnserve.client import Client

# Imported with the module (torch): on a client-only install ``rnnserve demo`` then says what to install.
from rnnserve.examples import EXAMPLES, SEQUENCE_EXAMPLES
from rnnserve.export import export_examples
from rnnserve.export.sequence import random_batch

TOLERANCE = 1e-5
SEQUENCES = 4  # whole sequences per Predict call for a sequence model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("demo_repository"),
        help="where to export the examples (default ./demo_repository; re-exported each run)",
    )
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    parser.add_argument(
        "--steps", type=int, default=10, help="timesteps to stream per model, or longest sequence (default 10)"
    )
    known = [*EXAMPLES, *SEQUENCE_EXAMPLES]
    parser.add_argument(
        "--model",
        action="append",
        choices=known,
        metavar="NAME",
        help=f"only these examples (repeatable; default all): {', '.join(known)}",
    )


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        print(f"rnnserve demo: error: --steps {args.steps}: give at least 1", file=sys.stderr)
        return 2
    names = list(dict.fromkeys(args.model or [*EXAMPLES, *SEQUENCE_EXAMPLES]))
    print(f"[1/3] exporting {len(names)} example(s) to {args.repository} ({args.format})", file=sys.stderr)
    export_examples(args.repository, [args.format], names=names, version=1, overwrite=True)

    print("[2/3] starting rnnserve serve (a separate process)", file=sys.stderr)
    worst = 0.0
    # The server's port file and log live only as long as the demo (a failed start shows the log's tail).
    with tempfile.TemporaryDirectory(prefix="rnnserve-demo-") as workdir:
        server = rnnserve_server(args.repository, Path(workdir), tag="demo", max_sessions=1000).start()
        try:
            print(f"[3/3] streaming {args.steps} steps per model from {server.address}\n", file=sys.stderr)
            with Client(server.address) as client:
                for name in names:
                    demo = _predict_sequences if name in SEQUENCE_EXAMPLES else _stream_session
                    worst = max(worst, demo(client, name, args.steps))
        finally:
            server.stop(grace=10)
    ok = worst <= TOLERANCE
    print(
        f"{'OK' if ok else 'MISMATCH'}: every output equals eager PyTorch (worst {worst:.2e}, tolerance {TOLERANCE:g})"
    )
    return 0 if ok else 1


def _stream_session(client: Client, name: str, steps: int) -> float:
    """One session of a step model, streamed one timestep at a time; its worst error against eager PyTorch."""
    exportable = EXAMPLES[name]()
    info = client.model(name)
    shape = info.inputs[0].shape
    xs = torch.randn((1, steps, *shape), generator=torch.Generator().manual_seed(0))
    expected = exportable.reference(xs)[0][0].detach().numpy()
    with client.session(name) as session:
        ys = np.stack(list(session.stream(xs[0].numpy())))
    err = float(np.abs(ys - expected).max())
    print(
        f"== {name}: input {list(shape)} -> output {list(info.outputs[0].shape)}, "
        f"state {info.state_bytes} bytes/session"
    )
    with _printing():
        for t in sorted({0, 1, steps - 1} & set(range(steps))):
            print(f"   step {t:3d}: {ys[t].reshape(-1)}")
    print(f"   max |server - eager PyTorch| over {steps} steps: {err:.2e}\n")
    return err


def _predict_sequences(client: Client, name: str, steps: int) -> float:
    """A batch of whole sequences (up to ``steps`` long) through Predict, as a sequence model is served (it
    takes no sessions); their worst error against the eager model."""
    exportable = SEQUENCE_EXAMPLES[name]()
    info = client.model(name)
    tokens, lengths = random_batch(SEQUENCES, steps, exportable.vocab_size, torch.Generator().manual_seed(0))
    ys = client.predict(name, tokens.numpy(), lengths.numpy()).outputs
    with torch.no_grad():
        expected = exportable.model(tokens, lengths).numpy()
    err = float(np.abs(ys - expected).max())
    print(
        f"== {name}: a whole-sequence model (Predict, no session): {info.inputs[0].name} -> "
        f"{info.outputs[0].name} {list(info.outputs[0].shape)}"
    )
    with _printing():
        for i, length in enumerate(lengths.tolist()):
            print(f"   sequence {i} ({length:3d} tokens): {ys[i].reshape(-1)}")
    print(f"   max |server - eager PyTorch| over {SEQUENCES} sequences: {err:.2e}\n")
    return err


def _printing() -> contextlib.AbstractContextManager[object]:
    return np.printoptions(precision=4, suppress=True, linewidth=120, threshold=40, edgeitems=3)
