"""``rnnserve bench``: measure rnnserve against ceilings measured in the same run, on the same machine.

Phases: (1) compute ceiling, the artifact called in-process at batch 1..max; (2) transport ceiling, a bare
grpc.aio echo service with rnnserve's message sizes and the same client; (3) rnnserve with N sessions, one
closed-loop stream each; (4) multiplexed messages and chunked timesteps; (5) idle capacity, memory per open
session; (6) scale-out, N server processes behind the nginx gateway versus one (needs redis-server and nginx;
skipped, with the reason, without them). Every row carries its ratio to the relevant ceiling; the summary marks
the Triton-style targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

# Full-run defaults and --quick (smoke test) defaults; an explicit flag wins over both.
DEFAULTS: dict[str, Any] = {
    "sessions": [1, 16, 64, 256, 1024],
    "max_batch": 1024,
    "mux_sessions": 256,
    "chunk_sessions": 256,
    "chunk": 16,
    "idle_sessions": 100_000,
    "step_budget": 24_000,
    "min_steps": 20,
    "max_steps": 3_000,
    "compute_seconds": 1.0,
    "phase_timeout": 300.0,
    "scale_sessions": 256,
    "scale_workers": 0,  # 0: the CPU count, at least 2
}
QUICK: dict[str, Any] = {
    "sessions": [1, 4],
    "max_batch": 8,
    "mux_sessions": 4,
    "chunk_sessions": 4,
    "chunk": 4,
    "idle_sessions": 1_000,
    "step_budget": 200,
    "min_steps": 10,
    "max_steps": 200,
    "compute_seconds": 0.05,
    "phase_timeout": 60.0,
    "scale_sessions": 4,
    "scale_workers": 2,
}
# The phases --phases and --skip choose from; the compute ceiling always runs (every other ceiling's base).
PHASES = ("transport", "rnnserve", "idle", "scale")


def _phase_list(text: str) -> list[str]:
    values = [v for v in text.replace(",", " ").split() if v]
    unknown = [v for v in values if v not in PHASES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"expected phases out of {', '.join(PHASES)}, got {text!r}")
    return values


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("session counts are positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (default: the 2-layer LSTM(64->256)+Linear(256->32), exported here)")
    model.add_argument("--repository", type=Path, metavar="DIR", help="bench a model from this repository")
    model.add_argument("--model", metavar="NAME", help="model name in --repository (default: its only model)")
    model.add_argument("--version", type=int, default=0, help="model version (default: newest)")

    load = parser.add_argument_group("load")
    load.add_argument(
        "--sessions",
        type=_int_list,
        metavar="N,N,...",
        help="concurrent sessions, one stream each (default 1,16,64,256,1024)",
    )
    load.add_argument(
        "--steps", type=int, metavar="T", help="timesteps per session (default: about --step-budget steps per phase)"
    )
    load.add_argument(
        "--step-budget", type=int, metavar="STEPS", help="steps per phase when --steps is not given (default 24000)"
    )
    load.add_argument(
        "--max-batch",
        type=int,
        metavar="B",
        help="largest compute batch; also the default model's max_batch_size (default 1024)",
    )
    load.add_argument(
        "--mux-sessions", type=int, metavar="N", help="sessions whose step t travels in one message (default 256)"
    )
    load.add_argument("--chunk-sessions", type=int, metavar="N", help="sessions of the chunked phase (default 256)")
    load.add_argument("--chunk", type=int, metavar="C", help="timesteps per message in the chunked phase (default 16)")
    load.add_argument(
        "--idle-sessions", type=int, metavar="N", help="sessions opened for the idle-capacity phase (default 100000)"
    )
    load.add_argument(
        "--client-procs",
        type=int,
        default=0,
        metavar="P",
        help="load generator processes (default: half the CPUs, 1..4)",
    )
    load.add_argument("--compute-seconds", type=float, metavar="S", help="time per compute batch size (default 1.0)")
    load.add_argument("--phase-timeout", type=float, metavar="S", help="abort a phase after this long (default 300)")
    load.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `rnnserve serve` argument (repeatable), e.g. --server-arg=--max-queue-delay-us=200",
    )
    load.add_argument(
        "--scale-sessions",
        type=int,
        metavar="N",
        help="sessions of the scale phase, one stream each, as the per-session rows (default 256)",
    )
    load.add_argument(
        "--scale-workers",
        type=int,
        metavar="N",
        help="server processes of the scale phase's multi-process row (default: the CPU count, at least 2)",
    )
    load.add_argument(
        "--phases",
        type=_phase_list,
        metavar="P,P,...",
        help=f"run only these phases (of {','.join(PHASES)}; default all); the compute ceiling always runs",
    )
    load.add_argument("--skip", action="append", default=[], choices=PHASES, help="skip a phase (repeatable)")

    out = parser.add_argument_group("output")
    out.add_argument("--quick", action="store_true", help="tiny model and sizes, few steps (smoke test)")
    out.add_argument("--json", type=Path, metavar="FILE", help="write every row, ratio and target as JSON")
    out.add_argument("--markdown", action="store_true", help="print the table as markdown")
    out.add_argument("--workdir", type=Path, metavar="DIR", help="keep the exported model and server logs here")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    out.add_argument("--peer", choices=["triton"], help="also run the Triton peer (needs /tmp/venv-triton)")
    out.add_argument("--check-targets", action="store_true", help="exit 1 when a target FAILs")


def _machine() -> dict[str, Any]:
    import grpc
    import numpy
    import onnxruntime

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }


def _finite(value: Any) -> Any:
    """JSON without NaN/Infinity (null instead), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    base = QUICK if args.quick else DEFAULTS
    chosen = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in base.items()}
    cpus = os.cpu_count() or 1
    chosen["client_procs"] = args.client_procs or max(1, min(4, cpus // 2))
    if args.quick and not args.client_procs:
        chosen["client_procs"] = 1
    if not chosen["scale_workers"]:
        chosen["scale_workers"] = max(2, cpus)
    return chosen


def run(args: argparse.Namespace) -> int:
    from rnnserve.bench import model as models
    from rnnserve.bench import report
    from rnnserve.bench.measure import Bench, BenchConfig, PhaseSkipped
    from rnnserve.bench.progress import Progress

    settings = _settings(args)
    cfg = BenchConfig(steps=args.steps, server_args=list(args.server_arg), **settings)
    sizes = (cfg.chunk, cfg.max_batch, cfg.idle_sessions, cfg.mux_sessions, cfg.chunk_sessions, cfg.scale_sessions)
    if min(sizes) < 1:
        print("rnnserve bench: --chunk, --max-batch and session counts must be positive", file=sys.stderr)
        return 2
    if cfg.scale_workers < 2:
        print(
            "rnnserve bench: --scale-workers must be at least 2 (the row compares N processes with one)",
            file=sys.stderr,
        )
        return 2
    chosen = [p for p in (args.phases or PHASES) if p not in args.skip]
    progress = Progress(enabled=not args.quiet)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rnnserve-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    # SIGTERM unwinds like Ctrl-C, through the cleanup below.
    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    bench: Bench | None = None
    result: dict[str, Any] = {
        "machine": _machine(),
        "config": {**settings, "steps": args.steps, "server_args": cfg.server_args, "quick": args.quick},
        "compute": [],
        "transport": [],
        "sessions": [],
        "multiplexed": [],
        "chunked": [],
        "idle": None,
        "scale": [],
        "peer": [],
        "skipped": {},
        "errors": [],
    }
    try:
        if args.repository:
            names = [p.name for p in args.repository.iterdir() if p.is_dir()] if args.repository.is_dir() else []
            name = args.model or (names[0] if len(names) == 1 else None)
            if name is None:
                print(f"rnnserve bench: --model is needed: {args.repository} holds {sorted(names)}", file=sys.stderr)
                return 2
            bench_model = models.load_model(args.repository, name, args.version)
            repository = args.repository
        else:
            repository = workdir / "repository"
            shutil.rmtree(repository, ignore_errors=True)
            lstm = models.TINY if args.quick else models.LstmConfig()
            progress.log(f"exporting the LSTM step model ({lstm}) to {repository}")
            bench_model = models.build_lstm_repository(repository, lstm, max_batch_size=cfg.max_batch)
        result["model"] = bench_model.describe()
        bench = Bench(bench_model, repository, workdir, cfg, progress)
        bench.start()
        phases = [("compute", bench.compute)]
        methods = {"transport": bench.transport, "rnnserve": bench.rnnserve, "idle": bench.idle, "scale": bench.scale}
        phases += [(name, methods[name]) for name in PHASES if name in chosen]
        for name, phase in phases:
            progress.log(f"phase {name}")
            try:
                rows = phase()
            except PhaseSkipped as exc:
                progress.log(f"phase {name} SKIPPED: {exc}")
                result["skipped"][name] = str(exc)
                continue
            except Exception as exc:  # one failed phase must not lose the others' numbers
                progress.log(f"phase {name} FAILED: {exc}")
                result["errors"].append(f"{name}: {exc}")
                continue
            if name == "rnnserve":
                for row in rows:
                    result[row["phase"]].append(row)
            elif name == "idle":
                result["idle"] = rows
            else:
                result[name] = rows
        if args.peer == "triton":
            from rnnserve.bench.triton import echo_rows, rnnserve_rows, triton_rows

            result["peer"] = (
                triton_rows(progress, timeout=cfg.phase_timeout)
                + rnnserve_rows(progress, repository, bench_model.name, workdir, timeout=cfg.phase_timeout)
                + echo_rows(progress, repository, bench_model.name, workdir, timeout=cfg.phase_timeout)
            )
    except KeyboardInterrupt:
        print("rnnserve bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if bench is not None:
            bench.close()
        signal.signal(signal.SIGTERM, previous)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    if result["compute"]:
        report.add_ratios(result)
    report.add_scale_ratios(result)
    result["targets"] = report.targets(result) if result["compute"] else []
    print(report.markdown_report(result) if args.markdown else report.text_report(result))
    if args.json:
        args.json.write_text(json.dumps(_finite(result), indent=2) + "\n")
        progress.log(f"wrote {args.json}")
    if result["errors"]:
        return 1
    if args.check_targets and not all(t["pass"] for t in result["targets"]):
        return 1
    return 0
